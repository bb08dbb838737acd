"""The `lazysnap` command line: parses, calls, prints. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__, config, daemon
from .errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazysnap", description="A lazily pulling containerd snapshotter.")
    parser.add_argument("--version", action="version", version=f"lazysnap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the snapshotter daemon (containerd's proxy plugin)")
    serve.add_argument("--config", type=Path, help=f"config file (default {config.DEFAULT_CONFIG_PATH}, if present)")
    serve.add_argument("--root", type=Path, help="state directory (default /var/lib/lazysnap)")
    serve.add_argument("--address", type=Path, help="gRPC unix socket path (default /run/lazysnap/lazysnap.sock)")
    serve.add_argument("--log-level", choices=config.LOG_LEVELS, help="default info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            cfg = config.load(args.config, {"root": args.root, "address": args.address, "log_level": args.log_level})
            setup_logging(cfg.log_level)
            daemon.run(cfg)
    except ConfigError as e:
        sys.exit(f"lazysnap: {e}")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
