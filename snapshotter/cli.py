"""The `lazysnap` command line: parses, calls, prints. No logic of its own.

Each command imports what it uses when it runs: a new process starts for every call,
and `lazysnap rpull` should not wait ~0.5 s for the daemon's machinery (trio, httpx, the
layer formats) to import before it asks the daemon to pull.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, config
from .errors import SnapshotterError, Unavailable
from .layer_modes import LayerMode
from .registry.errors import RegistryError
from .registry.options import RegistryOptions, default_docker_config
from .sizes import human_size, parse_size
from .soci import DEFAULT_JOBS, DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE
from .soci.local import DEFAULT_DIR as SOCI_STORE

if TYPE_CHECKING:
    from .api.lazysnap.v1 import status_pb2
    from .registry.client import RegistryClient
    from .soci import local
    from .status import StatusClient


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazysnap", description="A lazily pulling containerd snapshotter.")
    parser.add_argument("--version", action="version", version=f"lazysnap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the snapshotter daemon (containerd's proxy plugin)")
    serve.add_argument("--config", type=Path, help=f"config file (default {config.DEFAULT_CONFIG_PATH}, if present)")
    serve.add_argument("--root", type=Path, help="state directory (default /var/lib/lazysnap)")
    serve.add_argument("--address", type=Path, help="gRPC unix socket path (default /run/lazysnap/lazysnap.sock)")
    serve.add_argument("--log-level", choices=config.LOG_LEVELS, help="default info")

    rpull = commands.add_parser("rpull", help="pull an image into containerd, its layers served lazily where possible")
    _pull_args(rpull)

    prefetch = commands.add_parser(
        "prefetch", help="warm this node's cache with an image without running it",
        description="Pull IMAGE as rpull does, then have the daemon fetch its lazy layers into this node's chunk "
                    "cache now: what the image reads first (its start profile, when it has one) first, then the "
                    "rest of every layer, as much as the cache holds. `lazysnap status` shows how much of each "
                    "layer is complete. Ctrl-C during the pull stops the pull; once the warming has started, "
                    "it runs on in the daemon (Ctrl-C only stops waiting for it).")
    _pull_args(prefetch)
    prefetch.add_argument("--wait", action="store_true",
                          help="print progress until the layers are in the cache (default: return once the image "
                               "is pulled and the warming has started)")

    status = commands.add_parser("status", help="how each layer is served, and the cache")
    status.add_argument("--address", type=Path, default=config.Config.address, help="lazysnap's socket")
    status.add_argument("--fuse", action="store_true",
                        help="also print the FUSE requests served, per operation, and the time they took")
    status.add_argument("--json", action="store_true",
                        help="print everything as one JSON object (layers, cache, fuse, data_planes), for scripts")
    status.add_argument("--dataplanes", action="store_true",
                        help="also list the data plane processes that serve the layers (one per build in use)")

    index = commands.add_parser("index", help="SOCI indexes: build, push, convert, inspect").add_subparsers(
        dest="index_command", required=True)
    create = index.add_parser("create", help="build zTOCs and a SOCI v1 index for an image, into the local store")
    create.add_argument("image")
    _build_args(create)
    _registry_args(create)
    push = index.add_parser("push", help="push the locally built index of an image (zTOCs + v1 index manifest)")
    push.add_argument("image")
    _registry_args(push)
    convert = index.add_parser("convert", help="make a SOCI v2 image at NEW_REF: the image plus its index")
    convert.add_argument("image")
    convert.add_argument("new_ref", help="where the converted image index goes (same repository, a tag)")
    _build_args(convert)
    _registry_args(convert)
    ls = index.add_parser("list", help="indexes in the local store; with IMAGE, also what the registry has")
    ls.add_argument("image", nargs="?")
    _registry_args(ls)
    info = index.add_parser("info", help="an index manifest and a summary of each of its zTOCs")
    info.add_argument("what", metavar="DIGEST|IMAGE")
    _registry_args(info)

    profile = commands.add_parser("profile", help="start profiles: what an image reads first, replayed as prefetch"
                                  ).add_subparsers(dest="profile_command", required=True)
    plist = profile.add_parser("list", help="the start profiles recorded on this node")
    ppush = profile.add_parser("push", help="publish this node's start profile of IMAGE beside it, for every node")
    ppush.add_argument("image")
    ppush.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="wait up to this long for the daemon to save the profile (default: do not wait)")
    for p in (plist, ppush):
        p.add_argument("--root", type=Path, default=config.Config.root, help="the daemon's state directory")
    _registry_args(ppush)

    ztoc = commands.add_parser("ztoc", help="zTOCs: inspect, extract a file").add_subparsers(
        dest="ztoc_command", required=True)
    zinfo = ztoc.add_parser("info", help="a zTOC's sizes, spans and first files")
    zinfo.add_argument("digest")
    zinfo.add_argument("--image", default="", help="fetch it from this image's repository if not stored locally")
    zinfo.add_argument("--files", type=int, default=10, help="how many entries to list (default 10)")
    _registry_args(zinfo)
    get = ztoc.add_parser("get-file", help="extract one file of a layer through its zTOC (range reads only)")
    get.add_argument("image")
    get.add_argument("layer", metavar="LAYER-DIGEST", help="the layer's digest (or a unique prefix of it)")
    get.add_argument("path", help="the file's path in the layer")
    get.add_argument("-o", "--output", type=Path, help="write here instead of standard output")
    _registry_args(get)
    return parser


def _pull_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image reference, e.g. registry.example:5000/app:1")
    p.add_argument("--namespace", "-n", default="default", help="containerd namespace (default: default)")
    p.add_argument("--containerd", type=Path, default=Path("/run/containerd/containerd.sock"),
                   help="containerd's socket (default /run/containerd/containerd.sock)")
    p.add_argument("--address", type=Path, default=config.Config.address,
                   help=f"the lazysnap daemon's socket: the daemon pulls (default {config.Config.address})")
    p.add_argument("--snapshotter", default="lazysnap", help="the proxy_plugins name (default lazysnap)")
    p.add_argument("--plain-http", action="store_true", help="use HTTP for registries without hosts.toml")
    p.add_argument("--certs-dir", type=Path, default=config.Config.certs_dir, help="hosts.toml directory")
    p.add_argument("--docker-config", type=Path, help="credentials file (default ~/.docker/config.json)")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--span-size", type=_size, default=DEFAULT_SPAN_SIZE,
                   help="uncompressed bytes per span (default 4MiB; sizes: 4MiB, 10MB, 65536)")
    p.add_argument("--min-layer-size", type=_size, default=DEFAULT_MIN_LAYER_SIZE,
                   help="layers smaller than this (compressed) get no zTOC (default 10MiB)")
    p.add_argument("--force", action="store_true", help="rebuild zTOCs already in the store")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="layers streamed at once (default 3)")


def _registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=SOCI_STORE,
                   help=f"the node's index store, which the daemon reads too (default {SOCI_STORE})")
    p.add_argument("--plain-http", action="store_true", help="use HTTP for registries without hosts.toml")
    p.add_argument("--certs-dir", type=Path, default=config.Config.certs_dir, help="hosts.toml directory")
    p.add_argument("--docker-config", type=Path, help="credentials file (default ~/.docker/config.json)")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            cfg = config.load(args.config, {"root": args.root, "address": args.address, "log_level": args.log_level})
            setup_logging(cfg.log_level)
            from . import daemon
            daemon.run(cfg)
        elif args.command == "rpull":
            sys.exit(rpull_command(args))
        elif args.command == "prefetch":
            sys.exit(prefetch_command(args))
        elif args.command == "status":
            sys.exit(status_command(args))
        elif args.command in ("index", "ztoc"):
            import trio

            setup_logging("warning")
            sys.exit(trio.run(soci_command, args))
        elif args.command == "profile":
            import trio

            setup_logging("warning")
            sys.exit(trio.run(profile_command, args))
    except (SnapshotterError, RegistryError) as e:
        sys.exit(f"lazysnap: {e}")
    except KeyboardInterrupt:
        # No traceback for Ctrl-C; rpull's stream is closed with the process, which cancels the pull.
        print("lazysnap: interrupted" + ("; the daemon stops the pull" if args.command in ("rpull", "prefetch")
                                         else ""), file=sys.stderr)
        sys.exit(130)


def pull_request(args: argparse.Namespace) -> Any:
    """The `PullRequest` that rpull and prefetch send (the daemon reads the files it names)."""
    from .api.lazysnap.v1 import pull_pb2

    return pull_pb2.PullRequest(
        ref=args.image, namespace=args.namespace, containerd_address=str(args.containerd.absolute()),
        snapshotter=args.snapshotter, plain_http=args.plain_http,
        certs_dir=str(args.certs_dir.absolute()) if args.certs_dir else "",
        docker_config=str((args.docker_config or default_docker_config()).absolute()))


def rpull_command(args: argparse.Namespace) -> int:
    """Ask the daemon to pull; print its progress as it comes, then its report."""
    from .pull_records import PullReport, format_report

    with _daemon(args.address) as client:
        for event in client.pull(pull_request(args)):
            print(event if isinstance(event, str) else format_report(event), flush=True)
            if isinstance(event, PullReport):
                return 0
    sys.exit("lazysnap: the daemon ended the pull without a report")


def prefetch_command(args: argparse.Namespace) -> int:
    """Ask the daemon to pull and warm; print the pull, then the warming's progress and report.

    Ctrl-C once the pull is done leaves the warming to the daemon, and says so.
    """
    from .api.lazysnap.v1 import pull_pb2
    from .pull_records import PullReport, WarmReport, format_report, format_warm_report

    pulled = False
    try:
        with _daemon(args.address) as client:
            for event in client.prefetch(pull_pb2.PrefetchRequest(pull=pull_request(args), wait=args.wait)):
                if isinstance(event, str):
                    print(event, flush=True)
                elif isinstance(event, PullReport):
                    pulled = True
                    print(format_report(event), flush=True)
                elif isinstance(event, WarmReport):
                    print(format_warm_report(event), flush=True)
                    return 1 if event.failed else 0
    except KeyboardInterrupt:
        if not pulled:
            raise
        print(f"lazysnap: interrupted; the daemon keeps warming {args.image} (`lazysnap status` shows how far)",
              file=sys.stderr)
        return 130
    sys.exit("lazysnap: the daemon ended the prefetch without a report")


@contextmanager
def _daemon(address: Path) -> Iterator[StatusClient]:
    """The daemon's client for a pull; exits saying so when no daemon answers (what else it
    answers with is a lazysnap error, which `main` prints)."""
    from .status import connect

    try:
        with connect(address) as client:
            yield client
    except Unavailable as e:
        sys.exit(f"lazysnap: cannot reach the lazysnap daemon at {address}: {e}")


async def soci_command(args: argparse.Namespace) -> int:
    from .registry.client import RegistryClient
    from .soci import build, describe, local, report
    from .soci import convert as soci_convert
    from .soci import push as soci_push

    options = RegistryOptions(plain_http=args.plain_http, certs_dir=args.certs_dir, docker_config=args.docker_config)
    store = local.LocalIndexes(args.store)
    command = args.index_command if args.command == "index" else "ztoc-" + args.ztoc_command
    async with RegistryClient(options) as registry:
        if command in ("create", "convert"):
            sizes = {"span_size": args.span_size, "min_layer_size": args.min_layer_size, "force": args.force,
                     "jobs": args.jobs, "progress": report.ProgressBar()}
            try:
                if command == "create":
                    print(report.build_report(await build.create_index(registry, store, args.image, **sizes)))
                else:
                    result = await soci_convert.convert(registry, store, args.image, args.new_ref, **sizes)
                    print(report.convert_report(result))
            except build.EmptyIndex as e:
                print(report.layer_table(e.layers))
                raise
        elif command == "push":
            print(report.push_report(await soci_push.push_index(registry, store, args.image)))
        elif command == "list":
            digest = (await registry.resolve(args.image)).digest if args.image else None
            print(report.local_list(describe.local_indexes(store, digest), str(store.dir)))
            if args.image:
                print(report.registry_view(await describe.registry_indexes(registry, args.image)))
        elif command == "info":
            print(report.index_info(await describe.index_info(registry, store, args.what)))
        elif command == "ztoc-info":
            print(report.ztoc_info(await describe.ztoc_info(registry, store, args.digest, args.image), args.files))
        elif command == "ztoc-get-file":
            await get_file_command(registry, store, args)
    return 0


async def get_file_command(registry: RegistryClient, store: local.LocalIndexes, args: argparse.Namespace) -> None:
    """Into `-o FILE` (a temporary name until complete) or standard output; the summary to stderr."""
    from .soci import extract, report

    if args.output is None:
        out = sys.stdout.buffer
        result = await extract.get_file(registry, store, args.image, args.layer, args.path, out.write)
        out.flush()
    else:
        partial = args.output.with_name(f".{args.output.name}.partial")
        try:
            with partial.open("wb") as f:
                result = await extract.get_file(registry, store, args.image, args.layer, args.path, f.write)
            partial.replace(args.output)
        finally:
            partial.unlink(missing_ok=True)
    print(report.extracted(result, str(args.output or "standard output")), file=sys.stderr)


async def profile_command(args: argparse.Namespace) -> int:
    import trio

    from . import profiles
    from .registry.client import RegistryClient

    store = profiles.ProfileStore(args.root / "profiles")
    if args.profile_command == "list":
        for p in store.all():
            print(f"{p.image}  {len(p.layers)} layer(s)  {sum(len(lp.ranges) for lp in p.layers)} range(s)  "
                  f"{human_size(p.bytes)} compressed  recorded over {p.seconds:g} s")
        return 0
    options = RegistryOptions(plain_http=args.plain_http, certs_dir=args.certs_dir, docker_config=args.docker_config)
    async with RegistryClient(options) as registry:
        with trio.move_on_after(args.wait):
            digest = (await registry.resolve(args.image)).digest
            while store.get(digest) is None:
                await trio.sleep(0.5)
        try:
            result = await profiles.push(registry, store, args.image)
        except profiles.ProfileError as e:
            sys.exit(f"lazysnap: {e}")
    print(f"pushed the start profile of {result.image} ({result.ranges} ranges, {human_size(result.bytes)}) "
          f"as {result.manifest_digest}, tagged for its {len(result.layer_tags)} layers (lazysnap-profile-<layer>) "
          "for the images that share them")
    return 0


def status_command(args: argparse.Namespace) -> int:
    from .status import connect

    try:
        with connect(args.address) as client:
            reply = client.layers()
    except SnapshotterError as e:
        print(f"lazysnap: cannot reach lazysnap at {args.address}: {e.status}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(message_dict(reply), indent=1))
        return 0
    rows = [("LAYER", "MODE", "SIZE", "FETCHED", "RESOLVE", "FETCH STATE", "CREDS RENEWED", "IMAGE / WHY")]
    now = time.time()
    for layer in reply.layers:
        size = human_size(layer.size) if layer.size or layer.mode != LayerMode.FALLBACK else "-"  # containerd pulls it
        rows.append((layer.digest[:19], layer.mode, size, human_size(layer.fetched_bytes),
                     f"{layer.resolve_seconds:.2f}s",
                     fetch_state(layer),
                     f"{max(0, now - layer.credential_renewed):.0f}s ago" if layer.credential_renewed else "-",
                     layer.reason or layer.image_ref))
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    for row in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:7])) + "  " + row[7])
    c = reply.cache
    ratio = c.hits / (c.hits + c.misses) if c.hits + c.misses else 0.0
    print(f"cache: {human_size(c.bytes)} of {human_size(c.max_bytes)}, hit rate {ratio:.0%} "
          f"({c.hits} hits, {c.misses} misses, {c.evictions} evictions)")
    if args.fuse:
        print(format_fuse(reply.fuse))
    if args.dataplanes:
        for plane in reply.data_planes:
            print(f"data plane {plane.generation}: pid {plane.pid}, {plane.layers} layers, build {plane.build[:12]}"
                  + (" (retiring: exits once its layers are released)" if plane.retiring else ""))
    return 0


def fetch_state(layer: status_pb2.Layer) -> str:
    """How much of a lazy layer is in the cache: "complete", or e.g. "40 %, warming"."""
    if layer.mode == LayerMode.WHOLE:
        return f"pulled in {layer.pull_seconds:.2f}s"
    if not layer.content_bytes:
        return layer.fetch_state or "-"
    if layer.complete_bytes >= layer.content_bytes:
        return "complete"
    from .pull_records import percent

    state = "on demand" if layer.fetch_state == "complete" else layer.fetch_state  # evicted since
    return f"{percent(layer.complete_bytes, layer.content_bytes)}, {state}"


def message_dict(message: Any) -> dict[str, object]:
    """A protobuf message as plain JSON values, field names as in the .proto (`status --json`).

    Not protobuf's own JSON mapping: that turns every int64 into a string.
    """
    out: dict[str, object] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            value = [message_dict(v) for v in value] if field.is_repeated else message_dict(value)
        elif field.is_repeated:
            value = list(value)
        out[field.name] = value
    return out


def format_fuse(fuse: status_pb2.Fuse) -> str:
    """FUSE requests per operation, busiest first: what a workload cost the daemon."""
    rows = [("FUSE OP", "REQUESTS", "SECONDS", "US/REQ")]
    for op in fuse.ops:
        rows.append((op.name, str(op.count), f"{op.seconds:.3f}", f"{op.seconds / op.count * 1e6:.0f}" if op.count else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)) for row in rows]
    lines.append(f"fuse: {human_size(fuse.read_bytes)} read, {fuse.read_errors} read errors")
    return "\n".join(lines)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Their debug lines come per socket event; lazysnap's own debug line per request says enough.
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
