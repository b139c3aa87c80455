"""Command handling for the fake replica set, with data kept in mongomock.

Every write goes through :meth:`Backend._record`, which appends an oplog entry
and, with a data directory, a journal record; restarting from the journal
rebuilds both the data and the oplog.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import logging
import os
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bson
import mongomock as _mongomock
from bson.binary import Binary
from bson.int64 import Int64

from . import expressions as _expressions
from .changestream import ChangeCursor, open_change_stream
from .errors import CommandError, server_labels
from .failpoints import FailPoints
from .oplog import Entry, Oplog, update_description
from .transactions import Transactions, txn_key

# mongomock's partial stubs do not describe what the fake uses; treat it as untyped.
mongomock: Any = _mongomock

__all__ = ["Backend"]

log = logging.getLogger(__name__)

Handler = Callable[["Backend", dict[str, Any]], dict[str, Any]]

_ID_TYPES = (str, int, float, bson.ObjectId)


def _install_id_fast_path() -> None:
    """Look documents up by ``_id`` directly instead of scanning (mongomock scans for every query).

    Also runs mongomock's TTL expiry at most once a second instead of on every access.

    Only filters that are exactly ``{"_id": <str | int | float | ObjectId>}`` take the fast
    path; the result is the same as the scan, in O(1) instead of O(n).
    """
    collection_cls = mongomock.collection.Collection
    if getattr(collection_cls, "_mongo_events_fast_path", False):
        return
    scan = collection_cls._iter_documents

    def _iter_documents(self: Any, filter: Any) -> Any:
        if isinstance(filter, dict) and len(filter) == 1 and "_id" in filter:
            value = filter["_id"]
            if isinstance(value, _ID_TYPES) and not isinstance(value, bool):
                try:
                    return iter([self._store[value]])
                except KeyError:
                    return iter([])
        return scan(self, filter)

    collection_cls._iter_documents = _iter_documents
    collection_cls._mongo_events_fast_path = True

    # mongomock expires TTL-indexed documents by scanning the whole collection on every
    # access, which makes each write O(n). A real server's TTL monitor runs once a minute;
    # once a second keeps the behaviour observable and the cost flat.
    store_cls = mongomock.store.CollectionStore
    expire = store_cls._remove_expired_documents

    def _remove_expired_documents(self: Any) -> None:
        now = time.monotonic()
        if now - getattr(self, "_mongo_events_expired_at", -_TTL_MONITOR_INTERVAL) >= _TTL_MONITOR_INTERVAL:
            self._mongo_events_expired_at = now
            expire(self)

    store_cls._remove_expired_documents = _remove_expired_documents

    # mongomock checks a unique index by querying the whole collection for every insert
    # and update, so writes into a collection with one (the monitor's) are O(n). Keep a
    # hash of key -> _ids per index instead, and verify candidates against the stored
    # documents, so removed or changed documents never count (entries go stale harmlessly).
    check_uniques = collection_cls._ensure_uniques

    def _ensure_uniques(self: Any, new_data: Any) -> None:
        store = self._store
        slow = {}
        for name, index in store.indexes.items():
            if not index.get("unique"):
                continue
            fields = tuple(key for key, _ in index.get("key"))
            if fields == ("_id",) or index.get("sparse") or index.get("partialFilterExpression") is not None:
                slow[name] = index  # _id is unique by the store itself; the others are rare
                continue
            key = _unique_key(new_data, fields)
            if key is None:
                slow[name] = index
                continue
            by_key = _unique_map(store, name, fields)
            ids = by_key.setdefault(key, set())
            ids.add(_store_id(new_data["_id"]))
            live = {
                i for i in ids if i in store._documents and _unique_key(store._documents[i], fields) == key
            }
            by_key[key] = live
            if len(live) > 1:
                raise mongomock.DuplicateKeyError("E11000 Duplicate Key Error", 11000)
        if slow:
            saved = store.indexes
            store.indexes = slow
            try:
                check_uniques(self, new_data)
            finally:
                store.indexes = saved

    collection_cls._ensure_uniques = _ensure_uniques


def _store_id(value: Any) -> Any:
    return mongomock.helpers.hashdict(value) if isinstance(value, dict) else value


def _unique_key(doc: Any, fields: tuple[str, ...]) -> tuple[Any, ...] | None:
    """The index key of ``doc``, or None when a value is not hashable (then scan)."""
    values = []
    for field_name in fields:
        try:
            value = mongomock.helpers.get_value_by_dot(doc, field_name)
        except KeyError:
            value = None
        if isinstance(value, (dict, list)):
            return None
        values.append(value)
    try:
        hash(tuple(values))
    except TypeError:
        return None
    return tuple(values)


def _unique_map(store: Any, name: str, fields: tuple[str, ...]) -> dict[tuple[Any, ...], set[Any]]:
    maps: dict[Any, dict[tuple[Any, ...], set[Any]]] = store.__dict__.setdefault("_mongo_events_unique", {})
    by_key = maps.get((name, fields))
    if by_key is None:
        by_key = {}
        for doc_id, doc in store._documents.items():
            key = _unique_key(doc, fields)
            if key is not None:
                by_key.setdefault(key, set()).add(doc_id)
        maps[(name, fields)] = by_key
    return by_key


_TTL_MONITOR_INTERVAL = 1.0
_install_id_fast_path()
_expressions.install()  # $$NOW, $toHashedIndexKey and the server's $mod (consumer groups)
_HANDLERS: dict[str, Handler] = {}
_ALIASES = {
    "ismaster": "hello",
    "isMaster": "hello",
    "findandmodify": "findAndModify",
    "buildinfo": "buildInfo",
}


def command(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            _HANDLERS[name] = fn
        return fn

    return register


_IMAGE_OPS = frozenset({"update", "replace", "delete"})


def new_uuid() -> Binary:
    """A collection UUID as the server sends it (BSON binary, subtype 4)."""
    value: Binary = Binary(uuid.uuid4().bytes, 4)
    return value


@dataclass
class _CollectionInfo:
    uuid: Any
    options: dict[str, Any]

    @property
    def images(self) -> bool:
        return bool((self.options.get("changeStreamPreAndPostImages") or {}).get("enabled"))


@dataclass
class _FindCursor:
    ns: str
    docs: list[dict[str, Any]]


class Backend:
    """State and command handlers behind the wire server. Thread-safe."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        oplog_size: int = 100_000,
        data_dir: str | None = None,
        standalone: bool = False,
        set_name: str = "rs0",
        max_event_size: int | None = None,
        supports_split: bool = True,
        test_commands: bool = True,
    ) -> None:
        self.host = host
        #: Answer ``configureFailPoint`` (``enableTestCommands``).
        self.test_commands = test_commands
        self.fail_points = FailPoints()
        #: Open client connections (the wire server sets this; ``serverStatus`` reports it).
        self.connection_count: Callable[[], int] = lambda: 0
        self.started = time.monotonic()
        self.port = port
        self.set_name = set_name
        self.standalone = standalone
        #: Change events larger than this answer 10334 unless split (None: no check).
        self.max_event_size = max_event_size
        self.supports_split = supports_split
        self.client = mongomock.MongoClient()
        self.oplog = Oplog(max_entries=oplog_size)
        self.lock = self.oplog.changed  # one lock for data, oplog and cursors
        self.cursors: dict[int, ChangeCursor | _FindCursor] = {}
        #: (db, collection) -> UUID and options, kept in step with the oplog (see ``_catalog``).
        self.collections: dict[tuple[str, str], _CollectionInfo] = {}
        self._cursor_ids = itertools.count(1_000_001)
        self.counters: Counter[str] = Counter()
        self.stopping = False
        self.step_down_until = 0.0
        #: Inserts of open transactions, applied at commit (see transactions.py).
        self.transactions = Transactions(self._apply_txn_insert)
        self._journal = None
        if data_dir is not None:
            os.makedirs(data_dir, exist_ok=True)
            path = os.path.join(data_dir, "journal.bson")
            if os.path.exists(path):
                self._replay(path)
            self._journal = open(path, "ab")  # noqa: SIM115 - lives as long as the backend

    # -- journal -------------------------------------------------------

    def _replay(self, path: str) -> None:
        with open(path, "rb") as fh:
            data = fh.read()
        for record in bson.decode_all(_complete_records(data)):
            kind = record.pop("k")
            if kind == "op":
                entry = Entry.from_doc(record)
                self._apply_entry(entry)
                self._catalog(entry)
                self.oplog.append(entry)
            elif kind == "index":  # journals written before createIndexes was an oplog entry
                self._create_index(record["db"], record["coll"], record["spec"])

    def _journal_write(self, record: dict[str, Any]) -> None:
        if self._journal is not None:
            self._journal.write(bson.encode(record))
            self._journal.flush()

    def _apply_entry(self, entry: Entry) -> None:
        """Re-apply a journalled entry to the data (used at restart)."""
        if entry.op in ("insert", "update", "replace") and (entry.db, entry.coll) not in self.collections:
            self._catalog(
                Entry(entry.ts, entry.wall, "create", entry.db, entry.coll, uuid=new_uuid())
            )  # an older journal
        if entry.op == "create" and entry.coll not in self.client[entry.db].list_collection_names():
            self.client[entry.db].create_collection(entry.coll or "")
        elif entry.op == "createIndexes":
            for spec in (entry.description or {}).get("indexes", []):
                self._create_index(entry.db, entry.coll or "", spec)
        elif entry.op == "dropIndexes":
            for spec in (entry.description or {}).get("indexes", []):
                self.client[entry.db][entry.coll or ""].drop_index(spec["name"])
        elif entry.op in ("insert", "update", "replace") and entry.post is not None:
            self.client[entry.db][entry.coll or ""].replace_one(
                {"_id": entry.post["_id"]}, entry.post, upsert=True
            )
        elif entry.op == "delete":
            self.client[entry.db][entry.coll or ""].delete_one(entry.document_key or {})
        elif entry.op == "drop":
            self.client[entry.db].drop_collection(entry.coll or "")
        elif entry.op == "rename" and entry.to is not None:
            self.client[entry.db][entry.coll or ""].rename(entry.to["coll"], dropTarget=True)
        elif entry.op == "dropDatabase":
            self.client.drop_database(entry.db)

    def _record(
        self, op: str, db: str, coll: str | None, session: dict[str, Any] | None = None, **fields: Any
    ) -> Entry:
        entry = Entry(ts=self.oplog.next_ts(), wall=_now(), op=op, db=db, coll=coll, **fields)
        if session is not None:
            entry.lsid, entry.txn_number = session["lsid"], session["txnNumber"]
        if coll is not None and entry.uuid is None:
            info = self.collections.get((db, coll))
            if info is not None:
                entry.uuid = info.uuid
                if info.images and op in _IMAGE_OPS:
                    entry.images = True
        self._catalog(entry)
        self.oplog.append(entry)
        self._journal_write({"k": "op", **entry.to_doc()})
        self.oplog.changed.notify_all()
        return entry

    def _catalog(self, entry: Entry) -> None:
        """Keep the collection catalog (UUIDs, options) in step with a DDL entry."""
        op, key = entry.op, (entry.db, entry.coll or "")
        if op == "create":
            options = {k: v for k, v in (entry.description or {}).items() if k != "idIndex"}
            self.collections[key] = _CollectionInfo(entry.uuid, options)
        elif op == "modify":
            info = self.collections.get(key)
            if info is not None:
                info.options.update(entry.description or {})
        elif op == "drop":
            self.collections.pop(key, None)
        elif op == "rename" and entry.to is not None:
            info = self.collections.pop(key, None)
            if info is not None:
                self.collections[(entry.to["db"], entry.to["coll"])] = info
        elif op == "dropDatabase":
            for k in [k for k in self.collections if k[0] == entry.db]:
                del self.collections[k]

    def ensure_collection(
        self, db: str, coll: str, options: dict[str, Any] | None = None, session: dict[str, Any] | None = None
    ) -> None:
        """Create ``db.coll`` if it does not exist (explicitly, or implicitly by a first write), with its ``create`` entry."""
        if (db, coll) in self.collections:
            return
        if coll not in self.client[db].list_collection_names():
            self.client[db].create_collection(coll)
        description = {"idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}, **(options or {})}
        self._record("create", db, coll, session, uuid=new_uuid(), description=description)

    def close(self) -> None:
        """Wake every waiting getMore and close the journal; bounded even if a command holds the lock."""
        self.stopping = True
        if not self.lock.acquire(timeout=1.0):
            log.warning(
                "the fake replica set is stopping while a command still holds its lock; the journal stays open"
            )
            return
        try:
            self.lock.notify_all()
            if self._journal is not None:
                self._journal.close()
                self._journal = None
        finally:
            self.lock.release()

    # -- dispatch ------------------------------------------------------

    def handle(self, body: dict[str, Any]) -> dict[str, Any]:
        name = next(iter(body))
        name = _ALIASES.get(name, name)
        self.counters[name] += 1
        handler = _HANDLERS.get(name)
        try:
            if handler is None:
                raise CommandError(
                    59,
                    "CommandNotFound",
                    f"no such command: '{name}' (the fake replica set does not implement it)",
                )
            with _expressions.one_clock():  # one $$NOW per command, as on a server
                key = txn_key(body)
                if key is not None:
                    with self.lock:
                        self.transactions.before(name, key)
                reply = handler(self, body)
        except CommandError as exc:
            reply = exc.to_reply()
            if exc.labels is None:
                labels = server_labels(name, body, exc.code)
                if labels:
                    reply["errorLabels"] = labels
        except mongomock.OperationFailure as exc:
            reply = CommandError(exc.code or 2, "BadValue", str(exc)).to_reply()
        except NotImplementedError as exc:
            reply = CommandError(
                115, "CommandNotSupported", f"the fake replica set cannot do this: {exc}"
            ).to_reply()
        except (
            Exception
        ) as exc:  # a bug in the fake: answer it, so a test fails loudly instead of reconnecting
            log.exception("the fake replica set failed on %s", name)
            reply = CommandError(1, "InternalError", f"fake replica set bug on {name}: {exc!r}").to_reply()
        return self.finish(reply)

    def finish(self, reply: dict[str, Any]) -> dict[str, Any]:
        """Add ``ok``, ``operationTime`` and ``$clusterTime`` as a replica-set member does."""
        reply.setdefault("ok", 1.0)
        ts = self.oplog.last
        reply["operationTime"] = ts
        reply["$clusterTime"] = {
            "clusterTime": ts,
            "signature": {"hash": bson.Binary(b"\x00" * 20), "keyId": Int64(0)},
        }
        return reply

    def hello_reply(self, stepped_down: bool) -> dict[str, Any]:
        me = f"{self.host}:{self.port}"
        reply: dict[str, Any] = {
            "helloOk": True,
            "isWritablePrimary": not stepped_down,
            "ismaster": not stepped_down,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "localTime": _now(),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": 1,
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "readOnly": False,
        }
        if not self.standalone:
            reply.update(setName=self.set_name, setVersion=1, hosts=[me], me=me, secondary=stepped_down)
            if not stepped_down:
                reply["primary"] = me
            reply["electionId"] = bson.ObjectId("7fffffff0000000000000001")
            reply["lastWrite"] = {"opTime": {"ts": self.oplog.last, "t": Int64(1)}, "lastWriteDate": _now()}
        return reply

    def _apply_txn_insert(self, session: dict[str, Any], db: str, coll: str, doc: dict[str, Any]) -> None:
        """Insert one document of a committing transaction (the lock is held)."""
        collection = self.client[db][coll]
        self.ensure_collection(db, coll)
        collection.insert_one(doc)
        found = _by_id(collection, {"_id": doc["_id"]})
        stored = found[0] if found else collection.find_one({"_id": doc["_id"]})
        self._record("insert", db, coll, session, document_key={"_id": doc["_id"]}, post=stored)

    def new_cursor_id(self) -> int:
        return next(self._cursor_ids)

    def lookup(self, db: str, coll: str, key: dict[str, Any]) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = self.client[db][coll].find_one(key)
        return doc

    def _create_index(self, db: str, coll: str, spec: dict[str, Any]) -> None:
        keys = list(spec["key"].items())
        options = {k: v for k, v in spec.items() if k not in ("key", "v", "ns")}
        self.client[db][coll].create_index(keys, **options)


def _complete_records(data: bytes) -> bytes:
    """The journal up to its last complete record (a process killed mid-write leaves a torn tail)."""
    end = pos = 0
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<i", data, pos)
        if size < 5 or pos + size > len(data):
            break
        pos += size
        end = pos
    return data[:end]


def _now() -> datetime.datetime:
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _txn(body: dict[str, Any]) -> dict[str, Any] | None:
    """Session info for change events: only writes inside a multi-document transaction carry it."""
    if body.get("autocommit") is False and "lsid" in body and "txnNumber" in body:
        return {"lsid": body["lsid"], "txnNumber": body["txnNumber"]}
    return None


def _coll(backend: Backend, body: dict[str, Any], name: str) -> Any:
    return backend.client[body["$db"]][body[name]]


# -- handshake and admin --------------------------------------------------


@command("hello")
def _hello(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    import time

    return backend.hello_reply(time.monotonic() < backend.step_down_until)


@command("ping", "refreshSessions")
def _ok(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    return {}


@command("endSessions")
def _end_sessions(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    with backend.lock:
        backend.transactions.end_sessions([bytes(s["id"]) for s in body.get("endSessions") or []])
    return {}


@command("commitTransaction")
def _commit(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    with backend.lock:
        backend.transactions.commit(txn_key(body))
    return {}


@command("abortTransaction")
def _abort(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    with backend.lock:
        if backend.transactions.abort(txn_key(body)):
            return {}
    log.error(  # pymongo's abort_transaction() ignores the error below: say it here too
        "the fake replica set cannot roll back a transaction that did more than insert: its writes stay"
    )
    raise CommandError(
        263,
        "OperationNotSupportedInTransaction",
        "the fake replica set rolls back only transactions that inserted and did nothing else "
        "(it applied this one's writes at once)",
    )


@command("buildInfo")
def _build_info(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "7.0.0",
        "versionArray": [7, 0, 0, 0],
        "gitVersion": "fake",
        "maxBsonObjectSize": 16 * 1024 * 1024,
        "modules": ["mongo-events-fake"],
    }


# -- test commands and diagnostics ---------------------------------------------


@command("configureFailPoint")
def _configure_fail_point(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    if not backend.test_commands:
        raise CommandError(
            59,
            "CommandNotFound",
            "no such command: 'configureFailPoint' (start the server with test commands enabled)",
        )
    if body.get("$db") != "admin":
        raise CommandError(
            13, "Unauthorized", "configureFailPoint may only be run against the admin database."
        )
    return backend.fail_points.configure(body)


@command("waitForFailPoint")
def _wait_for_fail_point(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    if not backend.test_commands:
        raise CommandError(
            59,
            "CommandNotFound",
            "no such command: 'waitForFailPoint' (start the server with test commands enabled)",
        )
    return backend.fail_points.wait(body)


def _parameters(backend: Backend) -> dict[str, Any]:
    return {"enableTestCommands": backend.test_commands, "featureCompatibilityVersion": {"version": "7.0"}}


@command("getParameter")
def _get_parameter(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    params = _parameters(backend)
    if body.get("getParameter") == "*":
        return params
    wanted = [
        k
        for k in body
        if k not in ("getParameter", "$db", "lsid", "$clusterTime", "$readPreference", "comment")
    ]
    reply = {k: params[k] for k in wanted if k in params}
    if not reply:
        raise CommandError(72, "InvalidOptions", "no option found to get")
    return reply


@command("getCmdLineOpts")
def _get_cmd_line_opts(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    argv = ["mongod", "--bind_ip", backend.host, "--port", str(backend.port)]
    parsed: dict[str, Any] = {"net": {"bindIp": backend.host, "port": backend.port}}
    if not backend.standalone:
        argv += ["--replSet", backend.set_name]
        parsed["replication"] = {"replSet": backend.set_name}
    if backend.test_commands:
        argv += ["--setParameter", "enableTestCommands=1"]
        parsed["setParameter"] = {"enableTestCommands": "1"}
    return {"argv": argv, "parsed": parsed}


@command("serverStatus")
def _server_status(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    uptime = time.monotonic() - backend.started
    reply: dict[str, Any] = {
        "host": f"{backend.host}:{backend.port}",
        "version": "7.0.0",
        "process": "mongod",
        "pid": Int64(os.getpid()),
        "uptime": float(int(uptime)),
        "uptimeMillis": Int64(int(uptime * 1000)),
        "localTime": _now(),
        "connections": {"current": backend.connection_count(), "available": 1000},
    }
    if not backend.standalone:
        me = f"{backend.host}:{backend.port}"
        reply["repl"] = {
            "setName": backend.set_name,
            "isWritablePrimary": time.monotonic() >= backend.step_down_until,
            "hosts": [me],
            "primary": me,
            "me": me,
        }
    return reply


@command("killCursors")
def _kill_cursors(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    killed = []
    with backend.lock:
        for cid in body.get("cursors", []):
            if backend.cursors.pop(int(cid), None) is not None:
                killed.append(cid)
    return {"cursorsKilled": killed, "cursorsNotFound": [], "cursorsAlive": [], "cursorsUnknown": []}


@command("listDatabases")
def _list_databases(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    with backend.lock:
        names = backend.client.list_database_names()
    dbs = [{"name": n, "sizeOnDisk": 1, "empty": False} for n in sorted(names)]
    if body.get("nameOnly"):
        dbs = [{"name": d["name"]} for d in dbs]
    return {"databases": dbs, "totalSize": len(dbs)}


@command("listCollections")
def _list_collections(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    with backend.lock:
        db = backend.client[body["$db"]]
        names = db.list_collection_names()
        docs = []
        for n in sorted(names):
            info = backend.collections.get((body["$db"], n))
            options = dict(info.options) if info is not None else {}
            details: dict[str, Any] = {"readOnly": False}
            if info is not None:
                details["uuid"] = info.uuid
            docs.append(
                {
                    "name": n,
                    "type": "collection",
                    "options": options,
                    "info": details,
                    "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"},
                }
            )
        flt = body.get("filter") or {}
        docs = [d for d in docs if mongomock.filtering.filter_applies(flt, d)]
    return {"cursor": {"id": Int64(0), "ns": f"{body['$db']}.$cmd.listCollections", "firstBatch": docs}}


#: Collection options ``create`` and ``collMod`` keep (and ``listCollections`` reports); the fake enforces only
#: ``changeStreamPreAndPostImages``.
_COLLECTION_OPTIONS = (
    "changeStreamPreAndPostImages",
    "validator",
    "validationLevel",
    "validationAction",
    "capped",
    "size",
    "max",
    "expireAfterSeconds",
    "collation",
    "timeseries",
    "clusteredIndex",
)


def _images_option(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {"enabled"} or not isinstance(value["enabled"], bool):
        raise CommandError(
            40414 if isinstance(value, dict) and "enabled" not in value else 2,
            "BadValue",
            "changeStreamPreAndPostImages must be {enabled: <bool>}",
        )
    return {"enabled": value["enabled"]}


@command("create")
def _create(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    options = {k: body[k] for k in _COLLECTION_OPTIONS if k in body}
    if "changeStreamPreAndPostImages" in options:
        options["changeStreamPreAndPostImages"] = _images_option(options["changeStreamPreAndPostImages"])
    with backend.lock:
        db = backend.client[body["$db"]]
        if body["create"] in db.list_collection_names():
            raise CommandError(
                48, "NamespaceExists", f"Collection {body['$db']}.{body['create']} already exists."
            )
        backend.ensure_collection(body["$db"], body["create"], options)
    return {}


@command("collMod")
def _coll_mod(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    db, name = body["$db"], body["collMod"]
    changes = {k: body[k] for k in _COLLECTION_OPTIONS if k in body}
    if "changeStreamPreAndPostImages" in changes:
        changes["changeStreamPreAndPostImages"] = _images_option(changes["changeStreamPreAndPostImages"])
    with backend.lock:
        info = backend.collections.get((db, name))
        if info is None:
            raise CommandError(26, "NamespaceNotFound", f"ns does not exist: {db}.{name}")
        before = {"uuid": info.uuid, **info.options}
        backend._record("modify", db, name, description=changes, state_before={"collectionOptions": before})
    return {}


@command("mongoEventsFake")
def _fake_control(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    """Test-only control command; the server layer handles faults before dispatch."""
    with backend.lock:
        return {"counters": dict(backend.counters)}


# -- writes -----------------------------------------------------------------


@command("insert")
def _insert(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    coll = _coll(backend, body, "insert")
    n, errors = 0, []
    key = txn_key(body)
    with backend.lock:
        if backend.transactions.buffers(key):
            return _buffer_inserts(backend, coll, body)
        backend.ensure_collection(coll.database.name, coll.name)
        for i, given in enumerate(body.get("documents", [])):
            doc = dict(given)
            doc.setdefault("_id", bson.ObjectId())
            try:
                coll.insert_one(doc)
            except mongomock.DuplicateKeyError as exc:
                errors.append({"index": i, "code": 11000, "errmsg": str(exc)})
                if body.get("ordered", True):
                    break
                continue
            n += 1
            found = _by_id(coll, {"_id": doc["_id"]})
            stored = found[0] if found else coll.find_one({"_id": doc["_id"]})
            backend._record(
                "insert",
                coll.database.name,
                coll.name,
                _txn(body),
                document_key={"_id": doc["_id"]},
                post=stored,
            )
    reply: dict[str, Any] = {"n": n}
    if errors:
        reply["writeErrors"] = errors
    return reply


def _buffer_inserts(backend: Backend, coll: Any, body: dict[str, Any]) -> dict[str, Any]:
    """An insert inside a transaction: checked now, applied at commit (the lock is held)."""
    key, session = txn_key(body), _txn(body)
    assert key is not None and session is not None
    db, name = coll.database.name, coll.name
    taken = backend.transactions.buffered_ids(key, db, name)
    n = 0
    for i, given in enumerate(body.get("documents", [])):
        doc = dict(given)
        doc.setdefault("_id", bson.ObjectId())
        if doc["_id"] in taken or _matching(coll, {"_id": doc["_id"]}):
            # Inside a transaction a write error aborts it, as on a server.
            backend.transactions.fail(key)
            error = {
                "index": i,
                "code": 11000,
                "errmsg": f"E11000 duplicate key error collection: {db}.{name} index: _id_ dup key: {{ _id: {doc['_id']!r} }}",
            }
            return {"n": n, "writeErrors": [error]}
        taken.add(doc["_id"])
        backend.transactions.buffer(key, session, db, name, copy.deepcopy(doc))
        n += 1
    return {"n": n}


def _is_replacement(update: Any) -> bool:
    return isinstance(update, dict) and not any(k.startswith("$") for k in update)


def _by_id(coll: Any, query: Any) -> list[dict[str, Any]] | None:
    """Documents matching ``{"_id": scalar}`` without a scan (``None``: not such a query)."""
    if isinstance(query, dict) and len(query) == 1 and "_id" in query:
        value = query["_id"]
        if isinstance(value, _ID_TYPES) and not isinstance(value, bool):
            found = list(coll._iter_documents(query))
            return [copy.deepcopy(d) for d in found]
    return None


def _matching(coll: Any, query: dict[str, Any], sort: Any = None, limit: int = 0) -> list[dict[str, Any]]:
    direct = _by_id(coll, query)
    if direct is not None:
        return direct
    cursor = coll.find(query)
    if sort:
        cursor = cursor.sort(list(sort.items()))
    if limit:
        cursor = cursor.limit(limit)
    return list(cursor)


def _apply_update(
    backend: Backend,
    coll: Any,
    body: dict[str, Any],
    query: dict[str, Any],
    update: Any,
    *,
    multi: bool,
    upsert: bool,
    sort: Any = None,
    array_filters: Any = None,
) -> tuple[int, int, Any, list[tuple[dict[str, Any] | None, dict[str, Any] | None]]]:
    """Apply one update statement; return (matched, modified, upserted id, [(before, after)])."""
    matches = _matching(coll, query, sort, 0 if multi else 1)
    changes: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = []
    kwargs = {"array_filters": array_filters} if array_filters else {}
    if _is_replacement(update) and multi:
        raise CommandError(9, "FailedToParse", "multi update is not supported for replacement-style update")
    if not matches:
        if not upsert:
            return 0, 0, None, []
        backend.ensure_collection(coll.database.name, coll.name)
        if _is_replacement(update):
            new = dict(update)
            if "_id" not in new:
                new["_id"] = (
                    query.get("_id", bson.ObjectId())
                    if not isinstance(query.get("_id"), dict)
                    else bson.ObjectId()
                )
            coll.insert_one(new)
            upserted = new["_id"]
        else:
            result = coll.update_one(query, update, upsert=True, **kwargs)
            upserted = result.upserted_id
        after = (
            _matching(coll, {"_id": upserted})[0]
            if isinstance(upserted, _ID_TYPES)
            else coll.find_one({"_id": upserted})
        )
        backend._record(
            "insert", coll.database.name, coll.name, _txn(body), document_key={"_id": upserted}, post=after
        )
        return 0, 0, upserted, [(None, after)]
    modified = 0
    for before in matches:
        key = {"_id": before["_id"]}
        if _is_replacement(update):
            replacement = dict(update)
            if "_id" in replacement and replacement["_id"] != before["_id"]:
                raise CommandError(
                    66, "ImmutableField", "the (immutable) field '_id' was found to have been altered"
                )
            replacement["_id"] = before["_id"]
            coll.replace_one(key, replacement)
            op = "replace"
        else:
            coll.update_one(key, update, **kwargs)
            op = "update"
        found = _matching(coll, key)
        after = found[0] if found else None
        if after == before and op == "update":
            continue  # a no-op update writes no oplog entry on a real server either
        modified += 1
        fields: dict[str, Any] = {"document_key": key, "post": after, "pre": before}
        if op == "update":
            fields["update_description"] = update_description(before, after or {}, update, expanded=True)
        backend._record(op, coll.database.name, coll.name, _txn(body), **fields)
        changes.append((before, after))
    return len(matches), modified, None, changes


@command("update")
def _update(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    coll = _coll(backend, body, "update")
    n = modified = 0
    upserted, errors = [], []
    with backend.lock:
        for i, stmt in enumerate(body.get("updates", [])):
            try:
                matched, mod, up_id, _ = _apply_update(
                    backend,
                    coll,
                    body,
                    stmt.get("q", {}),
                    stmt["u"],
                    multi=bool(stmt.get("multi")),
                    upsert=bool(stmt.get("upsert")),
                    sort=stmt.get("sort"),
                    array_filters=stmt.get("arrayFilters"),
                )
            except mongomock.DuplicateKeyError as exc:
                errors.append({"index": i, "code": 11000, "errmsg": str(exc)})
                if body.get("ordered", True):
                    break
                continue
            except (mongomock.OperationFailure, ValueError, TypeError, KeyError) as exc:
                errors.append({"index": i, "code": getattr(exc, "code", None) or 2, "errmsg": str(exc)})
                if body.get("ordered", True):
                    break
                continue
            if up_id is not None:
                upserted.append({"index": i, "_id": up_id})
                n += 1
            else:
                n += matched
                modified += mod
    reply: dict[str, Any] = {"n": n, "nModified": modified}
    if upserted:
        reply["upserted"] = upserted
    if errors:
        reply["writeErrors"] = errors
    return reply


@command("delete")
def _delete(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    coll = _coll(backend, body, "delete")
    n = 0
    with backend.lock:
        for stmt in body.get("deletes", []):
            docs = _matching(coll, stmt.get("q", {}), limit=1 if stmt.get("limit", 0) == 1 else 0)
            for doc in docs:
                coll.delete_one({"_id": doc["_id"]})
                backend._record(
                    "delete",
                    coll.database.name,
                    coll.name,
                    _txn(body),
                    document_key={"_id": doc["_id"]},
                    pre=doc,
                )
                n += 1
    return {"n": n}


@command("findAndModify")
def _find_and_modify(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    name = next(iter(body))
    coll = backend.client[body["$db"]][body[name]]
    query = body.get("query") or {}
    sort = body.get("sort")
    projection = body.get("fields")
    with backend.lock:
        if body.get("remove"):
            cursor = coll.find(query)
            if sort:
                cursor = cursor.sort(list(sort.items()))
            docs = list(cursor.limit(1))
            if not docs:
                return {"lastErrorObject": {"n": 0}, "value": None}
            doc = docs[0]
            coll.delete_one({"_id": doc["_id"]})
            backend._record(
                "delete", coll.database.name, coll.name, _txn(body), document_key={"_id": doc["_id"]}, pre=doc
            )
            return {"lastErrorObject": {"n": 1}, "value": _project(doc, projection)}
        try:
            matched, _mod, up_id, changes = _apply_update(
                backend,
                coll,
                body,
                query,
                body["update"],
                multi=False,
                upsert=bool(body.get("upsert")),
                sort=sort,
                array_filters=body.get("arrayFilters"),
            )
        except mongomock.DuplicateKeyError as exc:
            raise CommandError(11000, "DuplicateKey", str(exc)) from exc
        if up_id is not None:
            after = coll.find_one({"_id": up_id})
            value = after if body.get("new") else None
            return {
                "lastErrorObject": {"n": 1, "updatedExisting": False, "upserted": up_id},
                "value": _project(value, projection),
            }
        if not matched:
            return {"lastErrorObject": {"n": 0, "updatedExisting": False}, "value": None}
        if changes:
            before, after = changes[0]
        else:  # matched but not modified: before == after
            before = after = (
                coll.find(query).sort(list(sort.items())).limit(1)[0] if sort else coll.find_one(query)
            )
        value = after if body.get("new") else before
        return {"lastErrorObject": {"n": 1, "updatedExisting": True}, "value": _project(value, projection)}


def _project(doc: dict[str, Any] | None, projection: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None or not projection:
        return doc
    include = [k for k, v in projection.items() if v and k != "_id"]
    exclude = [k for k, v in projection.items() if not v]
    if include:
        out = {k: doc[k] for k in include if k in doc}
        if projection.get("_id", 1) and "_id" in doc:
            out = {"_id": doc["_id"], **out}
        return out
    return {k: v for k, v in doc.items() if k not in exclude}


# -- reads --------------------------------------------------------------------


def _cursor_reply(
    backend: Backend,
    ns: str,
    docs: list[dict[str, Any]],
    batch_size: int | None,
    single: bool = False,
    key: str = "firstBatch",
) -> dict[str, Any]:
    size = batch_size if batch_size else 101
    first, rest = docs[:size], docs[size:]
    cid = 0
    if rest and not single:
        cid = backend.new_cursor_id()
        backend.cursors[cid] = _FindCursor(ns, rest)
    return {"cursor": {key: first, "id": Int64(cid), "ns": ns}}


_OPLOG_OPS = {"insert": "i", "update": "u", "replace": "u", "delete": "d"}


def _find_oplog(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    """``local.oplog.rs`` read in natural order (enough to find the oldest and newest entry)."""
    with backend.lock:
        entries = list(backend.oplog.entries)
    if (body.get("sort") or {}).get("$natural") == -1:
        entries.reverse()
    limit = abs(body.get("limit") or 0)
    docs = [
        {
            "ts": e.ts,
            "wall": e.wall,
            "op": _OPLOG_OPS.get(e.op, "c"),
            "ns": f"{e.db}.{e.coll}" if e.coll else f"{e.db}.$cmd",
        }
        for e in (entries[:limit] if limit else entries)
    ]
    return _cursor_reply(backend, "local.oplog.rs", docs, body.get("batchSize"), True)


@command("find")
def _find(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    if body.get("$db") == "local" and body.get("find") == "oplog.rs":
        return _find_oplog(backend, body)
    coll = _coll(backend, body, "find")
    with backend.lock:
        direct = (
            None if body.get("projection") or body.get("skip") else _by_id(coll, body.get("filter") or {})
        )
        if direct is not None:
            return _cursor_reply(
                backend, f"{coll.database.name}.{coll.name}", direct, body.get("batchSize"), True
            )
        cursor = coll.find(body.get("filter") or {}, projection=body.get("projection") or None)
        if body.get("sort"):
            cursor = cursor.sort(list(body["sort"].items()))
        if body.get("skip"):
            cursor = cursor.skip(body["skip"])
        if body.get("limit"):
            cursor = cursor.limit(abs(body["limit"]))
        docs = list(cursor)
        return _cursor_reply(
            backend,
            f"{coll.database.name}.{coll.name}",
            docs,
            body.get("batchSize"),
            bool(body.get("singleBatch")),
        )


@command("count")
def _count(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    coll = _coll(backend, body, "count")
    with backend.lock:
        kwargs = {k: body[k] for k in ("skip", "limit") if body.get(k)}
        return {"n": coll.count_documents(body.get("query") or {}, **kwargs)}


@command("distinct")
def _distinct(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    coll = _coll(backend, body, "distinct")
    with backend.lock:
        return {"values": coll.distinct(body["key"], body.get("query") or {})}


@command("aggregate")
def _aggregate(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    db = body["$db"]
    target = body["aggregate"]
    coll = target if isinstance(target, str) else None
    pipeline = body.get("pipeline") or []
    batch_size = (body.get("cursor") or {}).get("batchSize")
    if pipeline and "$changeStream" in pipeline[0]:
        _check_change_stream_read_concern(body)
        with backend.lock:
            cid = backend.new_cursor_id()
            cursor = open_change_stream(backend, cid, db, coll, pipeline)
        batch, pbrt = cursor.next_batch(backend, batch_size, wait_ms=0)
        with backend.lock:
            if not cursor.closed:
                backend.cursors[cid] = cursor
        return {
            "cursor": {
                "firstBatch": batch,
                "postBatchResumeToken": pbrt,
                "id": Int64(0 if cursor.closed else cid),
                "ns": cursor.ns,
            }
        }
    if coll is None:
        raise CommandError(
            115, "CommandNotSupported", "the fake replica set supports 'aggregate: 1' only for $changeStream"
        )
    for stage in pipeline:
        if any(name in stage for name in ("$out", "$merge")):
            raise CommandError(
                115, "CommandNotSupported", "the fake replica set does not support $out or $merge"
            )
    with backend.lock:
        docs = list(backend.client[db][coll].aggregate(pipeline))
        return _cursor_reply(backend, f"{db}.{coll}", docs, batch_size)


def _check_change_stream_read_concern(body: dict[str, Any]) -> None:
    """Refuse what the server refuses: a read concern other than majority, or a transaction."""
    if body.get("autocommit") is False:
        raise CommandError(
            263,
            "OperationNotSupportedInTransaction",
            "Operation not permitted in transaction :: caused by :: Aggregation stage $changeStream cannot run within a multi-document transaction.",
        )
    level = (body.get("readConcern") or {}).get("level")
    if level is not None and level != "majority":
        raise CommandError(
            72,
            "InvalidOptions",
            f"Aggregation stage $changeStream cannot run with a readConcern other than 'majority'. Current readConcern: {level}",
        )


@command("getMore")
def _get_more(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    cid = int(body["getMore"])
    with backend.lock:
        cursor = backend.cursors.get(cid)
    if cursor is None:
        raise CommandError(43, "CursorNotFound", f"cursor id {cid} not found")
    if isinstance(cursor, _FindCursor):
        with backend.lock:
            size = body.get("batchSize") or 101
            batch, cursor.docs = cursor.docs[:size], cursor.docs[size:]
            if not cursor.docs:
                backend.cursors.pop(cid, None)
            return {"cursor": {"nextBatch": batch, "id": Int64(cid if cursor.docs else 0), "ns": cursor.ns}}
    try:
        batch, pbrt = cursor.next_batch(
            backend, body.get("batchSize"), wait_ms=int(body.get("maxTimeMS", 1000))
        )
    except CommandError:
        with backend.lock:
            backend.cursors.pop(cid, None)
        raise
    with backend.lock:
        if cursor.closed and not cursor.pending:
            backend.cursors.pop(cid, None)
        alive = cid in backend.cursors
    return {
        "cursor": {
            "nextBatch": batch,
            "postBatchResumeToken": pbrt,
            "id": Int64(cid if alive else 0),
            "ns": cursor.ns,
        }
    }


# -- indexes and DDL ----------------------------------------------------------


@command("createIndexes")
def _create_indexes(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    db, coll = body["$db"], body["createIndexes"]
    with backend.lock:
        created = (db, coll) not in backend.collections
        backend.ensure_collection(db, coll)
        existing = backend.client[db][coll].index_information()
        before = len(existing)
        made = []
        for spec in body.get("indexes", []):
            if spec.get("name") in existing:
                continue  # the same index again is a no-op, as on a server
            try:
                backend._create_index(db, coll, spec)
            except mongomock.DuplicateKeyError as exc:
                raise CommandError(11000, "DuplicateKey", str(exc)) from exc
            made.append({"v": 2, **{k: v for k, v in spec.items() if k not in ("v", "ns")}})
        if made:
            backend._record("createIndexes", db, coll, description={"indexes": made})
        after = len(backend.client[db][coll].index_information())
    return {"numIndexesBefore": before, "numIndexesAfter": after, "createdCollectionAutomatically": created}


@command("listIndexes")
def _list_indexes(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    db, coll = body["$db"], body["listIndexes"]
    with backend.lock:
        if coll not in backend.client[db].list_collection_names():
            raise CommandError(26, "NamespaceNotFound", f"ns does not exist: {db}.{coll}")
        docs = []
        for name, info in backend.client[db][coll].index_information().items():
            doc: dict[str, Any] = {"v": 2, "key": dict(info["key"]), "name": name}
            doc.update({k: v for k, v in info.items() if k not in ("key", "v", "ns")})
            docs.append(doc)
    return {"cursor": {"id": Int64(0), "ns": f"{db}.{coll}", "firstBatch": docs}}


@command("dropIndexes")
def _drop_indexes(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    coll = _coll(backend, body, "dropIndexes")
    with backend.lock:
        info = coll.index_information()
        index = body.get("index")
        if index == "*":
            names = [n for n in info if n != "_id_"]
        elif isinstance(index, str):
            names = [index]
        else:
            wanted = list((index or {}).items())
            names = [n for n, ix in info.items() if list(ix["key"]) == wanted]
        dropped = []
        for name in names:
            if name not in info:
                raise CommandError(27, "IndexNotFound", f"index not found with name [{name}]")
            coll.drop_index(name)
            spec = {"v": 2, "key": dict(info[name]["key"]), "name": name}
            spec.update({k: v for k, v in info[name].items() if k not in ("key", "v", "ns")})
            dropped.append(spec)
        if dropped:
            backend._record("dropIndexes", coll.database.name, coll.name, description={"indexes": dropped})
    return {"nIndexesWas": len(info)}


@command("drop")
def _drop(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    db, coll = body["$db"], body["drop"]
    with backend.lock:
        if coll in backend.client[db].list_collection_names():
            backend.client[db].drop_collection(coll)
            backend._record("drop", db, coll)
    return {"ns": f"{db}.{coll}"}


@command("dropDatabase")
def _drop_database(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    db = body["$db"]
    with backend.lock:
        names = backend.client[db].list_collection_names()
        for coll in sorted(names):
            backend.client[db].drop_collection(coll)
            backend._record("drop", db, coll)
        backend.client.drop_database(db)
        if names:
            backend._record("dropDatabase", db, None)
    return {"dropped": db}


@command("renameCollection")
def _rename(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    source, target = body["renameCollection"], body["to"]
    sdb, scoll = source.split(".", 1)
    tdb, tcoll = target.split(".", 1)
    if sdb != tdb:
        raise CommandError(
            115, "CommandNotSupported", "the fake replica set renames only within one database"
        )
    with backend.lock:
        if scoll not in backend.client[sdb].list_collection_names():
            raise CommandError(26, "NamespaceNotFound", f"Source collection {source} does not exist")
        target = backend.collections.get((tdb, tcoll))
        backend.client[sdb][scoll].rename(tcoll, dropTarget=bool(body.get("dropTarget")))
        description: dict[str, Any] = {"to": {"db": tdb, "coll": tcoll}}
        if target is not None and body.get("dropTarget"):
            description["dropTarget"] = target.uuid
        backend._record("rename", sdb, scoll, to={"db": tdb, "coll": tcoll}, description=description)
    return {}
