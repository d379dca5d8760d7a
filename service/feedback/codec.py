"""One kept /rank answer (:class:`Prediction`) and its compact binary encoding (SQLite and Redis backends).

Encoding (little-endian), version 1::

    header   "<BBHI"   format version (1), flags (bit 0: arm is None), T tasks, n items
    4 string blocks    model_version, arm ("" when None), task names [T], item ids [n]
    raw              float32 [T, n] (C order)
    calibrated       float32 [T, n]

A string block is ``"<BI"`` (mode, byte length) then the bytes: mode 0 = the strings ``"\\0"``-joined
(UTF-8, lone surrogates passed through); mode 1 (when a string itself holds ``"\\0"``) = uint16 [k] byte
lengths followed by the concatenated strings. 1000 items x 5 tasks take ~48 KB (8 B per score pair
and task, plus the ids).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from service.feedback import JoinedLabel

FORMAT_VERSION = 1
_HEADER = struct.Struct("<BBHI")
_BLOCK = struct.Struct("<BI")
_ARM_NONE = 1
_SCANS = 8  # item lookups by list scan before a prediction builds its item index


def utf8(s: str) -> bytes:
    """UTF-8 that never fails: request/item ids parsed from JSON may hold lone surrogates."""
    return s.encode("utf-8", "surrogatepass")


def _unutf8(b: bytes | memoryview) -> str:
    return bytes(b).decode("utf-8", "surrogatepass")


@dataclass
class Prediction:
    """What /rank answered for one request: item ids [n], float32 raw and calibrated scores [T, n]."""

    model_version: str
    arm: str | None
    task_names: list[str]  # [T]
    item_ids: list[str]  # [n]
    raw: np.ndarray  # float32 [T, n]
    calibrated: np.ndarray  # float32 [T, n]
    _items: dict[str, int] | None = None
    _lookups: int = 0
    _tasks: dict[str, int] | None = None

    @classmethod
    def build(cls, model_version: str, arm: str | None, item_ids: list[str], task_names: list[str],
              raw: Mapping[str, np.ndarray], calibrated: Mapping[str, np.ndarray]) -> Prediction:
        stack = lambda m: np.stack([np.asarray(m[t], dtype=np.float32) for t in task_names]) if task_names \
            else np.zeros((0, len(item_ids)), np.float32)
        return cls(model_version, arm, list(task_names), item_ids, stack(raw), stack(calibrated))

    def position(self, item_id: str) -> int | None:
        """The item's column; a scan for the first few lookups (~5 us for 1000 ids), then an index (~50 us to
        build): feedback usually names a few items of a request. put pays nothing for it."""
        if self._items is not None:
            return self._items.get(item_id)
        self._lookups += 1
        if self._lookups > _SCANS:
            self._items = dict(zip(self.item_ids, range(len(self.item_ids))))
            return self._items.get(item_id)
        try:
            return self.item_ids.index(item_id)
        except ValueError:
            return None

    def join(self, request_id: str, item_id: str, new: Mapping[str, float]) -> list[JoinedLabel] | None:
        """The served scores of ``item_id`` for each task of ``new`` ({task: label}), as labels of ``request_id``
        (this prediction's request); None when the item was not ranked. A task this prediction has no score for
        is left out (the event still counts as joined)."""
        pos = self.position(item_id)
        if pos is None:
            return None
        if self._tasks is None:
            self._tasks = {t: k for k, t in enumerate(self.task_names)}
        out = []
        for task, label in new.items():
            t = self._tasks.get(task)
            if t is not None:
                out.append(JoinedLabel(request_id, item_id, task, float(label), float(self.raw[t, pos]),
                                       float(self.calibrated[t, pos]), self.model_version, self.arm))
        return out

    # ---------------------------------------------------------------------------------- encoding
    def encode(self) -> bytes:
        t, n = self.raw.shape
        parts = [_HEADER.pack(FORMAT_VERSION, _ARM_NONE if self.arm is None else 0, t, n),
                 _strings([self.model_version]), _strings([self.arm or ""]), _strings(self.task_names),
                 _strings(self.item_ids), self.raw.astype("<f4", copy=False).tobytes(),
                 self.calibrated.astype("<f4", copy=False).tobytes()]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Prediction:
        """Raises ValueError on an unknown format version or a truncated buffer."""
        if len(data) < _HEADER.size:
            raise ValueError("prediction record: truncated")
        version, flags, t, n = _HEADER.unpack_from(data, 0)
        if version != FORMAT_VERSION:
            raise ValueError(f"prediction record: unknown format version {version}")
        off = _HEADER.size
        (model_version,), off = _read_strings(data, off, 1)
        (arm,), off = _read_strings(data, off, 1)
        tasks, off = _read_strings(data, off, t)
        items, off = _read_strings(data, off, n)
        size = 4 * t * n
        if len(data) != off + 2 * size:
            raise ValueError("prediction record: truncated")
        raw = np.frombuffer(data, "<f4", t * n, off).reshape(t, n)
        cal = np.frombuffer(data, "<f4", t * n, off + size).reshape(t, n)
        return cls(model_version, None if flags & _ARM_NONE else arm, tasks, items, raw, cal)


def _strings(strs: list[str]) -> bytes:
    joined = "\0".join(strs)
    if joined.count("\0") == max(len(strs) - 1, 0):  # no string holds "\0": the cheap form
        b = utf8(joined)
        return _BLOCK.pack(0, len(b)) + b
    enc = [utf8(s) for s in strs]
    body = np.asarray([len(e) for e in enc], dtype="<u2").tobytes() + b"".join(enc)
    return _BLOCK.pack(1, len(body)) + body


def _read_strings(data: bytes, off: int, k: int) -> tuple[list[str], int]:
    mode, size = _BLOCK.unpack_from(data, off)
    off += _BLOCK.size
    end = off + size
    if end > len(data):
        raise ValueError("prediction record: truncated")
    if mode == 0:
        out = _unutf8(data[off:end]).split("\0") if k else []
    else:
        lengths = np.frombuffer(data, "<u2", k, off).tolist()
        pos, out = off + 2 * k, []
        for ln in lengths:
            out.append(_unutf8(data[pos:pos + ln]))
            pos += ln
    if len(out) != k:
        raise ValueError("prediction record: bad string block")
    return out, end
