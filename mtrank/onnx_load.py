"""Load a single-file ONNX model into onnxruntime holding its large weights once, not twice.

onnxruntime loading ``model.onnx`` by path (or from bytes) parses the whole protobuf, weights included, copies
every initializer into a buffer of its own and only then frees the parsed message: for a model that is mostly
one embedding table the load peaks at about twice the file above what stays loaded. :func:`session` reads each
large weight from the file once, into a numpy array that onnxruntime then uses in place
(``SessionOptions.add_initializer``), and hands onnxruntime the model's protobuf without those weights' bytes:
each large top-level initializer becomes *external data pointing back into the same file* (``location`` the
file's name, ``offset`` and ``length`` of its ``raw_data``), a valid placeholder that the array overrides. The
file is not changed and onnxruntime sees the same graph, names and values, so the session computes exactly what
a session loaded by path computes; what stays loaded is the same too (the weights in process memory, read at
load: the file is not mapped, so later changes to it do not reach the session).

The protobuf wire format is walked (``ModelProto.graph`` -> ``GraphProto.initializer`` -> ``TensorProto``)
reading only the small fields; the weights' bytes are skipped. A file the walker does not understand, or
without a large initializer, is loaded by path as before, so onnxruntime reports a broken file in its own words.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

MIN_EXTERNAL_BYTES = 1 << 20  # top-level initializers with at least this many raw_data bytes are read by numpy
FOLDER_KEY = "session.model_external_initializers_file_folder_path"  # where a model given as bytes finds its data
WEIGHTS_ATTR = "_mtrank_weights"  # the session attribute keeping the OrtValues (and arrays) onnxruntime uses alive

# onnx.proto field numbers, protobuf wire types, TensorProto data types numpy reads as they are stored
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_T_DIMS, _T_DATA_TYPE, _T_SEGMENT, _T_NAME, _T_RAW_DATA, _T_EXTERNAL_DATA, _T_DATA_LOCATION = 1, 2, 3, 8, 9, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_FIXED = {_I64: 8, _I32: 4}
_DTYPES = {1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2", 11: "<f8",
           12: "<u4", 13: "<u8"}


class WireError(ValueError):
    """The bytes are not a protobuf message this walker understands."""


@dataclass(frozen=True)
class _Field:
    number: int
    wire: int
    start: int  # the tag's first byte
    value: int  # the value's first byte (after a LEN field's length prefix)
    stop: int  # one past the value's last byte


@dataclass(frozen=True)
class Weight:
    """A large initializer's ``raw_data``: where it lies in the file and what it holds."""

    name: str
    dtype: str  # numpy dtype string (little-endian, as ONNX stores raw_data)
    dims: tuple[int, ...]
    offset: int
    length: int

    def read(self, path: Path) -> np.ndarray:
        """The tensor, read from ``path`` (ValueError when the file ends before ``offset + length``)."""
        dtype = np.dtype(self.dtype)
        arr = np.fromfile(path, dtype=dtype, count=self.length // dtype.itemsize, offset=self.offset)
        return arr.reshape(self.dims)


@dataclass(frozen=True)
class LeanModel:
    """The model's protobuf with every :class:`Weight` as a placeholder, and the weights."""

    model: bytes
    weights: tuple[Weight, ...]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _read_varint(fh: IO[bytes]) -> int:
    value = 0
    for shift in range(0, 70, 7):
        b = fh.read(1)
        if not b:
            raise WireError("truncated varint")
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
    raise WireError("varint longer than 10 bytes")


def _fields(fh: IO[bytes], start: int, end: int) -> Iterator[_Field]:
    """The fields of the message in bytes ``[start, end)`` of ``fh``, in order (values are not read)."""
    pos = start
    while pos < end:
        fh.seek(pos)
        tag = _read_varint(fh)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value = fh.tell()
            _read_varint(fh)
            stop = fh.tell()
        elif wire == _LEN:
            size = _read_varint(fh)
            value = fh.tell()
            stop = value + size
        elif wire in _FIXED:
            value = fh.tell()
            stop = value + _FIXED[wire]
        else:
            raise WireError(f"unsupported wire type {wire} at byte {pos}")
        if number == 0 or stop > end:
            raise WireError(f"malformed field at byte {pos}")
        yield _Field(number, wire, pos, value, stop)
        pos = stop


def _read(fh: IO[bytes], f: _Field) -> bytes:
    """The whole field: tag, length prefix and value."""
    fh.seek(f.start)
    return fh.read(f.stop - f.start)


def _varints(fh: IO[bytes], f: _Field) -> list[int]:
    """A varint field's value, or a packed repeated varint field's values."""
    fh.seek(f.value)
    if f.wire == _VARINT:
        return [_read_varint(fh)]
    out = []
    while fh.tell() < f.stop:
        out.append(_read_varint(fh))
    return out


def _tensor(fh: IO[bytes], t: _Field, location: str, min_bytes: int) -> tuple[bytes, Weight] | None:
    """The TensorProto ``t`` re-encoded with its ``raw_data`` as external data at its offset in ``location``, and
    the :class:`Weight`; None to keep it as it is (raw_data absent, under ``min_bytes``, twice present or of a
    type numpy does not read as stored; the tensor already external or in segments)."""
    kept: list[bytes] = []
    raw: _Field | None = None
    dims: list[int] = []
    data_type, name = 0, b""
    for f in _fields(fh, t.value, t.stop):
        if f.number in (_T_EXTERNAL_DATA, _T_DATA_LOCATION, _T_SEGMENT) or (f.number == _T_RAW_DATA and raw):
            return None
        if f.number == _T_RAW_DATA and f.wire == _LEN:
            raw = f
            continue
        kept.append(_read(fh, f))
        if f.number == _T_DIMS and f.wire in (_VARINT, _LEN):
            dims += _varints(fh, f)
        elif f.number == _T_DATA_TYPE and f.wire == _VARINT:
            data_type = _varints(fh, f)[0]
        elif f.number == _T_NAME and f.wire == _LEN:
            name = kept[-1][f.value - f.start:]
    if raw is None or raw.stop - raw.value < min_bytes or data_type not in _DTYPES:
        return None
    dtype = np.dtype(_DTYPES[data_type])
    if raw.stop - raw.value != int(np.prod(dims, dtype=np.int64)) * dtype.itemsize:
        return None  # leave a size mismatch to onnxruntime's own check
    weight = Weight(name.decode(), _DTYPES[data_type], tuple(dims), raw.value, raw.stop - raw.value)
    entries = {"location": location, "offset": str(weight.offset), "length": str(weight.length)}
    external = [_len_field(_T_EXTERNAL_DATA, _len_field(1, k.encode()) + _len_field(2, v.encode()))
                for k, v in entries.items()]
    placeholder = b"".join(kept + external) + _varint(_T_DATA_LOCATION << 3 | _VARINT) + _varint(_EXTERNAL)
    return placeholder, weight


def _graph(fh: IO[bytes], g: _Field, location: str, min_bytes: int) -> tuple[bytes, list[Weight]]:
    """The GraphProto ``g`` with its large initializers as placeholders, and their weights."""
    parts, weights = [], []
    for f in _fields(fh, g.value, g.stop):
        lean = _tensor(fh, f, location, min_bytes) if f.number == _GRAPH_INITIALIZER and f.wire == _LEN else None
        if lean is None:
            parts.append(_read(fh, f))
        else:
            parts.append(_len_field(_GRAPH_INITIALIZER, lean[0]))
            weights.append(lean[1])
    return b"".join(parts), weights


def lean_model(path: str | Path, min_bytes: int = MIN_EXTERNAL_BYTES) -> LeanModel | None:
    """The ONNX model at ``path`` with every top-level graph initializer holding at least ``min_bytes`` of
    ``raw_data`` (in a dtype numpy reads as stored) turned into a placeholder: external data pointing into
    ``path`` itself (``location`` its file name, resolved against :data:`FOLDER_KEY`). None when there is no such
    initializer, or the file is not a protobuf the walker understands (load it by path then). Reads only the
    fields around the weights; OSError when the file cannot be read."""
    path = Path(path)
    with path.open("rb") as fh:
        end = fh.seek(0, 2)
        parts, weights = [], []
        try:
            for f in _fields(fh, 0, end):
                if f.number == _MODEL_GRAPH and f.wire == _LEN:
                    graph, found = _graph(fh, f, path.name, min_bytes)
                    parts.append(_len_field(_MODEL_GRAPH, graph))
                    weights += found
                else:
                    parts.append(_read(fh, f))
        except (WireError, UnicodeDecodeError):
            return None
    return LeanModel(b"".join(parts), tuple(weights)) if weights else None


def session(path: str | Path, options: Any, providers: list[str], min_bytes: int = MIN_EXTERNAL_BYTES) -> Any:
    """``onnxruntime.InferenceSession(path, options, providers)``, loaded with its large weights held once.

    With :func:`lean_model`, each weight is read into a numpy array and given to onnxruntime with
    ``options.add_initializer`` (used in place, not copied; the session keeps their OrtValues in its attribute
    :data:`WEIGHTS_ATTR`) and :data:`FOLDER_KEY` is set on ``options``; otherwise the file is loaded by path.
    ``options`` is an ``onnxruntime.SessionOptions`` used for this one session. onnxruntime errors propagate.
    """
    import onnxruntime as ort

    path = Path(path)
    lean = lean_model(path, min_bytes)
    if lean is None:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    values = [ort.OrtValue.ortvalue_from_numpy(w.read(path)) for w in lean.weights]  # each keeps its array
    for w, value in zip(lean.weights, values):
        options.add_initializer(w.name, value)
    options.add_session_config_entry(FOLDER_KEY, str(path.parent.resolve()))
    sess = ort.InferenceSession(lean.model, sess_options=options, providers=providers)
    setattr(sess, WEIGHTS_ATTR, values)  # onnxruntime holds raw pointers to them: they live as long as the session
    return sess


def cpu_session(path: str | Path, intra_threads: int = 1, inter_threads: int = 1, allow_spinning: bool = False) -> Any:
    """THE onnxruntime session setup (serving, export checks, refresh scoring, benchmarks): CPU provider, sequential
    execution, every graph optimisation, warnings and errors only, thread spinning off unless ``allow_spinning``
    (busy-waiting threads lower latency but burn the CPU that other workers need); loaded by :func:`session`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_threads
    opts.inter_op_num_threads = inter_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    spin = "1" if allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return session(path, opts, ["CPUExecutionProvider"])
