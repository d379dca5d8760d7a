"""Feature encoding shared by the trainer and the service (numpy and the C hash ``mtrank._fnv``; no torch, no pandas).

Raw values become two arrays per side (``request`` = user + context features, ``item``):

* ``ids``   int64   [n, S]  global rows of one shared embedding table (row 0 = padding)
* ``dense`` float32 [n, D]  normalised numeric values

Each categorical feature owns a contiguous block of rows ``[offset, offset + size)`` in the table:
local 0 is "missing", hashed values land in ``1 + fnv1a64(value) % buckets``; vocabularies use
local 1 for out-of-vocabulary and ``2 + index`` for known values. A multi-valued feature takes
``max_len`` slots; unused slots hold the padding row 0, which the model masks out when pooling.

Values are canonicalised to strings before hashing (``canonical_strings``) so that the CSV cell
``"21"``, the JSON number ``21`` and the JSON number ``21.0`` hash alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from mtrank import _fnv

SIDES: dict[str, tuple[str, ...]] = {"request": ("user", "context"), "item": ("item",)}
Group = Literal["request", "item"]


def fnv1a64(values: np.ndarray | Sequence[str]) -> np.ndarray:
    """FNV-1a 64-bit hash of each string's UTF-8 bytes: uint64 with the shape of ``values`` (``mtrank._fnv``).

    Stable across processes and platforms (unlike ``hash()``), reproducible in any language. A lone
    UTF-16 surrogate (which JSON's ``\\ud800`` escape can produce, but UTF-8 cannot encode) hashes as
    its 3-byte ``surrogatepass`` form (U+D800 -> ``ED A0 80``), so every Python string has one defined
    byte form; strings without lone surrogates hash their plain UTF-8 bytes. The service rejects such
    strings at validation (422), so this is the backstop for values that reach the encoder otherwise
    (e.g. feature-store rows).
    """
    values = np.ascontiguousarray(values, dtype=str)
    out = np.empty(values.shape, dtype=np.uint64)
    if values.size:
        flat = values.reshape(-1)  # unicode [n], each value zero-padded to the dtype's width
        _fnv.ucs4(flat.view(np.uint32), flat.dtype.itemsize // 4, out.reshape(-1))
    return out


def fnv1a64_decimal(x: np.ndarray) -> np.ndarray:
    """int64 [...] -> uint64 [...]: ``fnv1a64`` of each value's decimal string (``str(int(v))``: ``-`` then the
    digits, no leading zeros), computed without making strings (``mtrank._fnv``)."""
    x = np.ascontiguousarray(x, dtype=np.int64)
    out = np.empty(x.shape, dtype=np.uint64)
    _fnv.decimal(x.reshape(-1), out.reshape(-1))
    return out


def fnv1a64_text(s: str) -> int:
    """``fnv1a64`` of one string, without an array (a single key: the experiment arms' buckets)."""
    return _fnv.text(s.encode("utf-8", "surrogatepass"))


_ONE_CALL_UP_TO = 1 << 16  # hash_columns: text columns of up to this many values together are hashed in one call


def hash_columns(columns: Sequence[Sequence[Any] | np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw value columns, F of [n] -> (``fnv1a64`` of each canonical string, uint64 [F, n]; missing, bool [F, n]).

    Integer columns (an int64 array, or a list of Python ints: JSON ids) are hashed together from their digits
    (``fnv1a64_decimal``), the others together through ``canonical_strings``: two hashing calls for any number of
    columns, since for a request's few hundred values a call costs more than its values."""
    as_ints = {k: a for k, col in enumerate(columns) if (a := _int64(col)) is not None}
    ints, texts = list(as_ints), [k for k in range(len(columns)) if k not in as_ints]
    hashes = np.empty((len(columns), n), dtype=np.uint64)
    missing = np.zeros((len(columns), n), dtype=bool)
    if ints:
        hashes[ints] = fnv1a64_decimal(np.stack(list(as_ints.values())))
    if texts and n * len(texts) <= _ONE_CALL_UP_TO:  # a request's columns: one call for all
        canonical = [canonical_strings(columns[k]) for k in texts]
        hashes[texts] = fnv1a64(np.concatenate([strings for strings, _ in canonical])).reshape(len(texts), n)
        missing[texts] = [m for _, m in canonical]
    else:  # a training frame's: one column's strings at a time
        for k in texts:
            strings, missing[k] = canonical_strings(columns[k])
            hashes[k] = fnv1a64(strings)
    return hashes, missing


def _int64(col: Sequence[Any] | np.ndarray) -> np.ndarray | None:
    """An integer column (int64 array, or Python ints within int64) as int64 [n]; None for any other column."""
    if isinstance(col, np.ndarray):
        return col if col.dtype.kind == "i" and col.ndim == 1 else None
    if not col or set(map(type, col)) != {int}:
        return None
    try:
        return np.array(col, dtype=np.int64)
    except OverflowError:
        return None


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, uint64 -> uint64: every input bit flips each output bit with probability ~1/2.

    For a uniform draw from hashes whose high bits barely move between close inputs (FNV-1a of ``r1``, ``r2``,
    ...; the bits of nearby floats): the refresh holdout split by request id, the distinct-value sample of a
    streamed schema fit."""
    h = np.asarray(h, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _canonical(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):  # np.float64 is a float, but its repr is "np.float64(2.5)" (numpy 2)
        v = float(v)
        if v != v:  # NaN
            return None
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    s = str(v)
    return s


def canonical_strings(values: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values -> (unicode array, missing mask). Missing: None, NaN, empty string.

    Vectorised for the common columns (strings, integers, integral floats, each optionally with missing values);
    other mixes (booleans, fractional floats) take ``_canonical`` value by value."""
    arr = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
    if arr.dtype.kind == "U":
        out = arr
    elif arr.dtype.kind in "iu":
        out = arr.astype(str)
    elif arr.dtype.kind == "f" and np.all(np.isnan(arr) | ((arr == np.round(arr)) & (np.abs(arr) < 2**63))):
        nan = np.isnan(arr)  # integral floats (a pandas integer column with missing values): their int strings
        out = np.where(nan, 0, arr).astype(np.int64).astype(str)
        out[nan] = ""
    elif arr.dtype == object and arr.size and _NO_CONVERSION.issuperset(types := set(map(type, flat := arr.ravel().tolist()))):
        ints = _int64(flat) if types == {int} else None
        if ints is not None:
            out = ints.reshape(arr.shape).astype(str)
        else:
            out = np.array(list(map(str, flat)), dtype=str).reshape(arr.shape)  # str() is the canonical form of str and int
            if type(None) in types:
                out[arr == None] = ""  # noqa: E711 (elementwise)
    else:
        out = np.array([_canonical(v) or "" for v in arr.ravel().tolist()], dtype=str).reshape(arr.shape) if arr.size else np.zeros(arr.shape, dtype="<U1")
    missing = out == ""
    return out, missing


_NO_CONVERSION = frozenset({str, int, type(None)})  # exact types whose str() is their canonical string (None: missing)


@dataclass(frozen=True)
class FittedFeature:
    """One feature with everything needed to encode it; serialised into the bundle manifest."""

    name: str
    kind: Literal["categorical", "multi_categorical", "numeric"]
    side: Literal["user", "context", "item"]
    source: str  # column name in training data
    # categorical / multi_categorical
    encoding: Literal["hash", "vocab", "none"] = "none"
    buckets: int = 0
    vocab: list[str] = field(default_factory=list)
    offset: int = 0  # first global embedding row
    max_len: int = 1
    separator: str = "|"
    pooling: Literal["mean", "sum"] = "mean"
    # numeric
    transform: Literal["none", "log1p"] = "none"
    mean: float = 0.0
    std: float = 1.0
    default: float = 0.0  # raw units
    clip: float | None = 5.0  # |standardised value| bound; None: unbounded
    edges: list[float] = field(default_factory=list)  # piecewise-linear bin edges (transformed units); [] = scalar

    @property
    def group(self) -> Group:
        return "item" if self.side == "item" else "request"

    @property
    def size(self) -> int:
        """Rows this feature owns in the embedding table (0 for numeric)."""
        if self.kind == "numeric":
            return 0
        if self.encoding == "vocab":
            return len(self.vocab) + 2
        return self.buckets + 1

    @property
    def n_slots(self) -> int:
        return {"numeric": 0, "categorical": 1, "multi_categorical": self.max_len}[self.kind]

    @property
    def width(self) -> int:
        """Dense columns of a numeric feature: the standardised value, then one per piecewise-linear bin."""
        return 1 + max(len(self.edges) - 1, 0) if self.kind == "numeric" else 0


@dataclass(frozen=True)
class FittedSchema:
    """The frozen feature schema: the ordered features and the table size."""

    features: tuple[FittedFeature, ...]
    table_size: int  # rows of the shared embedding table, including padding row 0

    # ---- layout -------------------------------------------------------------------------
    def of(self, group: Group, kind: str | tuple[str, ...]) -> list[FittedFeature]:
        kinds = (kind,) if isinstance(kind, str) else kind
        return [f for f in self.features if f.group == group and f.kind in kinds]

    def id_features(self, group: Group) -> list[FittedFeature]:
        return self.of(group, ("categorical", "multi_categorical"))

    def dense_features(self, group: Group) -> list[FittedFeature]:
        return self.of(group, "numeric")

    def n_slots(self, group: Group) -> int:
        return sum(f.n_slots for f in self.id_features(group))

    def n_dense(self, group: Group) -> int:
        return sum(f.width for f in self.dense_features(group))

    def slot_fields(self, group: Group) -> list[int]:
        """Field index (position among the group's id features) of each id slot."""
        return [i for i, f in enumerate(self.id_features(group)) for _ in range(f.n_slots)]

    def input_names(self) -> list[str]:
        """ONNX input names in a fixed order, omitting empty groups."""
        names = []
        for g in ("request", "item"):
            if self.n_slots(g):
                names.append(f"{g}_ids")
            if self.n_dense(g):
                names.append(f"{g}_dense")
        return names

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"table_size": self.table_size, "hash": "fnv1a64-utf8", "features": [asdict(f) for f in self.features]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FittedSchema:
        if d.get("hash", "fnv1a64-utf8") != "fnv1a64-utf8":
            raise ValueError(f"schema.hash: unsupported hash function {d.get('hash')!r}")
        feats = tuple(FittedFeature(**f) for f in d["features"])
        return cls(features=feats, table_size=int(d["table_size"]))

    def feature(self, name: str) -> FittedFeature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)


# ------------------------------------------------------------------------------------ encoding


VocabIndex = tuple[np.ndarray, np.ndarray]  # (sorted vocabulary, position of each in the original order)


def vocab_index(f: FittedFeature) -> VocabIndex:
    vocab = np.asarray(f.vocab, dtype=str)
    order = np.argsort(vocab, kind="stable")
    return vocab[order], order.astype(np.int64)


def encode_categorical(f: FittedFeature, values: Sequence[Any] | np.ndarray, index: VocabIndex | None = None) -> np.ndarray:
    """Raw values [n] -> global embedding rows int64 [n]."""
    if f.encoding != "vocab":
        hashes, missing = (a[0] for a in hash_columns([values], len(values)))
        local = (hashes % np.uint64(f.buckets)).astype(np.int64) + 1
    else:
        strings, missing = canonical_strings(values)
        sorted_vocab, order = index if index is not None else vocab_index(f)
        if len(sorted_vocab):
            pos = np.clip(np.searchsorted(sorted_vocab, strings), 0, len(sorted_vocab) - 1)  # binary search, vectorised
            local = np.where(sorted_vocab[pos] == strings, order[pos] + 2, 1)  # known: 2 + index, else OOV 1
        else:
            local = np.ones(len(strings), dtype=np.int64)
    local[missing] = 0
    return local + f.offset


def _bag(v: Any, separator: str) -> list[str]:
    """One multi-valued cell -> its non-empty canonical tokens."""
    if v is None or (isinstance(v, float) and v != v):
        return []
    if isinstance(v, str):
        return [t for t in v.split(separator) if t]
    if isinstance(v, (list, tuple, np.ndarray)):
        return [t for t in map(_canonical, v) if t]
    return [t for t in (_canonical(v),) if t]


def encode_multi(f: FittedFeature, values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Bags (``"a|b"`` strings or lists) [n] -> global rows int64 [n, max_len], 0 = padding."""
    n = len(values)
    out = np.zeros((n, f.max_len), dtype=np.int64)
    bags = [_bag(v, f.separator)[: f.max_len] for v in values]
    lengths = np.fromiter(map(len, bags), dtype=np.int64, count=n)  # [n]
    total = int(lengths.sum())
    if total:
        tokens = np.fromiter((t for b in bags for t in b), dtype=f"<U{max(len(t) for b in bags for t in b)}", count=total)
        rows = np.repeat(np.arange(n), lengths)  # [total]
        cols = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # position within the bag
        out[rows, cols] = (fnv1a64(tokens) % np.uint64(f.buckets)).astype(np.int64) + 1 + f.offset
    return out


# A plain decimal numeral: optional sign, ASCII digits, optional fraction, optional exponent. No
# whitespace, underscores, hex, "inf"/"nan" or non-ASCII digits (all of which Python's float() takes).
_NUMERAL = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?", re.ASCII)


def numeric_value(v: Any) -> float | None:
    """The one rule for a raw value of a numeric feature: its float value, or None when it is not one.

    Accepted: ``bool`` (0.0 / 1.0), ``int`` and ``float`` (also numpy scalars), and ``str`` that is a plain
    decimal numeral (``_NUMERAL``: ``"12"``, ``"-0.5"``, ``"1e3"``), each only when the value is finite.
    Everything else is None: lists, ``"inf"``, ``"nan"``, ``"1e309"`` (overflows to inf), ``"1_000"``,
    ``" 12"``, ``""``, ``"0x10"``, ``"١٢"``, NaN and +-inf floats, integers too large for a float. The caller
    decides what None means (the service: a 422 for a request value, missing for a stored one). ``None``
    itself (missing) is the caller's to handle before calling.
    """
    t = type(v)
    if t is float or t is int or t is bool or isinstance(v, (int, float, np.integer, np.floating)):
        try:
            x = float(v)
        except OverflowError:  # an int beyond the float range
            return None
    elif t is str:
        if _NUMERAL.fullmatch(v) is None:
            return None
        x = float(v)
    else:
        return None
    return x if x - x == 0.0 else None  # finite (NaN and +-inf give NaN)


def to_float(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Raw numeric values -> float64 [n], NaN for missing (None, "") and for values ``numeric_value``
    refuses (so strings follow the service's rule; numeric arrays, what the trainer passes after
    ``pandas.to_numeric``, are converted as they are and non-finite values become the default later). A float64
    array comes back itself, not a copy."""
    arr = np.asarray(values)
    if arr.dtype.kind in "fiub":
        return arr.astype(np.float64, copy=False)
    out = np.empty(len(arr), dtype=np.float64)
    for i, v in enumerate(arr.tolist()):
        x = None if v is None else numeric_value(v)
        out[i] = np.nan if x is None else x
    return out


@dataclass(frozen=True)
class NumericPlan:
    """A group's numeric features, encoded together into the group's dense block float32 [n, D].

    Per feature, raw float64 values (NaN = missing) take the feature's default where missing or non-finite, then its
    transform (``log1p``: sign(x) * log(1 + |x|)). Its first column is the standardised value (x - mean) / std,
    clipped to +-``clip`` unless that is None. With bin edges b_0 < ... < b_K its next K columns are the
    piecewise-linear encoding (Gorishniy et al., NeurIPS 2022): bin k is 0 below b_{k-1}, 1 above b_k, and
    (x - b_{k-1}) / (b_k - b_{k-1}) inside. The features are computed as [F, n] arrays with their constants as
    [F, 1] columns: a few numpy calls per group, not per feature.
    """

    features: list[FittedFeature]
    columns: np.ndarray  # int64 [F]: each feature's first (standardised) column in the dense block
    width: int  # D, the block's columns
    default: np.ndarray  # float64 [F, 1]
    log1p: np.ndarray  # bool [F, 1]
    mean: np.ndarray  # float64 [F, 1]
    std: np.ndarray  # float64 [F, 1]
    clip: np.ndarray  # float64 [F, 1]; inf where the feature is unclipped
    bins: list[tuple[int, int, np.ndarray]]  # (feature index, its first bin column, edges float64 [K + 1])

    @classmethod
    def of(cls, features: list[FittedFeature]) -> NumericPlan:
        cols, bins, col = [], [], 0
        for k, f in enumerate(features):
            cols.append(col)
            if len(f.edges) >= 2:
                bins.append((k, col + 1, np.asarray(f.edges, dtype=np.float64)))
            col += f.width
        column = lambda values, dtype=np.float64: np.array(values, dtype=dtype).reshape(-1, 1)  # noqa: E731
        return cls(features, np.array(cols, dtype=np.int64), col, column([f.default for f in features]),
                   column([f.transform == "log1p" for f in features], bool), column([f.mean for f in features]),
                   column([f.std for f in features]),
                   column([np.inf if f.clip is None else f.clip for f in features]), bins)

    def encode(self, columns: Mapping[str, Any], n: int) -> np.ndarray:
        """columns: feature name -> raw values [n] (``to_float``; an absent feature is all missing) -> float32 [n, D]."""
        raw = np.empty((len(self.features), n), dtype=np.float64)  # [F, n]
        for k, f in enumerate(self.features):
            vals = columns.get(f.name)
            raw[k] = np.nan if vals is None else to_float(vals)
        x = np.where(np.isfinite(raw), raw, self.default)
        if self.log1p.any():
            x = np.where(self.log1p, np.sign(x) * np.log1p(np.abs(x)), x)
        dense = np.empty((n, self.width), dtype=np.float32)
        dense[:, self.columns] = np.clip((x - self.mean) / self.std, -self.clip, self.clip).T
        for k, col, e in self.bins:
            dense[:, col : col + len(e) - 1] = np.clip((x[k][:, None] - e[:-1]) / (e[1:] - e[:-1]), 0.0, 1.0)
        return dense


def _column(columns: Mapping[str, Any], name: str, n: int) -> Any:
    """A feature's raw values [n]; an absent feature is all missing."""
    vals = columns.get(name)
    return np.full(n, None, dtype=object) if vals is None else vals


class FeatureEncoder:
    """Encodes columns of raw values (keyed by feature name) into the model's input arrays."""

    def __init__(self, schema: FittedSchema):
        self.schema = schema
        self._vocab = {f.name: vocab_index(f) for f in schema.features if f.encoding == "vocab"}
        self._hashed = {group: self._hashed_plan(group) for group in SIDES}
        # per group: id features and id slots; the numeric features' plan (the schema is frozen: computed once)
        self._layout = {group: (schema.id_features(group), schema.n_slots(group)) for group in SIDES}
        self._numeric = {group: NumericPlan.of(schema.dense_features(group)) for group in SIDES}

    def _hashed_plan(self, group: Group) -> tuple[list[FittedFeature], list[int], np.ndarray, np.ndarray]:
        """The group's hashed categorical features, their id slots, buckets uint64 [F, 1] and row offsets int64 [F, 1]."""
        feats, slots, col = [], [], 0
        for f in self.schema.id_features(group):
            if f.kind == "categorical" and f.encoding != "vocab":
                feats.append(f)
                slots.append(col)
            col += f.n_slots
        return (feats, slots, np.array([[f.buckets] for f in feats], dtype=np.uint64).reshape(-1, 1),
                np.array([[f.offset] for f in feats], dtype=np.int64).reshape(-1, 1))

    def encode(self, group: Group, columns: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
        """columns: feature name -> raw values [n] (absent feature = all missing).

        Returns ``{"<group>_ids": int64 [n, S], "<group>_dense": float32 [n, D]}`` (empty parts omitted).
        """
        out: dict[str, np.ndarray] = {}
        id_feats, n_slots = self._layout[group]
        if id_feats:
            ids = np.empty((n, n_slots), dtype=np.int64)
            hashed, slots, buckets, offsets = self._hashed[group]
            if hashed:  # all hashed columns at once (see hash_columns)
                h, missing = hash_columns([_column(columns, f.name, n) for f in hashed], n)  # [F, n]
                local = (h % buckets).astype(np.int64) + 1
                local[missing] = 0
                ids[:, slots] = (local + offsets).T
            col = 0
            for f in id_feats:
                if f.kind == "categorical" and f.encoding == "vocab":
                    ids[:, col] = encode_categorical(f, _column(columns, f.name, n), self._vocab.get(f.name))
                elif f.kind != "categorical":
                    ids[:, col : col + f.max_len] = encode_multi(f, _column(columns, f.name, n))
                col += f.n_slots
            out[f"{group}_ids"] = ids
        numeric = self._numeric[group]
        if numeric.features:
            out[f"{group}_dense"] = numeric.encode(columns, n)
        return out

    def encode_all(self, columns: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
        """Both groups, row-aligned (the training layout)."""
        return {**self.encode("request", columns, n), **self.encode("item", columns, n)}

