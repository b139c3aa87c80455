"""The ``mongo-events`` command line (also ``python -m mongo_events``).

Output goes to stdout as one JSON document per line (relaxed Extended JSON);
progress, logs and errors go to stderr. Exit codes: 0 success, 1 failure
(server, store, or a replay that failed or was quarantined; a skipped replay, said
on stderr, is not a failure), 2 usage error (one line on stderr),
4 not found; 141 when the reader of stdout went away (``| head``), as for a
process that SIGPIPE ended.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

import attrs
from bson import json_util

from . import __version__
from .runner import ensure_logging
from .stores.mongodb import GO_ZERO_TIME

__all__ = ["main"]

OK, FAILED, USAGE, NOT_FOUND, BROKEN_PIPE = 0, 1, 2, 4, 141

#: Most documents one page of ``list`` commands returns (the stores' limit).
MAX_LIMIT = 1000
#: Page size when a command walks a whole store.
PAGE = 500


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _print(doc: Any) -> None:
    sys.stdout.write(json_util.dumps(doc, json_options=json_util.RELAXED_JSON_OPTIONS) + "\n")
    sys.stdout.flush()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _time(text: str) -> datetime:
    from .monitor.records import parse_rfc3339

    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (e.g. 2026-01-31T12:00:00Z): {exc}"
        ) from None


def _duration(text: str) -> timedelta:
    from .monitor.wsgi import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:,} to {high:,}, got {value:,}")
        return value

    parse.__name__ = "integer"
    return parse


def format_duration(value: timedelta) -> str:
    """``30d``, ``12h``, ``1h30m``, ``90s``, ``250ms``: the form :func:`parse_duration` reads."""
    seconds = value.total_seconds()
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{int(count)}{unit}")
    if seconds or not parts:
        parts.append(f"{seconds:g}s")
    return "".join(parts)


def _uri(args: argparse.Namespace) -> str:
    uri = getattr(args, "uri", None) or os.environ.get("MONGODB_URI")
    if not uri:
        raise _Exit(USAGE, "no MongoDB URI: pass --uri or set MONGODB_URI")
    return str(uri)


def _client(args: argparse.Namespace) -> Any:
    """A client for ``--uri``/``MONGODB_URI``; the URI's own ``serverSelectionTimeoutMS`` wins over our 10 s."""
    import pymongo
    from pymongo.errors import ConfigurationError, InvalidURI

    uri = _uri(args)
    options: dict[str, Any] = {}
    if "serverselectiontimeoutms=" not in uri.lower():
        options["serverSelectionTimeoutMS"] = 10_000
    try:
        return pymongo.MongoClient(uri, **options)
    except (InvalidURI, ConfigurationError, ValueError) as exc:
        raise _Exit(USAGE, f"bad MongoDB URI: {exc}") from None


