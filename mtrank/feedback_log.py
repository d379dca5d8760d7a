"""The feedback log: every joined label with the scores that were served for it, durable, for offline use.

Torch-free and shared by both sides: the service writes it (``service.feedback.log``, after the join of each
``/feedback`` batch) and ``mtrank calibrate`` reads it (``model.recalibrate``).

**Record** (one per joined ``(request, item, task)`` label; a JSON object per line, ASCII, ``\\n``-ended)::

    {"ts": 1764020003.25, "request_id": "9f...", "item_id": "i42", "task": "ctr", "label": 1.0,
     "raw": 0.0812, "calibrated": 0.0934, "model_version": "20261124-225323-9201eb2c", "arm": "default"}

``ts`` is the unix time of the append (seconds, shared by one batch), ``raw`` / ``calibrated`` the float32
scores ``/rank`` served (as float64), ``arm`` null when the request named its fusion. Non-ASCII text and lone
surrogates (ids parsed from JSON may hold them) are ``\\u`` escapes; a non-finite score is ``NaN``.

**Writers** (:class:`FeedbackWriter`): ``write(data, count)`` appends one batch encoded by
:func:`encode_records`, or raises.

* :class:`JsonlWriter`: a directory of JSON-lines files, one file per writing process (named
  ``feedback-<host>-<pid>-<start UTC>-<seq>.jsonl``, created with ``O_EXCL``), so several uvicorn workers
  never interleave. Append-only, one ``write`` per batch (no user-space buffer: a batch is in the OS when
  ``write`` returns), ``fsync`` per batch optionally. A new file is started before a batch that would take
  the current one past ``max_bytes`` (a file exceeds it only when a single batch does), when the current
  one is older than ``max_age_s``, in a forked child, and after a failed write (which may have left a
  torn last line: it stays the last line of its file).
* :class:`RedisStreamWriter`: one ``XADD`` per batch to a stream (default key ``mtrank:feedback``),
  entry fields ``n`` (records) and ``jsonl`` (the batch's lines), trimmed with ``MAXLEN ~ maxlen`` (entries,
  approximate).

**Reader**: :func:`read_feedback` -> :class:`FeedbackColumns` (numpy arrays), from a directory (every
``*.jsonl`` file: the rotated ones too), one file, or a ``redis://`` URL (``XRANGE ... COUNT`` in chunks).
A torn last line (a file still being written, a crash mid-write) is skipped and counted, with a warning;
so is any line or entry that is not a record. Neither stops the read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _str  # type: ignore[attr-defined]
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np

__all__ = ["DEFAULT_STREAM", "FIELDS", "FeedbackColumns", "FeedbackLogError", "FeedbackWriter", "JsonlWriter",
           "LabelRecord", "RedisStreamWriter", "describe_source", "encode_records", "read_feedback"]

log = logging.getLogger("mtrank.feedback_log")

FIELDS = ("ts", "request_id", "item_id", "task", "label", "raw", "calibrated", "model_version", "arm")
_NUMERIC = ("ts", "label", "raw", "calibrated")
_STRINGS = ("request_id", "item_id", "task", "model_version")
DEFAULT_STREAM = "mtrank:feedback"
FILE_PREFIX = "feedback"
READ_BLOCK = 8 << 20  # bytes of a JSONL file parsed at a time
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class FeedbackLogError(Exception):
    """A feedback log cannot be read (an unreachable Redis, a key that is not a stream)."""


class LabelRecord(Protocol):
    """What a record is made of (``service.feedback.JoinedLabel`` has these attributes)."""

    @property
    def request_id(self) -> str: ...
    @property
    def item_id(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def label(self) -> float: ...
    @property
    def raw(self) -> float: ...
    @property
    def calibrated(self) -> float: ...
    @property
    def model_version(self) -> str: ...
    @property
    def arm(self) -> str | None: ...


def _num(x: float) -> str:
    """A JSON number: ``repr`` of the float (shortest round-trip form), ``NaN`` / ``Infinity`` when not finite."""
    x = float(x)
    return repr(x) if x - x == 0.0 else json.dumps(x)


def encode_records(labels: Iterable[LabelRecord], ts: float) -> bytes:
    """The JSON lines of ``labels`` (one record each, all with ``ts``), ``b""`` for none.

    Each line is formatted directly (strings escaped by json's C ``encode_basestring_ascii``, numbers by
    :func:`_num`): ~1.3 us per record, 40 % of ``json.dumps`` over a list of dicts. The reader parses
    it with ``json.loads``.
    """
    t = _num(ts)
    lines = [f'{{"ts":{t},"request_id":{_str(r.request_id)},"item_id":{_str(r.item_id)},"task":{_str(r.task)},'
             f'"label":{_num(r.label)},"raw":{_num(r.raw)},"calibrated":{_num(r.calibrated)},'
             f'"model_version":{_str(r.model_version)},"arm":{"null" if r.arm is None else _str(r.arm)}}}\n'
             for r in labels]
    return "".join(lines).encode("ascii")


# ------------------------------------------------------------------------------------------ writers


class FeedbackWriter(Protocol):
    sink: str  # "jsonl" | "redis": the metrics' label

    def write(self, data: bytes, count: int) -> None:
        """Append one batch: ``data`` from :func:`encode_records`, holding ``count`` records. Raises on failure."""
        ...

    def close(self) -> None: ...


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


class JsonlWriter:
    """JSON-lines files in ``directory``, this process's own (module docstring). Thread-safe."""

    sink = "jsonl"

    def __init__(self, directory: str | Path, max_bytes: int = 64 << 20, max_age_s: float | None = 3600.0,
                 fsync: bool = False) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.fsync = fsync
        self.path: Path | None = None  # the file being written
        self._fd: int | None = None
        self._pid = 0
        self._size = 0
        self._opened = 0.0  # monotonic
        self._seq = 0
        self._started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._lock = threading.Lock()

    def write(self, data: bytes, count: int = 0) -> None:
        if not data:
            return
        with self._lock:
            if self._fd is not None and self._rotate_before(len(data)):
                self._close_file()
            if self._fd is None:
                self._open()
            assert self._fd is not None
            try:
                view = memoryview(data)
                while view:  # a regular file takes it in one call, short of a full disk
                    view = view[os.write(self._fd, view):]
                if self.fsync:
                    os.fsync(self._fd)
            except BaseException:
                self._close_file()  # the next batch starts a new file after a possibly torn line
                raise
            self._size += len(data)

    def _rotate_before(self, n: int) -> bool:
        return (os.getpid() != self._pid or (self._size > 0 and self._size + n > self.max_bytes)
                or (self.max_age_s is not None and time.monotonic() - self._opened >= self.max_age_s))

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        if pid != self._pid:  # a forked child: new name, its own sequence
            self._pid, self._seq = pid, 0
            self._started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        while True:
            self._seq += 1
            path = self.directory / f"{FILE_PREFIX}-{_host()}-{pid}-{self._started}-{self._seq:06d}.jsonl"
            try:
                self._fd = os.open(path, flags, 0o644)
            except FileExistsError:  # never append to a file this writer did not create
                continue
            break
        self.path, self._size, self._opened = path, 0, time.monotonic()

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_file()


