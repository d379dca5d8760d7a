"""Tabular data -> fitted schema -> encoded arrays and labels, all vectorised (pandas/numpy).

``load_frames`` reads and splits, ``fit_schema`` fits vocabularies and normalisation on the train
split only, ``encode_split`` turns a frame into model inputs + labels + masks through the shared
``mtrank.encoding.FeatureEncoder`` (the same code path the service uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtrank.config import Config, ConfigError, DataConfig, NumericFeature, TaskConfig
from mtrank.encoding import FeatureEncoder, FittedFeature, FittedSchema, canonical_strings, mix64


@dataclass
class Split:
    """One encoded split. Arrays are row-aligned (N rows)."""

    inputs: dict[str, np.ndarray]  # request_ids [N, Sr] int64, request_dense [N, Dr] f32, item_* likewise
    labels: np.ndarray  # [N, T] float32 (0 where missing)
    mask: np.ndarray  # [N, T] bool, True where the label is present
    groups: np.ndarray | None  # [N] gAUC group keys

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: Path) -> None:
        extra = {} if self.groups is None else {"groups": self.groups.astype(str)}
        np.savez(path, labels=self.labels, mask=self.mask, **self.inputs, **extra)

    @classmethod
    def load(cls, path: Path) -> Split:
        z = np.load(path, allow_pickle=False)
        inputs = {k: z[k] for k in z.files if k.startswith(("request_", "item_"))}
        return cls(inputs, z["labels"], z["mask"], z["groups"] if "groups" in z.files else None)


# ----------------------------------------------------------------------------------- reading


def file_columns(data: DataConfig, path: Path, fmt: str) -> list[str]:
    """The column names of one data file, read from its header or schema (or ``data.columns``)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if not data.header:
        return list(data.columns or [])
    return [str(c) for c in pd.read_csv(path, sep=data.sep, nrows=0, skipinitialspace=True).columns]


def read_files(data: DataConfig, files: list[str], columns: dict[str, str]) -> pd.DataFrame:
    """Read CSV (optionally gzipped) or Parquet files; every column as text (canonical form).

    ``columns`` maps each needed column to the config field that names it; a column the file lacks is a
    ``ConfigError`` naming that field and the file.
    """
    frames = []
    for f in files:
        path = data.resolve(f)
        if not path.exists():
            raise ConfigError(f"data: file not found: {path}")
        fmt = data.format if data.format != "auto" else ("parquet" if path.suffix == ".parquet" else "csv")
        present = set(file_columns(data, path, fmt))
        missing = [(col, where) for col, where in columns.items() if col not in present]
        if missing:
            raise ConfigError("\n".join(f"{where}: column '{col}' not in {path.name}" for col, where in missing))
        if fmt == "parquet":
            df = pd.read_parquet(path, columns=list(columns))
        else:
            df = pd.read_csv(path, sep=data.sep, header=0 if data.header else None, names=data.columns,
                             usecols=list(columns), dtype=str, na_values=data.na_values, keep_default_na=False,
                             skipinitialspace=True, engine="c")
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def needed_columns(cfg: Config) -> dict[str, str]:
    """Every column the config reads -> the first config field that names it (for error messages)."""
    cols: dict[str, str] = {}
    for i, f in enumerate(cfg.features):
        cols.setdefault(f.source, f"features.{i}.{'column' if f.column else 'name'}")
    for i, t in enumerate(cfg.tasks):
        cols.setdefault(t.label.column, f"tasks.{i}.label.column")
    if cfg.eval.group_column:
        cols.setdefault(cfg.eval.group_column, "eval.group_column")
    return cols


def _carve(df: pd.DataFrame, fractions: list[float], seed: int) -> list[pd.DataFrame]:
    """Split rows by seeded permutation into len(fractions) + 1 parts (the rest comes first)."""
    perm = np.random.default_rng(seed).permutation(len(df))
    sizes = [int(round(f * len(df))) for f in fractions]
    rest = len(df) - sum(sizes)
    cuts = np.cumsum([rest, *sizes])[:-1]
    return [df.iloc[np.sort(idx)].reset_index(drop=True) for idx in np.split(perm, cuts)]


