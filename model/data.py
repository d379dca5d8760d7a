"""Tabular data -> fitted schema -> encoded arrays and labels, all vectorised (pandas/numpy).

``load_frames`` reads and splits, ``fit_schema`` fits vocabularies and normalisation on the train
split only, ``encode_split`` turns a frame into model inputs + labels + masks through the shared
``mtrank.encoding.FeatureEncoder`` (the same code path the service uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtrank.config import Config, ConfigError, DataConfig, TaskConfig
from mtrank.encoding import FeatureEncoder, FittedFeature, FittedSchema, canonical_strings


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


def fit_schema(cfg: Config, train: pd.DataFrame) -> FittedSchema:
    """Fit vocabularies and numeric statistics on the train split; lay out embedding rows."""
    fitted: list[FittedFeature] = []
    offset = 1  # row 0 is padding
    for f in cfg.features:
        col = train[f.source]
        if f.kind == "numeric":
            raw = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
            x = np.sign(raw) * np.log1p(np.abs(raw)) if f.transform == "log1p" else raw
            finite = x[np.isfinite(x)]
            default = f.default if f.default is not None else (float(np.nanmean(raw)) if np.isfinite(raw).any() else 0.0)
            mean, std = (float(finite.mean()), float(finite.std())) if f.normalize == "standard" and finite.size else (0.0, 1.0)
            edges: list[float] = []
            if f.encoding == "piecewise_linear" and finite.size:
                distinct = np.unique(finite)
                edges = np.unique(np.quantile(distinct, np.linspace(0.0, 1.0, f.bins + 1))).tolist()
                edges = edges if len(edges) >= 2 else []
            fitted.append(FittedFeature(name=f.name, kind="numeric", side=f.side, source=f.source,
                                        transform=f.transform, mean=mean, std=std if std > 1e-12 else 1.0,
                                        default=default, clip=f.clip, edges=edges))
            continue
        if f.kind == "categorical" and f.encoding == "vocab":
            counts = pd.Series(_text(col)).value_counts()
            counts = counts[(counts.index != "") & (counts >= f.min_count)]
            vocab = sorted(counts.index[: f.max_vocab].tolist())
            ff = FittedFeature(name=f.name, kind="categorical", side=f.side, source=f.source, encoding="vocab",
                               vocab=vocab, offset=offset)
        elif f.kind == "categorical":
            ff = FittedFeature(name=f.name, kind="categorical", side=f.side, source=f.source, encoding="hash",
                               buckets=f.buckets, offset=offset)
        else:
            ff = FittedFeature(name=f.name, kind="multi_categorical", side=f.side, source=f.source, encoding="hash",
                               buckets=f.buckets, offset=offset, max_len=f.max_len, separator=f.separator,
                               pooling=f.pooling)
        fitted.append(ff)
        offset += ff.size
    return FittedSchema(features=tuple(fitted), table_size=offset)


# ----------------------------------------------------------------------------------- encoding


def derive_label(task: TaskConfig, col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Column -> (label float32 [N], present bool [N]). Missing cells are masked, never imputed."""
    rule = task.label
    text = pd.Series(_text(col))  # canonical strings: a Parquet 1.0 reads "1", like a CSV 1
    present = np.array(text != "", dtype=bool)
    if rule.op == "value":
        y = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        present &= np.isfinite(y)
    elif rule.op in ("eq", "ne", "in"):
        values = rule.value if rule.op == "in" else [rule.value]
        hit = text.isin(canonical_strings(values)[0].tolist()).to_numpy()
        y = (~hit if rule.op == "ne" else hit).astype(np.float64)
    else:
        num = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        present &= np.isfinite(num)
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


def encode_split(cfg: Config, schema: FittedSchema, df: pd.DataFrame) -> Split:
    inputs = FeatureEncoder(schema).encode_all(raw_columns(schema, df), len(df))
    labels = np.zeros((len(df), len(cfg.tasks)), dtype=np.float32)
    mask = np.zeros((len(df), len(cfg.tasks)), dtype=bool)
    for k, task in enumerate(cfg.tasks):
        labels[:, k], mask[:, k] = derive_label(task, df[task.label.column])
    groups = _text(df[cfg.eval.group_column]) if cfg.eval.group_column else None
    return Split(inputs, labels, mask, groups)
