"""The host-wide join store (``feedback.backend: sqlite``): one SQLite file shared by the worker processes of a host.

Schema (keys are UTF-8 BLOBs, times are Unix seconds)::

    predictions(request_id BLOB PRIMARY KEY, at REAL, n INTEGER, data BLOB)   -- data: service.feedback.codec
    labels(request_id BLOB, item_id BLOB, at REAL, labels TEXT, orphan INTEGER, PRIMARY KEY (request_id, item_id))
                                                -- labels: JSON {task: label}; orphan: 1 = no kept prediction
    totals(predictions, items, labels, orphans)   -- one row, kept exact by triggers on insert/delete

A file of an older schema version is rebuilt empty when first opened (the log is transient); one of a
newer version is refused (``put``/``ingest`` fail and are counted).

WAL journal (readers never block the writer), ``synchronous=NORMAL`` (a commit does not fsync; a power
loss may lose the last commits, which is fine for a join log), ``busy_timeout`` to wait for another
process's write lock. A small pool of connections, one per concurrent call. WAL checkpoints (copying the log
into the file, ~6 ms per 4 MB) run on a background thread every ``checkpoint_interval_s`` rather than
inside the commit that crosses SQLite's 1000-page threshold, which made 1 % of ``put`` calls ~6 ms; the
automatic checkpoint stays as a backstop at 16384 pages (64 MiB).

Bounds are enforced in the transaction that writes, so they hold exactly at every commit and no write
pays for a batch of deletes: ``put`` (one ``BEGIN IMMEDIATE`` transaction: expired predictions deleted,
``INSERT OR IGNORE`` of the row (ignored: the request id is already used, ``"reused"``), then the oldest
predictions beyond ``max_requests`` rows or ``max_items`` candidates deleted, typically the one or two the
new row displaces) and ``ingest`` (one transaction: label keys beyond ``ttl_s`` (orphans: ``orphan_ttl_s``)
from their first label deleted, point lookups of the keys' labels and of the requests' predictions, the
merged rows written, keys beyond ``max_events`` (orphans: ``max_orphans``) deleted). The file does not
shrink; freed pages are reused, so its size follows the caps: a prediction takes 8 B per (candidate, task)
plus its ids (~48 KB for 1000 x 5).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.feedback import Event, IngestResult, JoinStoreUnavailable, PutResult, count_orphans
from service.feedback.codec import Prediction, utf8
from service.logs import RateLimitedLogger
from service.threads import NamedThread

if TYPE_CHECKING:
    from service.metrics import Metrics

log = logging.getLogger("mtrank.service.feedback")

SCHEMA_VERSION = 2  # 2: labels.orphan, totals.orphans
_AUTOCHECKPOINT_PAGES = 16384
_DROP_OLD = ("DROP TABLE IF EXISTS predictions", "DROP TABLE IF EXISTS labels", "DROP TABLE IF EXISTS totals")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS predictions (request_id BLOB PRIMARY KEY, at REAL NOT NULL, n INTEGER NOT NULL, "
    "data BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS predictions_at ON predictions (at)",
    "CREATE TABLE IF NOT EXISTS labels (request_id BLOB NOT NULL, item_id BLOB NOT NULL, at REAL NOT NULL, "
    "labels TEXT NOT NULL, orphan INTEGER NOT NULL, PRIMARY KEY (request_id, item_id))",
    "CREATE INDEX IF NOT EXISTS labels_orphan_at ON labels (orphan, at)",
    "CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 1), predictions INTEGER NOT NULL, "
    "items INTEGER NOT NULL, labels INTEGER NOT NULL, orphans INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO totals VALUES (1, 0, 0, 0, 0)",
    "CREATE TRIGGER IF NOT EXISTS predictions_ins AFTER INSERT ON predictions BEGIN "
    "UPDATE totals SET predictions = predictions + 1, items = items + NEW.n; END",
    "CREATE TRIGGER IF NOT EXISTS predictions_del AFTER DELETE ON predictions BEGIN "
    "UPDATE totals SET predictions = predictions - 1, items = items - OLD.n; END",
    "CREATE TRIGGER IF NOT EXISTS labels_ins AFTER INSERT ON labels BEGIN "
    "UPDATE totals SET labels = labels + 1 - NEW.orphan, orphans = orphans + NEW.orphan; END",
    "CREATE TRIGGER IF NOT EXISTS labels_del AFTER DELETE ON labels BEGIN "
    "UPDATE totals SET labels = labels - 1 + OLD.orphan, orphans = orphans - OLD.orphan; END",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class SqliteJoinStore:
    backend = "sqlite"

    def __init__(self, path: str | Path, metrics: Metrics, ttl_s: float, max_requests: int, max_items: int,
                 max_events: int, busy_timeout_ms: int = 1000, log_interval_s: float = 10.0,
                 checkpoint_interval_s: float = 1.0, orphan_ttl_s: float | None = None,
                 max_orphans: int | None = None) -> None:
        self.path = str(path)
        self.metrics = metrics
        self.ttl_s = ttl_s
        self.max_requests, self.max_items, self.max_events = max_requests, max_items, max_events
        self.orphan_ttl_s = ttl_s if orphan_ttl_s is None else orphan_ttl_s
        self.max_orphans = max_events if max_orphans is None else max_orphans
        self.busy_timeout_ms = busy_timeout_ms
        self.ratelog = RateLimitedLogger(log, log_interval_s)
        self._idle: list[sqlite3.Connection] = []  # connections not in use (LIFO); at most one per concurrent call
        self._lock = threading.Lock()  # guards _idle, _closed, _checkpointer
        self._closed = False
        self.checkpoint_interval_s = checkpoint_interval_s
        self._checkpointer: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------ connections
    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection of the pool for the duration of one call (a thread-local one would leak when the
        caller's thread pool retires threads)."""
        with self._lock:
            if self._closed:
                raise sqlite3.ProgrammingError("join store closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._open()
        try:
            yield conn
        finally:
            with self._lock:
                if not self._closed:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE). check_same_thread=False:
        # pooled connections move between threads, one call at a time.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000.0, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA journal_size_limit = 67108864")  # truncate the WAL to 64 MiB after a checkpoint
            conn.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT_PAGES}")  # backstop; see _checkpoints
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                with _transaction(conn):  # all or nothing: the totals row exists before any trigger fires
                    version = conn.execute("PRAGMA user_version").fetchone()[0]  # again, under the write lock
                    if version > SCHEMA_VERSION:
                        raise sqlite3.DatabaseError(f"schema version {version} is newer than this code's "
                                                    f"{SCHEMA_VERSION}")
                    for stmt in (_DROP_OLD if 0 < version < SCHEMA_VERSION else ()) + _SCHEMA:
                        conn.execute(stmt)
        except BaseException:
            conn.close()
            raise
        return conn

    def _start_checkpoints(self) -> None:
        if self._checkpointer is None and self.checkpoint_interval_s > 0:
            with self._lock:
                if self._checkpointer is None and not self._closed:
                    self._checkpointer = NamedThread(target=self._checkpoints, name="mtrank-checkpt", daemon=True)
                    self._checkpointer.start()

    def _checkpoints(self) -> None:
        """Background thread: a PASSIVE checkpoint (never waits for readers or writers) every interval."""
        while not self._stop.wait(self.checkpoint_interval_s):
            try:
                with self._connection() as conn:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as err:
                self.ratelog.warning("sqlite-checkpoint", "join store (sqlite %s) checkpoint failed: %s: %s",
                                     self.path, type(err).__name__, err)

    def close(self) -> None:
        """Closes the idle connections now, those in use when their call ends."""
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(5)
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _fail(self, op: str, err: BaseException) -> None:
        self.metrics.join_errors.labels(self.backend, op).inc()
        self.ratelog.warning(f"sqlite-{op}", "join store (sqlite %s) %s failed: %s: %s", self.path, op,
                             type(err).__name__, err)

    # ------------------------------------------------------------------------------------- put
    def put(self, request_id: str, model_version: str, arm: str | None, item_ids: list[str], task_names: list[str],
            raw: Mapping[str, np.ndarray], calibrated: Mapping[str, np.ndarray]) -> PutResult:
        try:
            data = Prediction.build(model_version, arm, item_ids, task_names, raw, calibrated).encode()
            rid = utf8(request_id)
            now = time.time()
            with self._connection() as conn, _transaction(conn):
                conn.execute("DELETE FROM predictions WHERE at < ?", (now - self.ttl_s,))  # an index probe when none
                inserted = conn.execute("INSERT OR IGNORE INTO predictions (request_id, at, n, data) "
                                        "VALUES (?, ?, ?, ?)", (rid, now, len(item_ids), data)).rowcount
                if inserted:
                    self._trim_predictions(conn)
            self._start_checkpoints()  # once this process has written
            return "kept" if inserted else "reused"
        except Exception as err:  # noqa: BLE001 - a prediction that cannot be kept never fails /rank
            self._fail("put", err)
            return "failed"

    def _trim_predictions(self, conn: sqlite3.Connection) -> None:
        rows, items = conn.execute("SELECT predictions, items FROM totals").fetchone()
        if rows > self.max_requests:
            conn.execute("DELETE FROM predictions WHERE request_id IN (SELECT request_id FROM predictions "
                         "ORDER BY at LIMIT ?)", (rows - self.max_requests,))
            rows, items = conn.execute("SELECT predictions, items FROM totals").fetchone()
        while items > self.max_items and rows > 1:  # oldest first; the newest row stays whatever its size
            (n,) = conn.execute("DELETE FROM predictions WHERE request_id = (SELECT request_id FROM predictions "
                                "ORDER BY at LIMIT 1) RETURNING n").fetchone()
            rows, items = rows - 1, items - n

    # ---------------------------------------------------------------------------------- ingest
    def ingest(self, events: list[Event]) -> IngestResult:
        try:
            with self._connection() as conn, _transaction(conn):
                res = self._ingest(conn, events)
            self._start_checkpoints()
            return count_orphans(self.metrics, res)
        except sqlite3.Error as err:
            self._fail("ingest", err)
            raise JoinStoreUnavailable(f"join store (sqlite {self.path}): {type(err).__name__}: {err}") from err

    def _ingest(self, conn: sqlite3.Connection, events: list[Event]) -> IngestResult:
        now = time.time()
        horizon = now - self.ttl_s
        # Expired keys first (index probes when none), so every row read below is live.
        conn.execute("DELETE FROM labels WHERE orphan = 0 AND at < ?", (horizon,))
        conn.execute("DELETE FROM labels WHERE orphan = 1 AND at < ?", (now - self.orphan_ttl_s,))
        known: dict[tuple[str, str], dict[str, float]] = {}  # key -> labels recorded (before + this batch)
        orphan_of: dict[tuple[str, str], bool] = {}  # key -> orphan class
        stored: set[tuple[str, str]] = set()  # keys with a row before this batch
        changed: dict[tuple[str, str], None] = {}  # keys to write back, in first-seen order
        preds: dict[str, Prediction | None] = {}  # request -> its kept prediction (looked up once)
        new_per_event: list[dict[str, float] | None] = []

        def prediction(rid: str) -> Prediction | None:
            if rid not in preds:
                row = conn.execute("SELECT data FROM predictions WHERE request_id = ? AND at >= ?",
                                   (utf8(rid), horizon)).fetchone()
                preds[rid] = _decode(row[0]) if row is not None else None
            return preds[rid]

        for rid, iid, labels in events:
            key = (rid, iid)
            have = known.get(key)
            if have is None:
                row = conn.execute("SELECT labels, orphan FROM labels WHERE request_id = ? AND item_id = ?",
                                   (utf8(rid), utf8(iid))).fetchone()
                if row is not None:
                    have, orphan_of[key] = json.loads(row[0]), bool(row[1])
                    stored.add(key)
                else:
                    have, orphan_of[key] = {}, prediction(rid) is None
                known[key] = have
            new = {t: v for t, v in labels.items() if t not in have}
            if new:
                have.update(new)
                changed[key] = None
            new_per_event.append(new or None)
        if changed:
            conn.executemany("UPDATE labels SET labels = ? WHERE request_id = ? AND item_id = ?",
                             [(json.dumps(known[k]), utf8(k[0]), utf8(k[1])) for k in changed if k in stored])
            conn.executemany("INSERT INTO labels (request_id, item_id, at, labels, orphan) VALUES (?, ?, ?, ?, ?)",
                             [(utf8(k[0]), utf8(k[1]), now, json.dumps(known[k]), int(orphan_of[k]))
                              for k in changed if k not in stored])
            labelled, orphans = conn.execute("SELECT labels, orphans FROM totals").fetchone()
            for flag, count, cap in ((0, labelled, self.max_events), (1, orphans, self.max_orphans)):
                if count > cap:
                    conn.execute("DELETE FROM labels WHERE rowid IN (SELECT rowid FROM labels WHERE orphan = ? "
                                 "ORDER BY at LIMIT ?)", (flag, count - cap))
        res = IngestResult()
        for (rid, iid, _), new in zip(events, new_per_event):
            pred = prediction(rid) if new else None
            res.record(rid, iid, new, pred, orphan=pred is None)
        return res

    def __len__(self) -> int:
        """Labelled (request, item) keys in the file (all processes), orphans included."""
        with self._connection() as conn:
            return sum(conn.execute("SELECT labels, orphans FROM totals").fetchone())

    def orphan_keys(self) -> int:
        """Orphan (request, item) keys in the file."""
        with self._connection() as conn:
            return conn.execute("SELECT orphans FROM totals").fetchone()[0]


class _transaction:
    """``BEGIN IMMEDIATE`` (the write lock up front: no lock upgrade, so no deadlock between processes) ... COMMIT,
    ROLLBACK on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:  # no transaction left to roll back (the failure ended it)
            pass


def _decode(data: bytes) -> Prediction | None:
    try:
        return Prediction.decode(data)
    except ValueError:  # a record of another format version: not joinable
        return None