def _load_bus(spec: str) -> Any:
    """``module:attribute``: a Bus, or a callable returning one."""
    from .bus import Bus

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise _Exit(USAGE, f"--app must look like package.module:bus, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(module_name), attr)
        bus = obj() if callable(obj) and not isinstance(obj, Bus) else obj
    except Exception as exc:  # anything the application's module raises is a bad --app
        raise _Exit(USAGE, f"cannot load --app {spec}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(bus, Bus):
        raise _Exit(
            USAGE,
            f"--app {spec} is not a mongo_events.Bus (or a function returning one), but {type(bus).__name__}",
        )
    return bus


# -- commands ------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.uri, args.orders)


class _PastLimit(Exception):
    """Raised (as a Retry) for changes past ``tail --limit``: left undone, so a resumed tail prints them."""


class _QuietPastLimit(logging.Filter):
    """Drops the dispatcher's "retrying" warning for :class:`_PastLimit`: it is no failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(
            isinstance(arg, _PastLimit) or isinstance(getattr(arg, "__cause__", None), _PastLimit)
            for arg in record.args or ()
        )


def cmd_tail(args: argparse.Namespace) -> int:
    from pymongo.errors import PyMongoError

    from .bus import Bus
    from .errors import Retry

    client = _client(args)
    try:
        client.admin.command("ping")
    except PyMongoError as exc:
        client.close()
        raise _Exit(FAILED, f"cannot reach the server: {exc}") from None
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

    class PastLimit(Retry, _PastLimit):
        pass

    @bus.subscribe(name="tail")
    def show(event: Any) -> None:
        if args.limit and count[0] >= args.limit:
            raise PastLimit(delay=3600)  # leave it undone, so a resumed tail prints it
        sys.stdout.write(event.to_json() + "\n")
        sys.stdout.flush()
        count[0] += 1
        if args.limit and count[0] >= args.limit:
            done.set()

    quiet = _QuietPastLimit()
    logging.getLogger("mongo_events.dispatch").addFilter(quiet)
    previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        bus.start()
        _say(
            f"tailing {bus.namespace}{' as ' + bus.resume_token_key if args.resume_id else ''}; Ctrl-C stops"
        )
        while not done.wait(0.2):
            if bus.error is not None:
                break
        bus.stop(10)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logging.getLogger("mongo_events.dispatch").removeFilter(quiet)
        client.close()
    if bus.error is not None:
        raise _Exit(FAILED, f"bus tail failed: {bus.error}")
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
            _print(
                {
                    "key": doc["_id"],
                    "cluster_time": doc.get("cluster_time"),
                    "updated_at": doc.get("updated_at"),
                    "token": doc.get("token"),
                }
            )
        return OK
    if args.action == "rewind":
        return _rewind(args, coll)
    if not args.yes:
        raise _Exit(
            USAGE,
            f"tokens reset deletes {args.key!r}: the bus then starts from now (or start_from_past). Add --yes to confirm",
        )
    if coll.delete_one({"_id": args.key}).deleted_count == 0:
        raise _Exit(NOT_FOUND, f"no resume token {args.key!r} in {coll.full_name}")
    print(
        f"deleted resume token {args.key!r} from {coll.full_name}; stop the bus before restarting it",
        file=sys.stderr,
    )
    return OK


def _rewind(args: argparse.Namespace, coll: Any) -> int:
    """``tokens rewind``: a dry run (how far back, how many oplog entries follow), or with --yes the rewind."""
    from .errors import ConfigurationError
    from .history import plan_rewind, rewind_token

    try:
        plan = plan_rewind(coll.database.client, args.to)
    except ConfigurationError as exc:
        raise _Exit(FAILED, f"tokens rewind: {exc}") from exc
    keys = (
        [args.key]
        if args.key
        else [doc["_id"] for doc in coll.find({}, projection={"_id": 1}).sort("_id", 1)]
    )
    if not keys:
        raise _Exit(NOT_FOUND, f"no resume tokens in {coll.full_name}: give --key to rewind one")
    _print(
        {
            "keys": keys,
            "to": args.to,
            "cluster_time": plan.to,
            "back": format_duration(timedelta(seconds=round(plan.seconds_back))),
            "oplog_oldest": plan.oldest,
            "oplog_entries_after": plan.entries,
            "oplog_entries_counted_to_cap": plan.capped,
            "applied": bool(args.yes),
        }
    )
    if not args.yes:
        _say(
            f"dry run: {len(keys)} checkpoint(s) would restart {format_duration(timedelta(seconds=round(plan.seconds_back)))} "
            f"back, before {'at least ' if plan.capped else 'about '}{plan.entries} oplog entries (all namespaces). "
            "Stop the bus(es), then add --yes to rewind"
        )
        return OK
    for key in keys:
        coll.update_one(
            {"_id": key},
            {
                "$set": {
                    "token": rewind_token(plan.to),
                    "cluster_time": plan.to,
                    "updated_at": datetime.now(timezone.utc),
                }
            },
            upsert=True,
        )
    _say(
        f"rewound {len(keys)} checkpoint(s) in {coll.full_name} to {plan.to}; stop the bus before restarting it"
    )
    return OK


def cmd_acks(args: argparse.Namespace) -> int:
    from .stores.mongodb import MongoAckStore
    from .stores.records import AckFilter, AckStatus

    store = MongoAckStore(_client(args)[args.db][args.collection], ttl=None)
    if args.action == "stats":
        pending = store.list(AckFilter(status=AckStatus.PENDING, limit=1))
        _print(
            {
                "pending": store.count(AckFilter(status=AckStatus.PENDING)),
                "acked": store.count(AckFilter(status=AckStatus.ACKED)),
                "total": store.count(),
                "oldest_pending": pending[0].created_at if pending else None,
            }
        )
        return OK
    status = AckStatus(args.status) if args.status else None
    for record in store.list(
        AckFilter(status=status, start=args.since, end=args.until, limit=args.limit, offset=args.offset)
    ):
        _print(
            {
                "event_id": record.event_id,
                "status": record.status.value,
                "created_at": record.created_at,
                "acked_at": record.acked_at,
            }
        )
    return OK


def _letter_summary(letter: Any, full: bool = False) -> dict[str, Any]:
    doc = attrs.asdict(letter, recurse=False)
    if not full:
        doc.pop("payload")
    return doc


def _pages(fetch: Callable[[int, int], list[Any]], limit: int | None) -> Iterator[Any]:
    """Every document ``fetch(offset, page_size)`` returns, page by page, at most ``limit``."""
    offset = 0
    while limit is None or offset < limit:
        size = PAGE if limit is None else min(PAGE, limit - offset)
        page = fetch(offset, size)
        yield from page
        offset += len(page)
        if len(page) < size:
            return


class _Progress:
    """Replay progress on stderr: one updating line on a terminal, a line every ``every`` letters otherwise."""

    def __init__(self, total: int, every: int = 100) -> None:
        self.total = total
        self.every = every
        self.tty = sys.stderr.isatty()
        self._last = -math.inf  # the first update shows at once

    def update(self, done: int, counts: dict[str, int]) -> None:
        text = f"replay: {done:,}/{self.total:,} " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        if self.tty:
            if done == self.total or time.monotonic() - self._last >= 0.2:
                self._last = time.monotonic()
                sys.stderr.write("\r" + text + ("\n" if done == self.total else ""))
                sys.stderr.flush()
        elif done % self.every == 0 and done != self.total:
            _say(text)


def cmd_dlq(args: argparse.Namespace) -> int:
    from .deadletters import DeadLetters, ReplayOutcome
    from .stores.mongodb import MongoDeadLetterStore
    from .stores.records import DeadLetterFilter

    store = MongoDeadLetterStore(_client(args)[args.db][args.collection])
    where = store.collection.full_name
    bus = _load_bus(args.app) if getattr(args, "app", None) else None
    letters = DeadLetters(store, bus, max_replay_attempts=getattr(args, "max_attempts", 3))

    def query(limit: int, offset: int) -> DeadLetterFilter:
        return DeadLetterFilter(
            event_name=args.event,
            source=args.source,
            error=args.error,
            exclude_retried=args.exclude_retried or args.action == "replay",
            exclude_quarantined=args.action == "replay",
            limit=limit,
            offset=offset,
        )

    if args.action == "list":
        for letter in letters.list(query(args.limit, args.offset)):
            _print(_letter_summary(letter))
        return OK
    if args.action == "stats":
        _print(attrs.asdict(letters.stats()))
        return OK
    if args.action == "show":
        found = letters.get(args.id)
        if found is None:
            raise _Exit(NOT_FOUND, f"no dead letter {args.id!r} in {where}")
        _print(_letter_summary(found, full=True))
        return OK
    if args.action == "delete":
        found = letters.get(args.id)
        if found is None:
            raise _Exit(NOT_FOUND, f"no dead letter {args.id!r} in {where}")
        if found.retried_at is None and not args.yes:
            raise _Exit(
                USAGE,
                f"dead letter {args.id} was never replayed: its event would be lost. Add --yes to delete it",
            )
        letters.delete(args.id)
        _say(f"deleted dead letter {args.id}")
        return OK
    if args.action == "cleanup":
        return _cleanup(args, letters, where)
    # replay
    assert bus is not None  # --app is required
    errors: dict[str, BaseException | None] = {}
    replay = bus.replay

    def remember(letter: Any) -> Any:  # the error of each failed replay, to print it
        errors[letter.id] = error = replay(letter)
        return error

    bus.replay = remember
    if args.id:
        found = letters.get(args.id)
        if found is None:
            raise _Exit(NOT_FOUND, f"no dead letter {args.id!r} in {where}")
        outcome = letters.replay_one(args.id)
        if errors.get(args.id) is not None:
            _say(f"replay of {args.id} failed: {errors[args.id]!r}")
        if outcome is ReplayOutcome.SKIPPED:
            _say(f"replay of {args.id} skipped: {_skip_reason(found, bus)}")
        _print({"id": args.id, "outcome": outcome.value})
        # As for many letters: a skip (nothing to do, or nothing here can replay it) is said, not a failure.
        return OK if outcome in (ReplayOutcome.REPLAYED, ReplayOutcome.SKIPPED) else FAILED
    # Collect the ids first: replayed letters leave the filter, failed ones stay, so
    # paging while replaying would skip some.
    ids = [letter.id for letter in _pages(lambda offset, size: letters.list(query(size, offset)), args.limit)]
    counts = {outcome.value: 0 for outcome in ReplayOutcome}
    progress = _Progress(len(ids))
    for done, letter_id in enumerate(ids, 1):
        try:
            outcome = letters.replay_one(letter_id)
        except KeyError:  # deleted meanwhile
            outcome = ReplayOutcome.SKIPPED
            _say(f"replay of {letter_id} skipped: it was deleted meanwhile")
        else:
            if outcome is ReplayOutcome.SKIPPED:
                skipped = letters.get(letter_id)
                _say(f"replay of {letter_id} skipped: {_skip_reason(skipped, bus) if skipped else 'deleted'}")
        counts[outcome.value] += 1
        if outcome in (ReplayOutcome.FAILED, ReplayOutcome.QUARANTINED):
            _say(f"replay of {letter_id} {outcome.value}: {errors.get(letter_id)!r}")
        progress.update(done, counts)
    _print(counts)
    _say(
        f"replayed {counts['replayed']:,} of {len(ids):,} dead letters: {counts['failed']:,} failed, "
        f"{counts['quarantined']:,} quarantined, {counts['skipped']:,} skipped"
    )
    return OK if counts["failed"] == 0 and counts["quarantined"] == 0 else FAILED


def _skip_reason(letter: Any, bus: Any) -> str:
    """Why :meth:`DeadLetters.replay_one` skipped ``letter`` (the cases it skips)."""
    if letter.retried_at is not None:
        return "it was already replayed"
    if letter.quarantined_at is not None:
        return "it is quarantined"
    if not bus.has_subscription(letter.event_name):
        return f"bus {bus.name!r} has no subscription {letter.event_name!r} to replay it"
    return "it holds no change document (written by the Go library?)"


def _cleanup(args: argparse.Namespace, letters: Any, where: str) -> int:
    from .stores.records import DeadLetterFilter

    age = format_duration(args.older_than)
    try:
        end = datetime.now(timezone.utc) - args.older_than
    except OverflowError:
        raise _Exit(USAGE, f"--older-than {age} reaches before year 1") from None
    old = DeadLetterFilter(end=end, limit=MAX_LIMIT)
    never = attrs.evolve(old, exclude_retried=True)
    total, unreplayed = letters.count(old), letters.count(never)
    if args.dry_run:
        for letter in _pages(
            lambda offset, size: letters.list(attrs.evolve(old, limit=size, offset=offset)), None
        ):
            _print(_letter_summary(letter))
        _say(
            f"would delete {total:,} dead letters older than {age} from {where} ({unreplayed:,} never replayed)"
        )
        return OK
    if unreplayed and not args.yes:
        raise _Exit(
            USAGE,
            f"{unreplayed:,} of the {total:,} dead letters older than {age} were never replayed: their events would be lost. "
            "Add --yes to delete them, or --dry-run to list them",
        )
    _say(f"deleted {letters.delete_by_filter(old):,} dead letters older than {age} from {where}")
    return OK


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_monitor(args: argparse.Namespace) -> int:
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from .monitor.mongodb import MongoMonitorStore
    from .monitor.status import MongoConsumerStatusStore
    from .monitor.wsgi import wsgi_app
    from .stores.mongodb import MongoAckStore, MongoDeadLetterStore

    basic_auth = None
    if args.basic_auth is not None:
        user, _, secret = args.basic_auth.partition(":")
        if not user or not secret:
            raise _Exit(USAGE, "--basic-auth must be USER:SECRET")
        basic_auth = (user, secret)
    if not _loopback(args.host) and basic_auth is None and not args.read_only:
        raise _Exit(
            USAGE,
            f"refusing to serve the dashboard on {args.host}: anyone who reaches it could replay and delete dead letters. "
            "Add --basic-auth USER:SECRET or --read-only, or keep the default --host 127.0.0.1",
        )
    db = _client(args)[args.db]
    app = wsgi_app(
        MongoMonitorStore(db, collection=args.collection),
        status=MongoConsumerStatusStore(db, args.status_collection),
        dead_letters=MongoDeadLetterStore(db[args.dlq_collection]),
        acks=MongoAckStore(db[args.acks_collection], ttl=None),
        basic_auth=basic_auth,
        read_only=args.read_only,
    )

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *a: Any) -> None:
            logging.getLogger("mongo_events.monitor").info(format, *a)

    try:
        server = make_server(args.host, args.port, app, handler_class=Quiet)
    except OSError as exc:  # a port in use, a host that does not resolve or is not ours
        raise _Exit(USAGE, f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    url = f"http://{args.host}:{server.server_port}"
    _say(f"dashboard on {url}/ and monitor API on {url}/v1/monitor/entries; Ctrl-C stops")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.serve_forever, name="mongo-events-monitor-http", daemon=True)
    thread.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return OK


def cmd_status(args: argparse.Namespace) -> int:
    """Per checkpoint key: the stored position, its age, the oplog headroom; pending acks and dead letters."""
    from pymongo.errors import OperationFailure

    from .health import token_time
    from .stores.mongodb import DEFAULT_COLLECTION

    client = _client(args)
    db = client[args.db]
    now = datetime.now(timezone.utc)
    try:
        oldest = client["local"]["oplog.rs"].find_one({}, sort=[("$natural", 1)], projection={"ts": 1})
    except OperationFailure as exc:  # no privilege on local, or a mongos
        logging.getLogger(__name__).info("cannot read local.oplog.rs (%s): no oplog headroom", exc)
        oldest = None
    oplog_start = oldest["ts"].time if oldest else None
    dlq = db[args.dlq_collection]
    rows = []
    for doc in db[args.collection or DEFAULT_COLLECTION].find({}).sort("_id", 1):
        cluster_time = doc.get("cluster_time")
        seconds = cluster_time.time if cluster_time is not None else token_time(doc.get("token"))
        position = datetime.fromtimestamp(seconds, timezone.utc) if seconds is not None else None
        rows.append(
            {
                "key": doc["_id"],
                "position": position,
                "age": (now - position) if position else None,
                "oplog_headroom": timedelta(seconds=seconds - oplog_start)
                if seconds is not None and oplog_start is not None
                else None,
                "updated_at": doc.get("updated_at"),
                "dead_letters": dlq.count_documents(
                    {"metadata.resume_token_key": doc["_id"], "retried_at": None}
                ),
            }
        )
    acks = db[args.acks_collection]
    totals = {
        "pending_acks": acks.count_documents(
            {"acked_at": {"$in": [None, GO_ZERO_TIME]}}
        ),  # Go writes zero time
        "dead_letters": dlq.count_documents({"retried_at": None}),
    }
    if args.json:
        for row in rows:
            _print(
                {
                    **row,
                    **{k: row[k].total_seconds() for k in ("age", "oplog_headroom") if row[k] is not None},
                }
            )
        _print({"totals": totals})
        return OK
    header = ("KEY", "POSITION", "AGE", "OPLOG HEADROOM", "DEAD LETTERS")
    table = [header] + [
        (
            str(row["key"]),
            row["position"].strftime("%Y-%m-%dT%H:%M:%SZ") if row["position"] else "-",
            format_duration(row["age"]) if row["age"] is not None else "-",
            format_duration(row["oplog_headroom"]) if row["oplog_headroom"] is not None else "-",
            str(row["dead_letters"]),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        sys.stdout.write(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() + "\n"
        )
    sys.stdout.write(
        f"\npending acks: {totals['pending_acks']:,}; dead letters not replayed: {totals['dead_letters']:,}\n"
    )
    if not rows:
        _say(f"no checkpoints in {db.name}.{args.collection or DEFAULT_COLLECTION}")
    return OK


# -- the parser -------------------------------------------------------------------------------

_LIMIT = _int(1, MAX_LIMIT)
_OFFSET = _int(0, 2**31 - 1)


def _store_args(parser: argparse.ArgumentParser, collection: str | None) -> None:
    parser.add_argument("--uri", help="MongoDB URI (default: MONGODB_URI)")
    parser.add_argument("--db", required=True, help="the database holding the store")
    parser.add_argument(
        "--collection", default=collection, help=f"the store's collection (default: {collection})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mongo-events",
        description="Reliable callbacks from MongoDB change streams.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage error, 4 not found.",
    )
    parser.add_argument("--version", action="version", version=f"mongo-events {__version__}")
    level = parser.add_mutually_exclusive_group()
    level.add_argument(
        "-v", "--verbose", action="store_true", help="log at DEBUG level to stderr (default INFO)"
    )
    level.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run a bus against MONGODB_URI or a built-in fake replica set")
    demo.add_argument("--uri", help="a replica set to use (default: MONGODB_URI, else the fake)")
    demo.add_argument(
        "--orders", type=_int(1, 100_000), default=5, help="how many orders to write (default 5)"
    )
    demo.set_defaults(run=cmd_demo)

    tail = commands.add_parser("tail", help="print each change as one line of relaxed Extended JSON")
    tail.add_argument(
        "uri_arg", nargs="?", metavar="URI", help="MongoDB URI of a replica set (or --uri, or MONGODB_URI)"
    )
    tail.add_argument("--uri", help="MongoDB URI (default: MONGODB_URI)")
    tail.add_argument("--db", required=True, help="database to watch")
    tail.add_argument("--collection", help="collection to watch (default: the whole database)")
    tail.add_argument(
        "--full-document",
        choices=["default", "updateLookup", "whenAvailable", "required"],
        help="the stream's fullDocument option",
    )
    tail.add_argument(
        "--pipeline", help='extra stages as a JSON array, e.g. \'[{"$match": {"operationType": "insert"}}]\''
    )
    tail.add_argument("--resume-id", help="store the position under this id and resume from it next time")
    tail.add_argument(
        "--limit", type=_int(1, 2**31 - 1), help="exit after this many changes (default: until Ctrl-C)"
    )
    tail.set_defaults(run=cmd_tail)

    tokens = commands.add_parser("tokens", help="show, reset or rewind stored resume tokens").add_subparsers(
        dest="action", required=True
    )
    show = tokens.add_parser("show", help="print stored resume tokens")
    _store_args(show, None)
    show.add_argument("--key", help='one key, e.g. "shop.orders:worker-1" (default: all)')
    reset = tokens.add_parser("reset", help="delete one stored resume token (stop its bus first)")
    _store_args(reset, None)
    reset.add_argument("--key", required=True, help='the key, e.g. "shop.orders:worker-1"')
    reset.add_argument("--yes", action="store_true", help="confirm")
    rewind = tokens.add_parser(
        "rewind", help="restart checkpoints at a past time (startAtOperationTime); a dry run without --yes"
    )
    _store_args(rewind, None)
    rewind.add_argument("--to", required=True, type=_time, help="RFC 3339 time, e.g. 2026-12-01T10:00:00Z")
    rewind.add_argument("--key", help='one key, e.g. "shop.orders:worker-1" (default: every stored key)')
    rewind.add_argument("--yes", action="store_true", help="apply (without it: print what would happen)")
    for p in (show, reset, rewind):
        p.set_defaults(run=cmd_tokens)

    acks = commands.add_parser("acks", help="inspect the ack store").add_subparsers(
        dest="action", required=True
    )
    stats = acks.add_parser("stats", help="pending, acked and total counts, oldest pending")
    _store_args(stats, "_event_acks")
    lst = acks.add_parser("list", help="list ack records, oldest first")
    _store_args(lst, "_event_acks")
    lst.add_argument("--status", choices=["pending", "acked"])
    lst.add_argument("--since", type=_time, help="created at or after (ISO 8601)")
    lst.add_argument("--until", type=_time, help="created before (ISO 8601)")
    lst.add_argument("--limit", type=_LIMIT, default=100, help=f"1 to {MAX_LIMIT:,} (default 100)")
    lst.add_argument("--offset", type=_OFFSET, default=0)
    for p in (stats, lst):
        p.set_defaults(run=cmd_acks)

    dlq = commands.add_parser("dlq", help="inspect, replay and clean up dead letters").add_subparsers(
        dest="action", required=True
    )
    d_list = dlq.add_parser("list", help="list dead letters (without payloads)")
    d_stats = dlq.add_parser("stats", help="totals by event and error, pending, retried, quarantined")
    d_show = dlq.add_parser("show", help="one dead letter, with its payload")
    d_show.add_argument("id")
    d_replay = dlq.add_parser("replay", help="deliver every matching dead letter again through the app's bus")
    d_replay.add_argument(
        "--app", required=True, help="package.module:bus (a Bus, or a function returning one)"
    )
    d_replay.add_argument("--id", help="replay this letter only")
    d_replay.add_argument(
        "--max-attempts", type=_int(1, 1000), default=3, help="failed replays before quarantine (default 3)"
    )
    d_replay.add_argument(
        "--limit", type=_int(1, 2**31 - 1), help="replay at most this many (default: all that match)"
    )
    d_delete = dlq.add_parser("delete", help="delete one dead letter")
    d_delete.add_argument("id")
    d_delete.add_argument("--yes", action="store_true", help="confirm deleting a letter never replayed")
    d_cleanup = dlq.add_parser("cleanup", help="delete dead letters older than a duration")
    d_cleanup.add_argument("--older-than", type=_duration, required=True, help="e.g. 30d, 12h")
    confirm = d_cleanup.add_mutually_exclusive_group()
    confirm.add_argument("--yes", action="store_true", help="confirm deleting letters never replayed")
    confirm.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    for p in (d_list, d_replay):
        p.add_argument("--event", help="subscription name")
        p.add_argument("--source", help="bus name")
        p.add_argument("--error", help="error substring")
    d_list.add_argument("--limit", type=_LIMIT, default=100, help=f"1 to {MAX_LIMIT:,} (default 100)")
    d_list.add_argument("--offset", type=_OFFSET, default=0)
    d_list.add_argument("--exclude-retried", action="store_true")
    d_replay.set_defaults(exclude_retried=True)
    for p in (d_list, d_stats, d_show, d_replay, d_delete, d_cleanup):
        _store_args(p, "event_dlq")
        p.set_defaults(run=cmd_dlq)

    status = commands.add_parser(
        "status", help="per checkpoint: position, age, oplog headroom; pending acks, dead letters"
    )
    _store_args(status, None)
    status.add_argument(
        "--acks-collection", default="_event_acks", help="the ack store's collection (default: _event_acks)"
    )
    status.add_argument(
        "--dlq-collection", default="event_dlq", help="the dead letters' collection (default: event_dlq)"
    )
    status.add_argument(
        "--json", action="store_true", help="one JSON document per checkpoint, then the totals"
    )
    status.set_defaults(run=cmd_status)

    monitor = commands.add_parser("monitor", help="the monitor HTTP API").add_subparsers(
        dest="action", required=True
    )
    serve = monitor.add_parser("serve", help="serve the dashboard and the monitor API on a local port")
    _store_args(serve, "monitor_entries")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; another needs --basic-auth or --read-only)",
    )
    serve.add_argument("--basic-auth", metavar="USER:SECRET", help="require HTTP basic authentication")
    serve.add_argument(
        "--read-only", action="store_true", help="hide and refuse every write (replay, delete)"
    )
    serve.add_argument(
        "--status-collection",
        default="_event_consumers",
        help="where consumers publish their status (default: _event_consumers)",
    )
    serve.add_argument("--dlq-collection", default="event_dlq", help="the dead letters (default: event_dlq)")
    serve.add_argument(
        "--acks-collection", default="_event_acks", help="the ack records (default: _event_acks)"
    )
    serve.add_argument("--port", type=_int(0, 65535), default=8080, help="0 picks a free port")
    serve.set_defaults(run=cmd_monitor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (0 ok, 1 failure, 2 usage, 4 not found)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "uri_arg", None):
        args.uri = args.uri or args.uri_arg
    ensure_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    from pymongo.errors import PyMongoError

    from .errors import MongoEventsError

    try:
        code: int = args.run(args)
    except _Exit as exc:
        _say(f"mongo-events: {exc}")
        return exc.code
    except (PyMongoError, MongoEventsError) as exc:
        _say(f"mongo-events: {exc}")
        return FAILED
    except BrokenPipeError:
        return _broken_pipe()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _broken_pipe()
    return code


def _broken_pipe() -> int:
    """The reader of stdout went away (``| head``): end quietly, as ``cat`` would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
    except (OSError, ValueError):  # pragma: no cover - stdout is not a file
        pass
    return BROKEN_PIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