class RedisStreamWriter:
    """``XADD key MAXLEN ~ maxlen * n <count> jsonl <lines>`` per batch. Timeouts of ``socket_timeout_s``, no
    retries. Thread-safe (redis-py's connection pool)."""

    sink = "redis"

    def __init__(self, url: str, key: str = DEFAULT_STREAM, maxlen: int = 100_000,
                 socket_timeout_s: float = 0.05) -> None:
        self.url, self.key, self.maxlen = url, key, maxlen
        self.client = _redis_client(url, socket_timeout_s)

    def write(self, data: bytes, count: int) -> None:
        if data:
            self.client.xadd(self.key, {"n": count, "jsonl": data}, maxlen=self.maxlen, approximate=True)

    def close(self) -> None:
        self.client.close()


def _redis_client(url: str, timeout_s: float | None) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0)


# ------------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class FeedbackColumns:
    """Records as columns, all [N]: float64 ``ts``, ``label``, ``raw``, ``calibrated``; object (str)
    ``request_id``, ``item_id``, ``task``, ``model_version``; object ``arm`` (str or None). ``torn``: torn last
    lines skipped; ``invalid``: other lines (or stream entries) skipped because they are not records."""

    ts: np.ndarray
    request_id: np.ndarray
    item_id: np.ndarray
    task: np.ndarray
    label: np.ndarray
    raw: np.ndarray
    calibrated: np.ndarray
    model_version: np.ndarray
    arm: np.ndarray
    torn: int = 0
    invalid: int = 0

    def __len__(self) -> int:
        return int(self.ts.size)

    def select(self, mask: np.ndarray) -> FeedbackColumns:
        """The records where ``mask`` (bool [N]) holds; the skip counts are kept."""
        return FeedbackColumns(**{f: getattr(self, f)[mask] for f in FIELDS}, torn=self.torn, invalid=self.invalid)


def _valid(rec: Any) -> bool:
    if not isinstance(rec, dict) or any(f not in rec for f in FIELDS):
        return False
    if any(not isinstance(rec[f], int | float) or isinstance(rec[f], bool) for f in ("label", "raw", "calibrated")):
        return False
    return (isinstance(rec["ts"], int | float) and all(isinstance(rec[f], str) for f in _STRINGS)
            and (rec["arm"] is None or isinstance(rec["arm"], str)))


