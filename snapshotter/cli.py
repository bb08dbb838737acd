"""The `lazysnap` command line: parses, calls, prints. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import grpc
import trio

from . import __version__, config, daemon
from .containerd import pull
from .containerd.client import ContainerdClient
from .errors import SnapshotterError
from .registry.client import RegistryClient
from .registry.errors import RegistryError
from .registry.options import RegistryOptions
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
    rpull.add_argument("image", help="image reference, e.g. registry.example:5000/app:1")
    rpull.add_argument("--namespace", "-n", default="default", help="containerd namespace (default: default)")
    rpull.add_argument("--containerd", type=Path, default=Path("/run/containerd/containerd.sock"),
                       help="containerd's socket (default /run/containerd/containerd.sock)")
    rpull.add_argument("--address", type=Path, default=config.Config.address,
                       help=f"lazysnap's socket, for per-layer outcomes (default {config.Config.address})")
    rpull.add_argument("--snapshotter", default="lazysnap", help="the proxy_plugins name (default lazysnap)")
    rpull.add_argument("--plain-http", action="store_true", help="use HTTP for registries without hosts.toml")
    rpull.add_argument("--certs-dir", type=Path, default=config.Config.certs_dir, help="hosts.toml directory")
    rpull.add_argument("--docker-config", type=Path, help="credentials file (default ~/.docker/config.json)")

    status = commands.add_parser("status", help="how each layer is served, and the cache")
    status.add_argument("--address", type=Path, default=config.Config.address, help="lazysnap's socket")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            cfg = config.load(args.config, {"root": args.root, "address": args.address, "log_level": args.log_level})
            setup_logging(cfg.log_level)
            daemon.run(cfg)
        elif args.command == "rpull":
            setup_logging("warning")
            sys.exit(trio.run(rpull_command, args))
        elif args.command == "status":
            sys.exit(status_command(args))
    except (SnapshotterError, RegistryError) as e:
        sys.exit(f"lazysnap: {e}")


async def rpull_command(args: argparse.Namespace) -> int:
    options = RegistryOptions(plain_http=args.plain_http, certs_dir=args.certs_dir, docker_config=args.docker_config)
    status = StatusClient(args.address)
    try:
        with ContainerdClient(str(args.containerd), args.namespace) as containerd:
            containerd.wait_ready()
            async with RegistryClient(options) as registry:
                report = await pull.rpull(args.image, registry=registry, containerd=containerd,
                                          snapshotter=args.snapshotter, explain=status.explain,
                                          progress=lambda line: print(line, flush=True))
    finally:
        status.close()
    print(pull.format_report(report))
    return 0


def status_command(args: argparse.Namespace) -> int:
    client = StatusClient(args.address)
    try:
        reply = client.layers()
    except grpc.RpcError as e:
        print(f"lazysnap: cannot reach lazysnap at {args.address}: {e.code().name}", file=sys.stderr)
        return 1
    finally:
        client.close()
    rows = [("LAYER", "MODE", "SIZE", "FETCHED", "RESOLVE", "IMAGE / WHY")]
    for layer in reply.layers:
        rows.append((layer.digest[:19], layer.mode, pull.human_size(layer.size), pull.human_size(layer.fetched_bytes),
                     f"{layer.resolve_seconds:.2f}s", layer.reason or layer.image_ref))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:5])) + "  " + row[5])
    c = reply.cache
    ratio = c.hits / (c.hits + c.misses) if c.hits + c.misses else 0.0
    print(f"cache: {pull.human_size(c.bytes)} of {pull.human_size(c.max_bytes)}, hit rate {ratio:.0%} "
          f"({c.hits} hits, {c.misses} misses, {c.evictions} evictions)")
    return 0


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
