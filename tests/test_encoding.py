"""The shared encoder: stable hashing, canonical values, vocabularies, numeric normalisation."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from mtrank.encoding import (
    FeatureEncoder,
    FittedFeature,
    FittedSchema,
    canonical_strings,
    fnv1a64,
    fnv1a64_decimal,
    hash_columns,
    numeric_value,
    to_float,
)


def test_fnv1a64_known_vectors() -> None:
    # Reference values of FNV-1a 64 (http://www.isthe.com/chongo/tech/comp/fnv/ test vectors).
    got = fnv1a64(np.array(["", "a", "foobar"]))
    assert got.tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]


def _fnv_reference(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) % (1 << 64)
    return h


def test_fnv1a64_hashes_lone_surrogates_as_surrogatepass_bytes() -> None:
    """A lone surrogate (JSON "\\ud800") has no UTF-8 form: it used to raise (a 500 in the service); it now hashes
    its surrogatepass bytes, and every other string keeps its UTF-8 hash."""
    values = ["\ud800", "a\udfffb", "é", "😀", "plain"]
    got = fnv1a64(np.array(values)).tolist()
    assert got == [_fnv_reference(v.encode("utf-8", "surrogatepass")) for v in values]
    assert got[2:] == [_fnv_reference(v.encode("utf-8")) for v in values[2:]]
    enc = FeatureEncoder(_schema())
    out = enc.encode("item", {"tags": [["\ud800", "x"], "y|\udc00"]}, 2)["item_ids"]
    assert (out[:, :2] > 0).all()


def test_fnv1a64_equals_the_reference_on_random_strings() -> None:
    """The C hash (``mtrank._fnv``) against the byte-by-byte reference: code points of 1 to 4 UTF-8 bytes, interior
    NULs, strings of many widths in one array, a 2-D shape, and a column past the size hashed without the GIL."""
    from mtrank import _fnv

    rng = np.random.default_rng(3)
    alphabet = ["a", "Z", "0", "\x00", "é", "ß", "☃", "中", "\ud800", "\udfff", "😀", "\U0010ffff", "-", " "]
    values = ["".join(rng.choice(alphabet, rng.integers(0, 12))).rstrip("\x00") for _ in range(3000)]
    want = [_fnv_reference(v.encode("utf-8", "surrogatepass")) for v in values]
    assert fnv1a64(np.array(values)).tolist() == want
    assert fnv1a64(np.array(values).reshape(60, 50)).reshape(-1).tolist() == want
    big = [f"user-{i}" for i in range(70_000)]  # > 2**16: hashed with the GIL released
    assert fnv1a64(np.array(big))[[0, 65_536, 69_999]].tolist() == [_fnv_reference(big[i].encode()) for i in (0, 65_536, 69_999)]
    assert fnv1a64(np.array([], dtype=str)).shape == (0,)
    with pytest.raises(ValueError, match="code points"):
        _fnv.ucs4(np.zeros(6, dtype=np.uint32), 4, np.empty(2, dtype=np.uint64))  # 6 points are not 2 strings of 4
    with pytest.raises(TypeError, match="items of 8 bytes"):
        _fnv.decimal(np.zeros(3, dtype=np.int32), np.empty(3, dtype=np.uint64))


def test_integers_hash_from_their_digits_as_their_decimal_strings() -> None:
    """fnv1a64_decimal (no strings made) = fnv1a64 of str(int); hash_columns takes that path for integer columns
    (int64 arrays, lists of Python ints) and canonical strings for the rest, with the same result either way."""
    rng = np.random.default_rng(0)
    edges = [0, 1, -1, 9, 10, -10, 99, 100, 10**18 - 1, 10**18, 2**63 - 1, -(2**63)]
    ints = edges + rng.integers(-(2**63), 2**63 - 1, 500).tolist() + rng.integers(-5, 10**6, 500).tolist()
    want = [_fnv_reference(str(v).encode()) for v in ints]
    assert fnv1a64_decimal(np.array(ints, dtype=np.int64)).tolist() == want
    columns = [ints, np.array(ints, dtype=np.int64), [str(v) for v in ints], [float(v) for v in edges[:9]] * 113,
               [None, 2**64] + ints[2:], [True, 7] + ints[2:]]
    n = len(ints)
    hashes, missing = hash_columns([c[:n] for c in columns], n)
    for k, col in enumerate(columns):
        strings, miss = canonical_strings(col[:n])
        assert hashes[k].tolist() == fnv1a64(strings).tolist(), k
        assert missing[k].tolist() == miss.tolist(), k
    assert missing[4, 0] and not missing[4, 1:].any()
    big = [list(c[:n]) * 17 for c in columns]  # a training frame's size: text columns hashed one at a time
    hashes, missing = hash_columns(big, 17 * n)
    for k, col in enumerate(big):
        strings, miss = canonical_strings(col)
        assert hashes[k].tolist() == fnv1a64(strings).tolist() and missing[k].tolist() == miss.tolist(), k


def test_numeric_value_rule() -> None:
    """The one numeric-feature rule: finite numbers, booleans, plain decimal numerals; nothing else."""
    ok = [(1, 1.0), (-2.5, -2.5), (True, 1.0), (False, 0.0), ("12", 12.0), ("-0.5", -0.5), ("+7", 7.0), ("1e3", 1000.0),
          ("2.5E-1", 0.25), ("1e-400", 0.0), (np.float32(1.5), 1.5), (np.int64(3), 3.0), (2**63, float(2**63))]
    for v, want in ok:
        assert numeric_value(v) == want, v
    for v in ["inf", "-inf", "Infinity", "nan", "NaN", "1e309", "1_000", " 12", "12 ", "12\n", "", "0x10", "\u0661\u0662",
              ".5", "5.", "1e", "--1", "1,5", float("nan"), float("inf"), 10**400, [1], {}, b"1", None]:
        assert numeric_value(v) is None, v
    got = to_float(np.array(["12.5", "inf", "1_000", None, "", 3], dtype=object))
    np.testing.assert_array_equal(got, [12.5, np.nan, np.nan, np.nan, np.nan, 3.0])
    np.testing.assert_array_equal(to_float(np.array([1.0, np.inf])), [1.0, np.inf])  # numeric arrays (the trainer's): as they are


def test_hash_is_stable_across_processes() -> None:
    code = "import numpy as np; from mtrank.encoding import fnv1a64; print(int(fnv1a64(np.array(['user-42']))[0]))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout for seed in (1, 2)}
    assert len(outs) == 1
    assert int(outs.pop()) == int(fnv1a64(np.array(["user-42"]))[0])


def test_canonical_values() -> None:
    s, missing = canonical_strings([21, 21.0, "21", None, float("nan"), "", True, 2.5, "é"])
    assert s.tolist() == ["21", "21", "21", "", "", "", "true", "2.5", "é"]
    assert missing.tolist() == [False, False, False, True, True, True, False, False, False]
    assert canonical_strings([np.float64(2.5), np.float32(0.5)])[0].tolist() == ["2.5", "0.5"]  # as Python floats
    # float arrays (pandas integer columns with missing values): integral values as ints, else value by value (the
    # fraction as Python's repr, as a JSON number arrives at the service: numpy 2's repr of np.float64 used to leak)
    for values, want in (([3.0, np.nan, -7.0], ["3", "", "-7"]), ([3.0, np.nan, 2.5], ["3", "", "2.5"]),
                         ([1e19, 1.0], ["10000000000000000000", "1"])):
        assert canonical_strings(np.array(values))[0].tolist() == want, values


def _schema() -> FittedSchema:
    return FittedSchema(features=(
        FittedFeature(name="u", kind="categorical", side="user", source="u", encoding="hash", buckets=10, offset=1),
        FittedFeature(name="d", kind="categorical", side="context", source="d", encoding="vocab", vocab=["ios", "android"], offset=12),
        FittedFeature(name="x", kind="numeric", side="user", source="x", transform="log1p", mean=1.0, std=2.0, default=3.0, clip=1.0),
        FittedFeature(name="tags", kind="multi_categorical", side="item", source="tags", encoding="hash", buckets=5, offset=16, max_len=3),
    ), table_size=22)


def test_encoder_layout_and_rules() -> None:
    enc = FeatureEncoder(_schema())
    out = enc.encode("request", {"u": ["a", None, 7], "d": ["android", "web", None], "x": [0.0, None, 1e9]}, 3)
    ids, dense = out["request_ids"], out["request_dense"]
    assert ids.dtype == np.int64 and ids.shape == (3, 2)
    assert ids[1, 0] == 1  # missing -> local 0 of feature u
    assert 2 <= ids[0, 0] <= 11 and 2 <= ids[2, 0] <= 11
    assert ids[:, 1].tolist() == [12 + 3, 12 + 1, 12 + 0]  # vocab index 1 -> local 3; OOV -> 1; missing -> 0
    expected_missing = (np.log1p(3.0) - 1.0) / 2.0
    np.testing.assert_allclose(dense[:, 0], [-0.5, expected_missing, 1.0], rtol=1e-6)  # 1e9 clipped at +1
    items = enc.encode("item", {"tags": ["a|b", None, ["c", "d", "e", "f"]]}, 3)["item_ids"]
    assert items.shape == (3, 3)
    assert (items[0, 2] == 0) and (items[1] == 0).all() and (items[2] > 0).all()
    assert set(items[items > 0].tolist()) <= set(range(17, 22))


def test_schema_round_trip() -> None:
    s = _schema()
    assert FittedSchema.from_dict(s.to_dict()) == s
    assert s.input_names() == ["request_ids", "request_dense", "item_ids"]


def test_piecewise_linear_numeric_columns() -> None:
    """Standardised value then one column per bin: 0 below the bin, 1 above, linear inside; no clip when None."""
    f = FittedFeature(name="x", kind="numeric", side="item", source="x", mean=10.0, std=5.0, default=0.0, clip=None,
                      edges=[0.0, 10.0, 20.0, 40.0])
    schema = FittedSchema(features=(f,), table_size=1)
    assert f.width == 4 and schema.n_dense("item") == 4
    dense = FeatureEncoder(schema).encode("item", {"x": [-5.0, 5.0, 10.0, 30.0, 1000.0, None]}, 6)["item_dense"]
    assert dense.shape == (6, 4)
    np.testing.assert_allclose(dense[:, 0], [-3.0, -1.0, 0.0, 4.0, 198.0, -2.0])  # unclipped; None -> default 0
    np.testing.assert_allclose(dense[:, 1:], [[0, 0, 0], [0.5, 0, 0], [1, 0, 0], [1, 1, 0.5], [1, 1, 1], [0, 0, 0]])


def _numeric_reference(f: FittedFeature, raw: np.ndarray) -> np.ndarray:
    """The documented contract of one numeric feature's columns (``NumericPlan``), value by value in Python."""
    rows = []
    for v in raw.tolist():
        x = v if math.isfinite(v) else f.default
        if f.transform == "log1p":
            x = math.copysign(math.log1p(abs(x)), x) if x else 0.0
        z = (x - f.mean) / f.std
        row = [z if f.clip is None else min(max(z, -f.clip), f.clip)]
        e = f.edges
        row += [min(max((x - lo) / (hi - lo), 0.0), 1.0) for lo, hi in zip(e[:-1], e[1:])]
        rows.append(row)
    return np.array(rows, dtype=np.float32)