def load_frames(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, validation, test) frames following ``data.split``."""
    d, cols = cfg.data, needed_columns(cfg)
    train = read_files(d, d.train, cols)
    val = read_files(d, d.validation, cols) if d.validation else None
    test = read_files(d, d.test, cols) if d.test else None
    s = d.split
    if s.source == "test":
        if test is None:
            raise ConfigError("data.split.source: 'test' needs data.test files")
        if val is None:  # e.g. census: .test split 1:1 into validation and test
            test, val = _carve(test, [s.validation_fraction], s.seed)
    else:
        fractions = [s.validation_fraction if val is None else 0.0, s.test_fraction if test is None else 0.0]
        train, v, t = _carve(train, fractions, s.seed)
        val = v if val is None else val
        test = t if test is None else test
    if len(val) == 0:
        raise ConfigError("data.split: the validation split is empty")
    return train, val, test


# ------------------------------------------------------------------------------------ fitting


def _text(col: pd.Series) -> np.ndarray:
    """A column as a unicode array in canonical form, '' for missing."""
    if col.dtype.kind in "iuf":  # Parquet numerics: 21.0 -> "21", exactly as the service canonicalises
        return canonical_strings(col.to_numpy())[0]
    return col.fillna("").astype(str).to_numpy(dtype=str)


def vocab_counts(col: pd.Series, min_count: int) -> pd.Series:
    """Non-missing canonical values seen at least ``min_count`` times -> count, most frequent first."""
    return frequent(pd.Series(_text(col)).value_counts(), min_count)


def frequent(counts: pd.Series, min_count: int) -> pd.Series:
    """Value counts -> those of non-missing values seen at least ``min_count`` times, most frequent first, ties
    by value (so a vocabulary cut at ``max_vocab`` does not depend on the order rows were counted in)."""
    counts = counts[(counts.index != "") & (counts >= min_count)]
    return counts.iloc[np.lexsort((counts.index.to_numpy(dtype=str), -counts.to_numpy()))]


@dataclass
class _NumericStats:
    """One numeric feature over chunks: the raw mean (default), moments of the transformed finite values (Chan
    et al.'s pairwise update; one chunk gives numpy's own mean and std bit for bit), and its distinct values
    (piecewise linear only): all of them while at most ``limit``, else the ``limit`` of lowest ``mix64`` hash of their bits
    (a uniform sample of the distinct values, whatever their frequencies) plus the exact minimum and maximum."""

    spec: NumericFeature
    limit: int | None
    raw_sum: float = 0.0
    raw_n: int = 0
    raw_finite: bool = False
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    distinct: np.ndarray = field(default_factory=lambda: np.empty(0))
    pending: list[np.ndarray] = field(default_factory=list)  # chunks' distinct values not yet merged
    sampled: bool = False
    lo: float = math.inf
    hi: float = -math.inf

    def update(self, col: pd.Series) -> None:
        raw = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        self.raw_sum += float(np.nansum(raw))  # as np.nanmean sums
        self.raw_n += int(np.count_nonzero(~np.isnan(raw)))
        self.raw_finite |= bool(np.isfinite(raw).any())
        x = np.sign(raw) * np.log1p(np.abs(raw)) if self.spec.transform == "log1p" else raw
        finite = x[np.isfinite(x)]
        if not finite.size:
            return
        nb, mb = finite.size, float(finite.mean())
        m2b = float(((finite - mb) ** 2).sum())
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
        else:
            n, d = self.n + nb, mb - self.mean
            self.mean, self.m2 = self.mean + d * nb / n, self.m2 + m2b + d * d * self.n * nb / n
            self.n = n
        if self.spec.encoding == "piecewise_linear":
            self.lo, self.hi = min(self.lo, float(finite.min())), max(self.hi, float(finite.max()))
            self.pending.append(np.unique(finite))
            if sum(map(len, self.pending)) > len(self.distinct) + 65_536:  # merge when it doubles: amortised
                self.merge()

    def merge(self) -> np.ndarray:
        u = np.unique(np.concatenate([self.distinct, *self.pending]))
        if self.limit is not None and len(u) > self.limit:
            u, self.sampled = np.sort(u[np.argpartition(mix64((u + 0.0).view(np.uint64)), self.limit - 1)[: self.limit]]), True
        self.distinct, self.pending = u, []
        return u

    def fitted(self) -> FittedFeature:
        f = self.spec
        default = f.default if f.default is not None else (self.raw_sum / self.raw_n if self.raw_finite else 0.0)
        standard = f.normalize == "standard" and self.n > 0
        mean, std = (self.mean, math.sqrt(self.m2 / self.n)) if standard else (0.0, 1.0)
        edges: list[float] = []
        if f.encoding == "piecewise_linear" and self.n:
            q = np.quantile(self.merge(), np.linspace(0.0, 1.0, f.bins + 1))
            if self.sampled:
                q[0], q[-1] = self.lo, self.hi
            edges = np.unique(q).tolist()
            edges = edges if len(edges) >= 2 else []
        return FittedFeature(name=f.name, kind="numeric", side=f.side, source=f.source, transform=f.transform,
                             mean=mean, std=std if std > 1e-12 else 1.0, default=default, clip=f.clip, edges=edges)


@dataclass
class _Counts:
    """Value counts of one vocab feature over chunks (merged when the pending counts outgrow the merged ones)."""

    merged: pd.Series | None = None
    pending: list[pd.Series] = field(default_factory=list)

    def update(self, col: pd.Series) -> None:
        self.pending.append(pd.Series(_text(col)).value_counts())
        if sum(map(len, self.pending)) > (0 if self.merged is None else len(self.merged)) + 65_536:
            self.total()

    def total(self) -> pd.Series:
        parts = ([] if self.merged is None else [self.merged]) + self.pending
        self.merged = parts[0] if len(parts) == 1 else pd.concat(parts).groupby(level=0, sort=False).sum()
        self.pending = []
        return self.merged


class SchemaFitter:
    """Vocabularies and numeric statistics accumulated over chunks of train rows -> ``FittedSchema``.

    ``fit_schema`` passes the whole split as one chunk; ``model.stream`` passes record batches. Any chunking
    gives the same vocabularies, defaults, means and standard deviations equal up to float64 rounding, and the
    same piecewise-linear edges while a feature has at most ``distinct_limit`` distinct values (None: no bound).
    """

    def __init__(self, cfg: Config, distinct_limit: int | None = None):
        self.cfg = cfg
        self.stats: dict[str, _NumericStats | _Counts] = {}
        for f in cfg.features:
            if f.kind == "numeric":
                self.stats[f.name] = _NumericStats(f, distinct_limit)
            elif f.kind == "categorical" and f.encoding == "vocab":
                self.stats[f.name] = _Counts()

    @property
    def columns(self) -> list[str]:
        """The source columns fitting reads (hashed features need none)."""
        return list(dict.fromkeys(f.source for f in self.cfg.features if f.name in self.stats))

    def update(self, chunk: pd.DataFrame) -> None:
        for f in self.cfg.features:
            if f.name in self.stats:
                self.stats[f.name].update(chunk[f.source])

    def schema(self) -> FittedSchema:
        """Lay out the embedding rows (row 0 is padding) in feature order."""
        fitted: list[FittedFeature] = []
        offset = 1
        for f in self.cfg.features:
            st = self.stats.get(f.name)
            if isinstance(st, _NumericStats):
                fitted.append(st.fitted())
                continue
            if isinstance(st, _Counts):
                vocab = sorted(frequent(st.total(), f.min_count).index[: f.max_vocab].tolist())
                ff = FittedFeature(name=f.name, kind="categorical", side=f.side, source=f.source, encoding="vocab",
                                   vocab=vocab, offset=offset)
            elif f.kind == "categorical":
                ff = FittedFeature(name=f.name, kind="categorical", side=f.side, source=f.source, encoding="hash",
                                   buckets=f.buckets, offset=offset)
            else:
                ff = FittedFeature(name=f.name, kind="multi_categorical", side=f.side, source=f.source,
                                   encoding="hash", buckets=f.buckets, offset=offset, max_len=f.max_len,
                                   separator=f.separator, pooling=f.pooling)
            fitted.append(ff)
            offset += ff.size
        return FittedSchema(features=tuple(fitted), table_size=offset)


def fit_schema(cfg: Config, train: pd.DataFrame) -> FittedSchema:
    """Fit vocabularies and numeric statistics on the train split; lay out embedding rows."""
    fitter = SchemaFitter(cfg)
    fitter.update(train)
    return fitter.schema()


# ----------------------------------------------------------------------------------- encoding


def derive_label(task: TaskConfig, col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Column -> (label float32 [N], present bool [N]). Missing cells are masked, never imputed."""
    rule = task.label
    if rule.op in ("eq", "ne", "in"):
        text = pd.Series(_text(col))  # canonical strings: a Parquet 1.0 reads "1", like a CSV 1
        present = np.array(text != "", dtype=bool)
        values = rule.value if rule.op == "in" else [rule.value]
        hit = text.isin(canonical_strings(values)[0].tolist()).to_numpy()
        y = (~hit if rule.op == "ne" else hit).astype(np.float64)
    else:  # a number; a missing or non-numeric cell is not finite
        num = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        present = np.isfinite(num)
        if rule.op == "value":
            y = num
        else:
            cmp = {"gt": np.greater, "ge": np.greater_equal, "lt": np.less, "le": np.less_equal}[rule.op]
            y = cmp(np.nan_to_num(num), float(rule.value)).astype(np.float64)
    if task.type == "binary" and rule.op == "value":
        bad = present & ~np.isin(y, (0.0, 1.0))
        if bad.any():
            raise ConfigError(f"tasks.{task.name}.label: binary label column '{rule.column}' has values other than 0/1")
    return np.where(present, y, 0.0).astype(np.float32), present


def raw_columns(schema: FittedSchema, df: pd.DataFrame) -> dict[str, Any]:
    """Feature name -> raw column values, in the form the encoder accepts."""
    cols: dict[str, Any] = {}
    for f in schema.features:
        col = df[f.source]
        if f.kind == "numeric":
            cols[f.name] = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        elif f.kind == "categorical":
            cols[f.name] = _text(col)
        else:
            cols[f.name] = col.where(col.notna(), None).to_numpy(dtype=object)
    return cols


def encode_split(cfg: Config, schema: FittedSchema, df: pd.DataFrame, with_groups: bool = True) -> Split:
    """Encode a frame's features, labels and masks (and gAUC groups unless ``with_groups`` is off)."""
    inputs = FeatureEncoder(schema).encode_all(raw_columns(schema, df), len(df))
    labels = np.zeros((len(df), len(cfg.tasks)), dtype=np.float32)
    mask = np.zeros((len(df), len(cfg.tasks)), dtype=bool)
    for k, task in enumerate(cfg.tasks):
        labels[:, k], mask[:, k] = derive_label(task, df[task.label.column])
    groups = _text(df[cfg.eval.group_column]) if cfg.eval.group_column and with_groups else None
    return Split(inputs, labels, mask, groups)