_ROW = itemgetter(*FIELDS)


class _Columns:
    """Accumulates parsed blocks of lines; :meth:`done` concatenates them."""

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []
        self.torn = 0
        self.invalid = 0

    def add_lines(self, lines: list[bytes]) -> None:
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            return
        try:  # the whole block in one parse; a bad line sends it through the line-by-line path
            recs = json.loads(b"[" + b",".join(lines) + b"]")
        except ValueError:
            recs = []
            for ln in lines:
                try:
                    recs.append(json.loads(ln))
                except ValueError:
                    self.invalid += 1
        try:
            self.parts.append(self._arrays(recs))
        except (KeyError, TypeError, ValueError):
            good = [r for r in recs if _valid(r)]
            self.invalid += len(recs) - len(good)
            if good:
                self.parts.append(self._arrays(good))

    @staticmethod
    def _arrays(recs: list[Any]) -> dict[str, np.ndarray]:
        if not recs:
            return {}
        if not all(type(r) is dict for r in recs):
            raise TypeError("not an object")
        cols = dict(zip(FIELDS, zip(*map(_ROW, recs))))
        out: dict[str, np.ndarray] = {}
        for f in FIELDS:
            if f in _NUMERIC:
                if any(isinstance(v, str | bool) for v in cols[f]):
                    raise TypeError(f"{f}: not a number")
                out[f] = np.asarray(cols[f], dtype=np.float64)
            else:
                col = np.empty(len(recs), dtype=object)
                col[:] = cols[f]
                if f in _STRINGS and not all(isinstance(v, str) for v in cols[f]):
                    raise TypeError(f"{f}: not a string")
                out[f] = col
        return out

    def done(self) -> FeedbackColumns:
        parts = [p for p in self.parts if p]
        cols = {f: (np.concatenate([p[f] for p in parts]) if parts
                    else np.empty(0, dtype=np.float64 if f in _NUMERIC else object)) for f in FIELDS}
        return FeedbackColumns(**cols, torn=self.torn, invalid=self.invalid)


def _read_file(path: Path, acc: _Columns) -> None:
    with open(path, "rb") as fh:
        rest = b""
        while block := fh.read(READ_BLOCK):
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            if cut:
                acc.add_lines(block[:cut].split(b"\n"))
    if rest.strip():
        acc.torn += 1
        log.warning("feedback log %s: skipped a torn last line (%d bytes without a line end: a file still being "
                    "written, or a write cut short)", path, len(rest))


def _read_stream(url: str, key: str, chunk: int, acc: _Columns) -> None:
    import redis

    client = _redis_client(url, None)
    try:
        start = "-"
        while True:
            entries = client.xrange(key, min=start, max="+", count=chunk)
            for _, fields in entries:
                data = fields.get(b"jsonl")
                if isinstance(data, bytes):
                    acc.add_lines(data.split(b"\n"))
                else:
                    acc.invalid += 1
            if len(entries) < chunk:
                break
            start = "(" + entries[-1][0].decode()  # exclusive: after the last entry read
    except redis.RedisError as err:
        raise FeedbackLogError(f"redis {describe_source(url)} stream {key!r}: {type(err).__name__}: {err}") from None
    finally:
        client.close()


def describe_source(source: str | Path) -> str:
    """``source`` fit to print or record: a Redis URL without its user and password."""
    text = str(source)
    if text.startswith(REDIS_SCHEMES):
        parts = urlsplit(text)
        if parts.username or parts.password:
            host = parts.netloc.rsplit("@", 1)[1]
            return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return text


def read_feedback(source: str | Path, stream: str = DEFAULT_STREAM, chunk: int = 1000) -> FeedbackColumns:
    """Every record of a feedback log, as columns.

    ``source``: a directory (its ``*.jsonl`` files, in name order), one JSON-lines file, or a Redis URL
    (``redis://``, ``rediss://``, ``unix://``) whose stream ``stream`` is read ``chunk`` entries per ``XRANGE``.
    Raises FileNotFoundError for a path that does not exist, :class:`FeedbackLogError` when Redis fails.
    """
    acc = _Columns()
    text = str(source)
    if text.startswith(REDIS_SCHEMES):
        _read_stream(text, stream, max(1, chunk), acc)
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such feedback log (a directory or file of JSON lines, "
                                    "or a redis:// URL)")
        for f in files:
            _read_file(f, acc)
    if acc.invalid:
        log.warning("feedback log %s: skipped %d lines that are not feedback records", describe_source(source),
                    acc.invalid)
    return acc.done()
