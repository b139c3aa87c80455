"""The ``mongo-events`` command line (also ``python -m mongo_events``).

Output goes to stdout as one JSON document per line (relaxed Extended JSON);
progress and errors go to stderr. Exit codes: 0 success, 1 failure (server,
store, or a replay that failed), 2 usage error, 4 not found.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import attrs
from bson import json_util

__all__ = ["main"]

OK, FAILED, USAGE, NOT_FOUND = 0, 1, 2, 4


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _print(doc: Any) -> None:
    sys.stdout.write(json_util.dumps(doc, json_options=json_util.RELAXED_JSON_OPTIONS) + "\n")
    sys.stdout.flush()


def _time(text: str) -> datetime:
    from .monitor.records import parse_rfc3339

    try:
        return parse_rfc3339(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-01-31T12:00:00Z)") from None


def _duration(text: str) -> Any:
    from .monitor.wsgi import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _client(args: argparse.Namespace) -> Any:
    import pymongo

    uri = getattr(args, "uri", None) or os.environ.get("MONGODB_URI")
    if not uri:
        raise _Exit(USAGE, "no MongoDB URI: pass --uri or set MONGODB_URI")
    return pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)


def _load_bus(spec: str) -> Any:
    """``module:attribute``: a Bus, or a callable returning one."""
    from .bus import Bus

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise _Exit(USAGE, f"--app must look like package.module:bus, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise _Exit(USAGE, f"cannot load {spec}: {exc}") from exc
    bus = obj() if callable(obj) and not isinstance(obj, Bus) else obj
    if not isinstance(bus, Bus):
        raise _Exit(USAGE, f"{spec} is not a mongo_events.Bus (or a function returning one)")
    return bus


# -- commands ------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.uri, args.orders)


def cmd_tail(args: argparse.Namespace) -> int:
    import pymongo

    from .bus import Bus
    from .errors import Retry

    client: pymongo.MongoClient[Any] = pymongo.MongoClient(args.uri, serverSelectionTimeoutMS=10_000)
    target: Any = client[args.db]
    if args.collection:
        target = target[args.collection]
    try:
        pipeline = json_util.loads(args.pipeline) if args.pipeline else None
    except ValueError as exc:
        raise _Exit(USAGE, f"--pipeline is not JSON: {exc}") from exc
    if pipeline is not None and not isinstance(pipeline, list):
        raise _Exit(USAGE, "--pipeline must be a JSON array of stages")
    bus = Bus(
        target,
        name="tail",
        full_document=args.full_document,
        pipeline=pipeline,
        resume=args.resume_id is not None,
        resume_token_id=args.resume_id,
        max_workers=1,
        ordering="stream",
        max_await_time=0.5,
    )
    done = threading.Event()
    count = [0]

    @bus.subscribe(name="tail")
    def show(event: Any) -> None:
        if args.limit and count[0] >= args.limit:
            raise Retry(delay=3600)  # past the limit: leave it undone, so a resumed tail prints it
        sys.stdout.write(event.to_json() + "\n")
        sys.stdout.flush()
        count[0] += 1
        if args.limit and count[0] >= args.limit:
            done.set()

    previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        bus.start()
        print(f"tailing {bus.namespace}{' as ' + bus.resume_token_key if args.resume_id else ''}; Ctrl-C stops", file=sys.stderr)
        while not done.wait(0.2):
            if bus.error is not None:
                break
        bus.stop(10)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        client.close()
    if bus.error is not None:
        raise _Exit(FAILED, str(bus.error))
    return OK


def cmd_tokens(args: argparse.Namespace) -> int:
    from .stores.mongodb import DEFAULT_COLLECTION

    coll = _client(args)[args.db][args.collection or DEFAULT_COLLECTION]
    if args.action == "show":
        query = {"_id": args.key} if args.key else {}
        docs = list(coll.find(query).sort("_id", 1))
        if args.key and not docs:
            raise _Exit(NOT_FOUND, f"no resume token {args.key!r} in {coll.full_name}")
        for doc in docs:
            _print({"key": doc["_id"], "cluster_time": doc.get("cluster_time"), "updated_at": doc.get("updated_at"), "token": doc.get("token")})
        return OK
    if not args.yes:
        raise _Exit(USAGE, f"tokens reset deletes {args.key!r}: the bus then starts from now (or start_from_past). Add --yes to confirm")
    if coll.delete_one({"_id": args.key}).deleted_count == 0:
        raise _Exit(NOT_FOUND, f"no resume token {args.key!r} in {coll.full_name}")
    print(f"deleted resume token {args.key!r} from {coll.full_name}; stop the bus before restarting it", file=sys.stderr)
    return OK


def cmd_acks(args: argparse.Namespace) -> int:
    from .stores.mongodb import MongoAckStore
    from .stores.records import AckFilter, AckStatus

    store = MongoAckStore(_client(args)[args.db][args.collection], ttl=None)
    if args.action == "stats":
        pending = store.list(AckFilter(status=AckStatus.PENDING, limit=1))
        _print({
            "pending": store.count(AckFilter(status=AckStatus.PENDING)),
            "acked": store.count(AckFilter(status=AckStatus.ACKED)),
            "total": store.count(),
            "oldest_pending": pending[0].created_at if pending else None,
        })
        return OK
    status = AckStatus(args.status) if args.status else None
    for record in store.list(AckFilter(status=status, start=args.since, end=args.until, limit=args.limit, offset=args.offset)):
        _print({"event_id": record.event_id, "status": record.status.value, "created_at": record.created_at, "acked_at": record.acked_at})
    return OK


def _letter_summary(letter: Any, full: bool = False) -> dict[str, Any]:
    doc = attrs.asdict(letter, recurse=False)
    if not full:
        doc.pop("payload")
    return doc


def cmd_dlq(args: argparse.Namespace) -> int:
    from .deadletters import DeadLetters
    from .stores.mongodb import MongoDeadLetterStore
    from .stores.records import DeadLetterFilter

    store = MongoDeadLetterStore(_client(args)[args.db][args.collection])
    bus = _load_bus(args.app) if getattr(args, "app", None) else None
    letters = DeadLetters(store, bus, max_replay_attempts=getattr(args, "max_attempts", 3))
    if args.action in ("list", "replay") and not getattr(args, "id", None):
        query = DeadLetterFilter(
            event_name=args.event, source=args.source, error=args.error,
            exclude_retried=args.exclude_retried or args.action == "replay",
            exclude_quarantined=args.action == "replay",
            limit=args.limit, offset=getattr(args, "offset", 0),
        )
    if args.action == "list":
        for letter in letters.list(query):
            _print(_letter_summary(letter))
        return OK
    if args.action == "stats":
        _print(attrs.asdict(letters.stats()))
        return OK
    if args.action == "show":
        found = letters.get(args.id)
        if found is None:
            raise _Exit(NOT_FOUND, f"no dead letter {args.id!r} in {store.collection.full_name}")
        _print(_letter_summary(found, full=True))
        return OK
    if args.action == "delete":
        if not letters.delete(args.id):
            raise _Exit(NOT_FOUND, f"no dead letter {args.id!r} in {store.collection.full_name}")
        print(f"deleted dead letter {args.id}", file=sys.stderr)
        return OK
    if args.action == "cleanup":
        print(f"deleted {letters.cleanup(args.older_than)} dead letters older than {args.older_than}", file=sys.stderr)
        return OK
    # replay
    if args.id:
        outcome = letters.replay_one(args.id)
        _print({"id": args.id, "outcome": outcome.value})
        return OK if outcome.value == "replayed" else FAILED
    result = letters.replay(query)
    _print(attrs.asdict(result))
    return OK if result.failed == 0 and result.quarantined == 0 else FAILED


def cmd_monitor(args: argparse.Namespace) -> int:
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from .monitor.mongodb import MongoMonitorStore
    from .monitor.wsgi import wsgi_app

    store = MongoMonitorStore(_client(args)[args.db], collection=args.collection)
    health: Callable[[], Any] | None = None
    if args.app:
        health = _load_bus(args.app).health

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *a: Any) -> None:
            logging.getLogger("mongo_events.monitor").info(format, *a)

    server = make_server(args.host, args.port, wsgi_app(store, health=health), handler_class=Quiet)
    print(f"monitor API on http://{args.host}:{server.server_port}/v1/monitor/entries; Ctrl-C stops", file=sys.stderr, flush=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        stop.wait()
    finally:
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return OK


# -- the parser -------------------------------------------------------------------------------


def _store_args(parser: argparse.ArgumentParser, collection: str | None) -> None:
    parser.add_argument("--uri", help="MongoDB URI (default: MONGODB_URI)")
    parser.add_argument("--db", required=True, help="the database holding the store")
    parser.add_argument("--collection", default=collection, help=f"the store's collection (default: {collection})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mongo-events", description="Reliable callbacks from MongoDB change streams.",
                                     epilog="Exit codes: 0 ok, 1 failure, 2 usage error, 4 not found.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run a bus against MONGODB_URI or a built-in fake replica set")
    demo.add_argument("--uri", help="a replica set to use (default: MONGODB_URI, else the fake)")
    demo.add_argument("--orders", type=int, default=5, help="how many orders to write (default 5)")
    demo.set_defaults(run=cmd_demo)

    tail = commands.add_parser("tail", help="print each change as one line of relaxed Extended JSON")
    tail.add_argument("uri", help="MongoDB URI of a replica set")
    tail.add_argument("--db", required=True, help="database to watch")
    tail.add_argument("--collection", help="collection to watch (default: the whole database)")
    tail.add_argument("--full-document", choices=["default", "updateLookup", "whenAvailable", "required"], help="the stream's fullDocument option")
    tail.add_argument("--pipeline", help='extra stages as a JSON array, e.g. \'[{"$match": {"operationType": "insert"}}]\'')
    tail.add_argument("--resume-id", help="store the position under this id and resume from it next time")
    tail.add_argument("--limit", type=int, default=0, help="exit after this many changes")
    tail.set_defaults(run=cmd_tail)

    tokens = commands.add_parser("tokens", help="show or reset stored resume tokens").add_subparsers(dest="action", required=True)
    show = tokens.add_parser("show", help="print stored resume tokens")
    _store_args(show, None)
    show.add_argument("--key", help='one key, e.g. "shop.orders:worker-1" (default: all)')
    reset = tokens.add_parser("reset", help="delete one stored resume token (stop its bus first)")
    _store_args(reset, None)
    reset.add_argument("--key", required=True, help='the key, e.g. "shop.orders:worker-1"')
    reset.add_argument("--yes", action="store_true", help="confirm")
    for p in (show, reset):
        p.set_defaults(run=cmd_tokens)

    acks = commands.add_parser("acks", help="inspect the ack store").add_subparsers(dest="action", required=True)
    stats = acks.add_parser("stats", help="pending, acked and total counts, oldest pending")
    _store_args(stats, "_event_acks")
    lst = acks.add_parser("list", help="list ack records, oldest first")
    _store_args(lst, "_event_acks")
    lst.add_argument("--status", choices=["pending", "acked"])
    lst.add_argument("--since", type=_time, help="created at or after (ISO 8601)")
    lst.add_argument("--until", type=_time, help="created before (ISO 8601)")
    lst.add_argument("--limit", type=int, default=100, help="at most 1,000 (default 100)")
    lst.add_argument("--offset", type=int, default=0)
    for p in (stats, lst):
        p.set_defaults(run=cmd_acks)

    dlq = commands.add_parser("dlq", help="inspect, replay and clean up dead letters").add_subparsers(dest="action", required=True)
    d_list = dlq.add_parser("list", help="list dead letters (without payloads)")
    d_stats = dlq.add_parser("stats", help="totals by event and error, pending, retried, quarantined")
    d_show = dlq.add_parser("show", help="one dead letter, with its payload")
    d_show.add_argument("id")
    d_replay = dlq.add_parser("replay", help="deliver dead letters again through the app's bus")
    d_replay.add_argument("--app", required=True, help="package.module:bus (a Bus, or a function returning one)")
    d_replay.add_argument("--id", help="replay this letter only")
    d_replay.add_argument("--max-attempts", type=int, default=3, help="failed replays before quarantine (default 3)")
    d_delete = dlq.add_parser("delete", help="delete one dead letter")
    d_delete.add_argument("id")
    d_cleanup = dlq.add_parser("cleanup", help="delete dead letters older than a duration")
    d_cleanup.add_argument("--older-than", type=_duration, required=True, help="e.g. 30d, 12h")
    for p in (d_list, d_replay):
        p.add_argument("--event", help="subscription name")
        p.add_argument("--source", help="bus name")
        p.add_argument("--error", help="error substring")
        p.add_argument("--limit", type=int, default=100)
    d_list.add_argument("--offset", type=int, default=0)
    d_list.add_argument("--exclude-retried", action="store_true")
    d_replay.set_defaults(exclude_retried=True)
    for p in (d_list, d_stats, d_show, d_replay, d_delete, d_cleanup):
        _store_args(p, "event_dlq")
        p.set_defaults(run=cmd_dlq)

    monitor = commands.add_parser("monitor", help="the monitor HTTP API").add_subparsers(dest="action", required=True)
    serve = monitor.add_parser("serve", help="serve the monitor API on a local port")
    _store_args(serve, "monitor_entries")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    serve.add_argument("--app", help="package.module:bus whose health /v1/health reports")
    serve.set_defaults(run=cmd_monitor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (0 ok, 1 failure, 2 usage, 4 not found)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    from pymongo.errors import PyMongoError

    from .errors import MongoEventsError

    try:
        code: int = args.run(args)
    except _Exit as exc:
        print(f"mongo-events: {exc}", file=sys.stderr)
        return exc.code
    except (PyMongoError, MongoEventsError) as exc:
        print(f"mongo-events: {exc}", file=sys.stderr)
        return FAILED
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
