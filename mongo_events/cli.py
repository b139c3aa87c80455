"""The ``mongo-events`` command line (also ``python -m mongo_events``)."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code (0 ok, 1 failure, 2 usage)."""
    parser = argparse.ArgumentParser(prog="mongo-events", description="Reliable callbacks from MongoDB change streams.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level to stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a bus against MONGODB_URI or a built-in fake replica set")
    demo.add_argument("--uri", help="a replica set to use (default: MONGODB_URI, else the fake)")
    demo.add_argument("--orders", type=int, default=5, help="how many orders to write (default 5)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    from .demo import run_demo

    return run_demo(args.uri, args.orders)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
