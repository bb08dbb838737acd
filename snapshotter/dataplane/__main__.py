"""`python -m snapshotter.dataplane`: the data plane process, started by `lazysnap serve` (`client.py`).

Not a command for people: `lazysnap serve` starts it in a session of its own, so that
stopping or killing serve (its process group, or systemd with `KillMode=process`)
leaves it, and every running container's reads, alone. SIGTERM stops it for real:
its layers are unmounted first.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import trio

from .server import DataPlane, Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapshotter.dataplane")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--build", required=True, help="the build id of the code that started it")
    parser.add_argument("--read-timeout", type=float, default=30.0)
    parser.add_argument("--no-xattrs", action="store_true")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--ready-fd", type=int, help="write 'ready' to this fd once the mount serves")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s dataplane[{args.generation}] %(name)s: %(message)s")
    # pyfuse3 logs each worker task it starts and stops; our own lines per failed read say enough.
    logging.getLogger("pyfuse3").setLevel(max(logging.INFO, logging.getLogger().level))
    plane = DataPlane(Settings(args.root, args.generation, args.build, args.read_timeout, not args.no_xattrs,
                               args.cache_dir))

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(plane.run)
            if args.ready_fd is not None:
                os.write(args.ready_fd, b"ready\n")
                os.close(args.ready_fd)

    try:
        trio.run(run)
    except Exception:
        logging.getLogger(__name__).exception("data plane %d failed", args.generation)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
