"""Mirror failover within a blob: a blob opened on a mirror keeps reading when the mirror dies.

A real docker-registry holds the blobs; two FaultProxy instances in front of it
play the mirror (a `[host]` in hosts.toml) and the origin (`server`), so each
can be stopped, hung or made to fail while a blob is being read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import RegistryUnavailable
from snapshotter.registry.options import RegistryOptions
from tests.harness.faultproxy import FaultProxy
from tests.harness.registry import Registry

from tests.unit.test_registry_client import MiB, fast, hosts_toml, upload_blob

LIMIT = 30
REPO = "mirrored/app"
NAME = f"registry.test/{REPO}"


@dataclass
class Blobs:
    registry: Registry
    small: bytes        # 1 MiB: within whole_body_limit
    small_digest: str
    big: bytes          # 12 MiB: a 200 with all of it is not read
    big_digest: str


@pytest.fixture(scope="module")
def blobs() -> Iterator[Blobs]:
    with Registry() as registry:
        small, big = os.urandom(MiB), os.urandom(12 * MiB)
        yield Blobs(registry, small, upload_blob(registry, REPO, small), big, upload_blob(registry, REPO, big))


@dataclass
class Hosts:
    mirror: FaultProxy
    origin: FaultProxy


@pytest.fixture
def hosts(tmp_path: Path, blobs: Blobs) -> Iterator[Hosts]:
    """registry.test: one mirror, then the origin, both proxies of the same registry."""
    with FaultProxy(blobs.registry.host) as mirror, FaultProxy(blobs.registry.host) as origin:
        hosts_toml(tmp_path, "registry.test", f'server = "{origin.url}"\n'
                                              f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n')
        yield Hosts(mirror, origin)


def options(tmp_path: Path, **overrides: Any) -> RegistryOptions:
    return fast(tmp_path, **{"whole_body_limit": 2 * MiB, **overrides})


def gets(proxy: FaultProxy) -> int:
    return proxy.count("GET", "/blobs/")


async def test_mirror_that_dies_mid_blob_hands_over_to_the_origin(tmp_path: Path, blobs: Blobs,
                                                                  hosts: Hosts) -> None:
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path)) as c:
            blob = await c.open_blob(NAME, blobs.big_digest)
            assert blob.endpoint.host == hosts.mirror.host
            assert hosts.mirror.count("HEAD") == 0, "a mirror is asked GET bytes=0-0, not HEAD"
            assert await c.read_range(blob, 0, 100) == blobs.big[:100]
            assert gets(hosts.origin) == 0

            hosts.mirror.die()
            start = trio.current_time()
            assert await c.read_range(blob, 5 * MiB, 5 * MiB + 4096) == blobs.big[5 * MiB:5 * MiB + 4096]
            assert trio.current_time() - start < 2.0, "connection refused: failover after the short retries"
            assert blob.endpoint.host == hosts.origin.host
            wanted = [(0, 10), (MiB, MiB + 10), (11 * MiB, 11 * MiB + 10)]
            assert await c.read_ranges(blob, wanted) == [blobs.big[s:e] for s, e in wanted]
            assert gets(hosts.origin) == 2

            other = await c.open_blob(NAME, blobs.small_digest)
            assert other.endpoint.host == hosts.origin.host, "a host that just failed is asked last"


async def test_5xx_mirror_is_passed_over_for_a_while_then_tried_again(tmp_path: Path, blobs: Blobs,
                                                                      hosts: Hosts) -> None:
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path, failed_host_seconds=1.0)) as c:
            blob = await c.open_blob(NAME, blobs.big_digest)
            hosts.mirror.fail(503, times=4, match="/blobs/")
            assert await c.read_range(blob, 100, 200) == blobs.big[100:200]
            assert gets(hosts.mirror) == 1 + 4, "the open, then one attempt and three retries"
            for start in (MiB, 2 * MiB, 3 * MiB):
                assert await c.read_range(blob, start, start + 10) == blobs.big[start:start + 10]
            assert gets(hosts.mirror) == 5, "later reads of the blob stay on the origin"
            assert gets(hosts.origin) == 4

            await trio.sleep(1.1)
            assert await c.read_range(blob, 0, 10) == blobs.big[:10]
            assert blob.endpoint.host == hosts.mirror.host, "the mirror recovered: reads go back to it"
            assert gets(hosts.origin) == 4


async def test_hung_mirror_gets_the_failover_budget(tmp_path: Path, blobs: Blobs, hosts: Hosts) -> None:
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path, failover_budget=1.0)) as c:
            blob = await c.open_blob(NAME, blobs.small_digest)
            hosts.mirror.delay, hosts.mirror.delay_match = 60.0, "/blobs/"
            start = trio.current_time()
            assert await c.read_range(blob, 10, 20) == blobs.small[10:20]
            assert 1.0 <= trio.current_time() - start < 3.0, "the origin is asked once the budget is spent"
            assert c.failed_hosts


async def test_mirror_without_the_blob_is_avoided_for_that_blob_only(tmp_path: Path, blobs: Blobs,
                                                                     hosts: Hosts) -> None:
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path)) as c:
            big = await c.open_blob(NAME, blobs.big_digest)
            small = await c.open_blob(NAME, blobs.small_digest)
            hosts.mirror.fail(404, times=1, match=blobs.big_digest)
            assert await c.read_range(big, 0, 10) == blobs.big[:10]
            assert await c.read_range(big, 10, 20) == blobs.big[10:20]
            assert big.endpoint.host == hosts.origin.host
            assert await c.read_range(small, 0, 10) == blobs.small[:10]
            assert small.endpoint.host == hosts.mirror.host, "a 404 for one blob says nothing of the others"
            assert not c.failed_hosts


async def test_whole_blob_answer_sends_the_range_to_the_next_host(tmp_path: Path, blobs: Blobs,
                                                                  hosts: Hosts) -> None:
    """A pull-through cache that has not stored a blob yet answers ranges with all of it (HTTP 200)."""
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path, blob_avoid_seconds=1.0)) as c:
            blob = await c.open_blob(NAME, blobs.big_digest)
            hosts.mirror.ignore_ranges = True
            tail = (len(blobs.big) - 4096, len(blobs.big))
            assert await c.read_range(blob, *tail) == blobs.big[tail[0]:]
            assert blob.endpoint.host == hosts.origin.host
            assert hosts.mirror.count("GET") == 2 and gets(hosts.origin) == 1
            assert not c.single_range_only and not c.failed_hosts, "the mirror is neither broken nor range-less"

            hosts.mirror.ignore_ranges = False  # it has stored the blob now
            assert await c.read_range(blob, 100, 200) == blobs.big[100:200]
            assert blob.endpoint.host == hosts.origin.host, "within blob_avoid_seconds the blob stays on the origin"
            await trio.sleep(1.1)
            assert await c.read_range(blob, 200, 300) == blobs.big[200:300]
            assert blob.endpoint.host == hosts.mirror.host


async def test_whole_blob_answer_with_the_range_in_its_prefix_is_cut_short(tmp_path: Path, blobs: Blobs,
                                                                           hosts: Hosts) -> None:
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path)) as c:
            blob = await c.open_blob(NAME, blobs.big_digest)
            hosts.mirror.ignore_ranges = True
            assert await c.read_range(blob, 1000, 5000) == blobs.big[1000:5000]
            assert await c.read_ranges(blob, [(0, 10), (MiB, MiB + 10)]) == [blobs.big[:10], blobs.big[MiB:MiB + 10]]
            assert gets(hosts.origin) == 0 and blob.endpoint.host == hosts.mirror.host


async def test_every_host_failing_names_them_all(tmp_path: Path, blobs: Blobs, hosts: Hosts) -> None:
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path)) as c:
            blob = await c.open_blob(NAME, blobs.small_digest)
            hosts.mirror.die()
            hosts.origin.fail(503, times=4)
            with pytest.raises(RegistryUnavailable, match=r"every endpoint failed.*ConnectError.*HTTP 503"):
                await c.read_range(blob, 0, 10)
            assert await c.read_range(blob, 0, 10) == blobs.small[:10], "both passed over: both tried anyway"


async def test_mirror_without_the_blob_yet_is_passed_over_from_the_open(tmp_path: Path, blobs: Blobs,
                                                                       hosts: Hosts) -> None:
    """The size probe already tells a cold pull-through cache (HTTP 200 to `bytes=0-0`): reads skip it."""
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path, blob_avoid_seconds=1.0)) as c:
            hosts.mirror.ignore_ranges = True
            blob = await c.open_blob(NAME, blobs.big_digest)
            assert blob.size == len(blobs.big) and hosts.mirror.count("GET") == 1
            tail = (len(blobs.big) - 100, len(blobs.big))
            assert await c.read_range(blob, *tail) == blobs.big[tail[0]:]
            assert hosts.mirror.count("GET") == 1, "no second whole-blob answer to cut short"
            assert blob.endpoint.host == hosts.origin.host
            hosts.mirror.ignore_ranges = False
            await trio.sleep(1.1)
            assert await c.read_range(blob, *tail) == blobs.big[tail[0]:]
            assert blob.endpoint.host == hosts.mirror.host

            small = await c.open_blob(NAME, blobs.small_digest)
            hosts.mirror.ignore_ranges = True
            assert await c.read_range(small, 0, 10) == blobs.small[:10], "a small blob's whole answer is sliced"
            assert small.endpoint.host == hosts.mirror.host


async def test_dial_timeout_of_a_host_is_its_connect_timeout(tmp_path: Path) -> None:
    hosts_toml(tmp_path, "registry.test", "server = 'http://127.0.0.1:1'\n"
                                          "[host.'http://127.0.0.1:2']\ndial_timeout = '250ms'\n")
    async with RegistryClient(options(tmp_path)) as c:
        mirror, upstream = c.hosts.endpoints("registry.test")
        assert c.transport._timeout(mirror).connect == 0.25
        assert c.transport._timeout(upstream).connect == c.options.timeouts.connect


async def test_concurrent_reads_when_the_mirror_dies(tmp_path: Path, blobs: Blobs, hosts: Hosts) -> None:
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path)) as c:
            blob = await c.open_blob(NAME, blobs.big_digest)
            assert await c.read_range(blob, 0, 10) == blobs.big[:10]
            hosts.mirror.die()
            got: dict[int, bytes] = {}

            async def read(i: int) -> None:
                got[i] = await c.read_range(blob, i * MiB, i * MiB + 1000)

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(read, i)
            assert got == {i: blobs.big[i * MiB:i * MiB + 1000] for i in range(8)}
            assert blob.endpoint.host == hosts.origin.host
            wanted = [(0, 10), (5 * MiB, 5 * MiB + 10)]
            assert await c.read_ranges(blob, wanted) == [blobs.big[s:e] for s, e in wanted]


async def test_a_whole_blob_stream_goes_on_from_the_next_host(tmp_path: Path, blobs: Blobs, hosts: Hosts) -> None:
    """Whole pulls too: a mirror that keeps dropping the stream hands over, from the same byte."""
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path)) as c:
            blob = await c.open_blob(NAME, blobs.big_digest)
            hosts.mirror.drop(times=100)
            received = bytearray()
            async with aclosing(c.stream_blob(blob, 256 << 10)) as chunks:
                async for chunk in chunks:
                    received += chunk
            assert bytes(received) == blobs.big
            assert blob.endpoint.host == hosts.origin.host
            origin_gets = [h for h in hosts.origin.hits() if h.method == "GET"]
            assert len(origin_gets) == 1 and origin_gets[0].range and origin_gets[0].range != "bytes=0-", \
                "the origin was asked only for the rest"

            single = RegistryClient(options(tmp_path, certs_dir=None))
            async with single:
                only = await single.open_blob(f"{hosts.mirror.host}/{REPO}", blobs.small_digest)
                hosts.mirror.drop(times=100)
                with pytest.raises(RegistryUnavailable, match="attempts"):
                    async for _ in single.stream_blob(only):
                        pass