def test_numeric_features_are_encoded_together_as_each_alone_by_the_contract() -> None:
    """The encoder takes a group's numeric features in one pass (``NumericPlan``); every column must be what the
    contract gives the feature alone: transforms, clips (and none), defaults for missing, non-finite and non-numeric
    values, bins, an absent feature."""
    rng = np.random.default_rng(0)
    num = lambda name, **kw: FittedFeature(name=name, kind="numeric", side="item", source=name, **kw)  # noqa: E731
    feats = (num("a", transform="log1p", mean=1.5, std=0.7, default=2.0, clip=3.0),
             num("b", mean=-4.0, std=13.0, default=0.0, clip=None),
             num("binned", mean=10.0, std=5.0, edges=[0.0, 10.0, 20.0]),
             num("c", transform="log1p", mean=0.0, std=1e-3, default=-1.0, clip=5.0),
             num("logbins", transform="log1p", mean=1.0, std=2.0, clip=None, edges=[-1.0, 0.0, 0.5, 3.0]),
             num("absent", mean=1.0, std=2.0, default=7.0))
    schema = FittedSchema(features=feats, table_size=1)
    n = 257
    values = {"a": rng.lognormal(0, 3, n) * rng.choice([-1, 1], n), "b": rng.normal(0, 1e6, n),
              "binned": rng.uniform(-5, 25, n), "logbins": rng.normal(0, 10, n)}
    values["a"][:5] = [np.nan, np.inf, -np.inf, 0.0, -0.0]
    values["c"] = [None, "12", "x", True, 1e300, -3, 0.5] * 36 + [2.0] * 5
    dense = FeatureEncoder(schema).encode("item", values, n)["item_dense"]
    col = 0
    for f in feats:
        raw = to_float(values[f.name]) if f.name in values else np.full(n, np.nan)
        np.testing.assert_allclose(dense[:, col : col + f.width], _numeric_reference(f, raw), rtol=1e-6, atol=1e-6,
                                   err_msg=f.name)
        col += f.width
    assert col == dense.shape[1] == 11


def test_piecewise_linear_edges_follow_distinct_values() -> None:
    """A value that fills most rows (zeros of a capital-gains column) takes one edge, not every bin."""
    import pandas as pd

    from model.data import fit_schema
    from mtrank.config import parse_config

    cfg = parse_config({"data": {"train": ["x.csv"]}, "tasks": [{"name": "y", "label": {"column": "y"}}],
                        "features": [{"name": "gain", "kind": "numeric", "side": "user", "encoding": "piecewise_linear",
                                      "bins": 4, "clip": None}]})
    values = [0.0] * 950 + list(np.linspace(100.0, 10_000.0, 50))
    f = fit_schema(cfg, pd.DataFrame({"gain": [str(v) for v in values], "y": ["1"] * 1000})).feature("gain")
    assert len(f.edges) == 5 and f.edges[0] == 0.0 and f.edges[-1] == 10_000.0
    assert sum(e > 0 for e in f.edges) == 4  # every other edge lies among the non-zero values
