"""Typed experiment configuration: data, features, tasks, model, training.

A config is YAML validated by pydantic at the edge. Every error names the dotted path of the bad
key (``features.3.buckets: Input should be greater than 0``). ``--set a.b=c`` overrides are
applied to the raw mapping before validation, so they are validated like everything else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------- data


class SplitConfig(_Strict):
    """How validation/test rows are obtained when they are not given as files.

    ``source: train`` carves seeded fractions out of the training files; ``source: test`` splits the
    test files into validation and test (the MMoE census protocol: ``.test`` split 1:1).
    """

    source: Literal["train", "test"] = "train"
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 2024


class StreamConfig(_Strict):
    """Training data larger than memory (``model/stream.py``): Parquet row groups, ``interleave`` at a time, read in
    record batches of ``read_rows`` taken from each in turn, encoded, and mixed in a shuffle buffer of
    ``shuffle_buffer`` rows per process (a buffer of many batches from many row groups mixes well).

    The schema is fitted in one streamed pass over the train data, or on the first ``fit_sample_rows`` rows of
    the row groups in an order seeded by ``seed``. A piecewise-linear feature keeps at most ``distinct_sample``
    of its distinct values for its bin edges: all of them below that, a uniform sample of them above.
    """

    shuffle_buffer: int = Field(200_000, gt=0)  # rows per process that batches are drawn from (encoded, in memory)
    read_rows: int = Field(8192, gt=0)  # rows per record batch read from Parquet
    interleave: int = Field(64, gt=0)  # row groups read at once (an open one holds a few pages per column)
    fit_sample_rows: int | None = Field(None, gt=0)  # None: fit the schema on every row
    seed: int = 2024  # order of the row groups the fit sample is taken from
    distinct_sample: int = Field(1_000_000, ge=2)
    prefetch: bool = True  # read and encode in a background thread while the model trains


class DataConfig(_Strict):
    """Where the rows come from. With ``stream`` set, ``train`` entries may be Parquet files, directories (hive
    partitions such as ``day=2024-01-01/`` become columns) or globs, streamed; validation and test are read in
    memory, and validation files are required (a stream has no seeded fractions to carve)."""

    train: list[str] = Field(min_length=1)
    validation: list[str] = []
    test: list[str] = []
    format: Literal["auto", "csv", "parquet"] = "auto"
    header: bool = True
    columns: list[str] | None = None  # explicit column names (required when header is false)
    sep: str = ","
    na_values: list[str] = ["", "?", "NA", "NaN", "nan", "null"]
    split: SplitConfig = SplitConfig()
    stream: StreamConfig | None = None
    # Resolves ``${VAR:-default}`` and relative paths against this directory (set by the loader).
    base_dir: str = "."

    @model_validator(mode="after")
    def _columns_when_headerless(self) -> DataConfig:
        if not self.header and not self.columns:
            raise ValueError("columns: required when header is false")
        return self

    @model_validator(mode="after")
    def _stream_reads_parquet(self) -> DataConfig:
        if self.stream is None:
            return self
        if not self.validation:
            raise ValueError("data.validation: required with data.stream (streamed train data cannot be carved "
                             "into seeded validation and test fractions)")
        if self.format == "csv":
            raise ValueError("data.format: data.stream reads Parquet only, not 'csv'")
        for where, entries in (("train", self.train), ("test", self.test)):
            for i, entry in enumerate(entries):
                if entry.lower().endswith((".csv", ".csv.gz", ".gz", ".tsv", ".txt")):
                    raise ValueError(f"data.{where}.{i}: data.stream reads Parquet only, not {entry!r}")
        return self

    def resolve(self, path: str) -> Path:
        expanded = expand_env(path)
        p = Path(expanded)
        return p if p.is_absolute() else Path(self.base_dir) / p


def expand_env(value: str) -> str:
    """``${VAR:-default}`` and ``${VAR}`` expansion (os.path.expandvars lacks defaults)."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3)
        return os.environ.get(name, default if default is not None else m.group(0))

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


# ------------------------------------------------------------------------------------- features

Side = Literal["user", "context", "item"]


class _FeatureBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    column: str | None = None  # source column in the data; defaults to the name
    side: Side

    @property
    def source(self) -> str:
        return self.column or self.name


class CategoricalFeature(_FeatureBase):
    """A categorical id: hashed into ``buckets`` or looked up in a vocabulary fitted on train."""

    kind: Literal["categorical"] = "categorical"
    encoding: Literal["hash", "vocab"] = "hash"
    buckets: int = Field(1000, gt=0)  # hash only
    min_count: int = Field(1, ge=1)  # vocab only: rarer values map to the OOV bucket
    max_vocab: int = Field(100_000, gt=0)  # vocab only


class MultiCategoricalFeature(_FeatureBase):
    """A bag of categorical ids in one cell (``"a|b|c"``), hashed and mean/sum pooled."""

    kind: Literal["multi_categorical"] = "multi_categorical"
    buckets: int = Field(1000, gt=0)
    separator: str = "|"
    max_len: int = Field(8, gt=0)
    pooling: Literal["mean", "sum"] = "mean"


class NumericFeature(_FeatureBase):
    """A dense value: optional log1p, standardised with train-split statistics, clipped (``clip: null``: not).

    ``encoding: piecewise_linear`` adds ``bins`` columns (Gorishniy et al., NeurIPS 2022) after the
    standardised value, with edges at quantiles of the distinct transformed train values (so a value that
    fills most rows, like the zeros of a capital-gains column, takes one edge, not every bin).
    """

    kind: Literal["numeric"] = "numeric"
    transform: Literal["none", "log1p"] = "none"
    normalize: Literal["standard", "none"] = "standard"
    default: float | None = None  # raw value for missing cells; None = the train mean
    clip: float | None = Field(5.0, gt=0)
    encoding: Literal["scalar", "piecewise_linear"] = "scalar"
    bins: int = Field(16, ge=2, le=256)  # piecewise_linear only


Feature = Annotated[CategoricalFeature | MultiCategoricalFeature | NumericFeature, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------- tasks


class LabelRule(_Strict):
    """How a label is derived from a column. Missing cells give a masked (missing) label."""

    column: str
    op: Literal["eq", "ne", "gt", "ge", "lt", "le", "in", "value"] = "value"
    value: Any = None  # scalar for comparisons, list for ``in``; unused for ``value``

    @model_validator(mode="after")
    def _check_value(self) -> LabelRule:
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("value: op 'in' needs a list")
        if self.op not in ("value", "in") and self.value is None:
            raise ValueError(f"value: op '{self.op}' needs a value")
        return self


class ChainConfig(_Strict):
    """Entire-space chain (ESMM): p(task) = p(parent) * p(head); the head has no label of its own."""

    parent: str
    head: str  # name of the conditional head, e.g. "cvr"; exported as an output of its own


class TaskConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["binary", "regression"] = "binary"
    label: LabelRule
    weight: float = Field(1.0, ge=0.0)
    chain: ChainConfig | None = None


# ---------------------------------------------------------------------------------------- model

Arch = Literal["single", "shared_bottom", "mmoe", "cgc", "ple"]


class ModelConfig(_Strict):
    arch: Arch = "mmoe"
    embedding_dim: int = Field(8, gt=0)
    expert_hidden: list[int] = Field([64], min_length=1)  # expert (or bottom) MLP widths
    tower_hidden: list[int] = [32]
    n_experts: int = Field(4, gt=0)  # MMoE
    n_shared_experts: int = Field(2, ge=0)  # CGC/PLE
    n_task_experts: int = Field(1, gt=0)  # CGC/PLE, per task
    levels: int = Field(1, gt=0)  # PLE extraction levels (CGC is PLE with 1 level)
    gate_temperature: float = Field(1.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False  # batch norm after each hidden layer of experts, bottoms and towers
    expert_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # training only: drop each expert from a gate's mix


# ------------------------------------------------------------------------------------- training


STOPPING_KEYS = {"binary": ("auc", "gauc", "logloss", "ece"), "regression": ("mse", "mae")}


class EarlyStopping(_Strict):
    """``metric``: ``auto`` (``mean_auc`` when a task is binary, else ``loss``), ``mean_auc``, ``loss`` (the
    mean validation loss over tasks: log loss for binary, MSE for regression), or ``<task>.<key>`` with
    key auc, gauc, logloss or ece for a binary task and mse or mae for a regression task."""

    metric: str = "auto"
    patience: int = Field(2, ge=0)


class FixedBalancer(_Strict):
    kind: Literal["fixed"] = "fixed"


class UncertaintyBalancer(_Strict):
    kind: Literal["uncertainty"] = "uncertainty"


class GradNormBalancer(_Strict):
    kind: Literal["gradnorm"] = "gradnorm"
    alpha: float = Field(1.5, ge=0.0)  # asymmetry: how strongly tasks that train slower are pulled up
    lr: float = Field(0.025, gt=0)  # learning rate of the task weights (their own Adam group)


class DwaBalancer(_Strict):
    kind: Literal["dwa"] = "dwa"
    temperature: float = Field(2.0, gt=0)


class PcGradBalancer(_Strict):
    kind: Literal["pcgrad"] = "pcgrad"


class MgdaBalancer(_Strict):
    kind: Literal["mgda"] = "mgda"
    upper_bound: bool = False  # MGDA-UB: task gradients on the shared representation, not the shared parameters
    normalize: Literal["none", "l2", "loss"] = "none"  # task-gradient normalisation before the min-norm solve


BalancerConfig = Annotated[FixedBalancer | UncertaintyBalancer | GradNormBalancer | DwaBalancer | PcGradBalancer
                           | MgdaBalancer, Field(discriminator="kind")]


class GateRegularization(_Strict):
    """Terms added to the training objective, summed over every gate (mean over the batch)."""

    entropy_weight: float = Field(0.0, ge=0.0)
    entropy_towards: Literal["confident", "spread"] = "confident"  # minimise or maximise each gate's entropy
    load_balance_weight: float = Field(0.0, ge=0.0)  # Switch/GShard: m * sum_i f_i P_i (1 when balanced)


class Instruments(_Strict):
    """Training-dynamics instruments (metrics.json ``history``): per-task gradients on the shared parameters
    (norms, pairwise cosines) are taken on ``probes_per_epoch`` evenly spaced batches; 0 turns them off."""

    probes_per_epoch: int = Field(8, ge=0)


class TrainConfig(_Strict):
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(2048, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: to 0 over ``epochs``
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)  # evaluate and keep an exponential moving average of the weights
    seed: int = 0
    balancer: BalancerConfig = FixedBalancer()
    gates: GateRegularization = GateRegularization()
    grad_clip: float | None = Field(None, gt=0)  # max global gradient norm; clipped and non-finite steps are counted
    early_stopping: EarlyStopping = EarlyStopping()
    instruments: Instruments = Instruments()
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 = torch default
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when there is a GPU per process on the machine, else CPU
    progress: bool = True

    @field_validator("balancer", mode="before")
    @classmethod
    def _balancer_shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v


class EvalConfig(_Strict):
    group_column: str | None = None  # gAUC groups (e.g. a user id column)
    ece_bins: int = Field(10, gt=1)


class Config(_Strict):
    data: DataConfig
    features: list[Feature] = Field(min_length=1)
    tasks: list[TaskConfig] = Field(min_length=1)
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("features", mode="before")
    @classmethod
    def _default_kind(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [({"kind": "categorical", **f} if isinstance(f, dict) and "kind" not in f else f) for f in v]
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [f.name for f in self.features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"features: duplicate names {sorted(dup)}")
        tnames = [t.name for t in self.tasks]
        if len(set(tnames)) != len(tnames):
            raise ValueError("tasks: duplicate task names")
        heads = set()
        for i, t in enumerate(self.tasks):
            if t.chain is None:
                continue
            if t.chain.parent not in tnames or t.chain.parent == t.name:
                raise ValueError(f"tasks.{i}.chain.parent: '{t.chain.parent}' is not another task")
            parent = next(p for p in self.tasks if p.name == t.chain.parent)
            if parent.chain is not None or parent.type != "binary" or t.type != "binary":
                raise ValueError(f"tasks.{i}.chain: chains link two binary tasks, one level deep")
            if t.chain.head in tnames or t.chain.head in heads:
                raise ValueError(f"tasks.{i}.chain.head: '{t.chain.head}' clashes with another name")
            heads.add(t.chain.head)
        if self.model.arch in ("cgc", "ple") and self.model.n_shared_experts == 0 and len(self.tasks) == 1:
            raise ValueError("model.n_shared_experts: CGC/PLE with one task needs shared experts")
        if self.model.arch in ("single", "shared_bottom"):
            g = self.train.gates
            if g.entropy_weight or g.load_balance_weight or self.model.expert_dropout:
                raise ValueError(f"train.gates / model.expert_dropout: arch '{self.model.arch}' has no gates")
        self._check_stopping_metric()
        return self

    def _check_stopping_metric(self) -> None:
        metric = self.train.early_stopping.metric
        where = f"train.early_stopping.metric: {metric!r}"
        if metric in ("auto", "loss"):
            return
        if metric == "mean_auc":
            if not any(t.type == "binary" for t in self.tasks):
                raise ValueError(f"{where} needs a binary task; every task is regression (use 'loss' or "
                                 f"'<task>.mse')")
            return
        task, _, key = metric.partition(".")
        t = next((t for t in self.tasks if t.name == task), None)
        if t is None:
            raise ValueError(f"{where}: expected auto, mean_auc, loss or <task>.<key> with a task of "
                             f"{self.task_names}")
        if key not in STOPPING_KEYS[t.type]:
            raise ValueError(f"{where}: a {t.type} task's key is one of {list(STOPPING_KEYS[t.type])}")
        if key == "gauc" and not self.eval.group_column:
            raise ValueError(f"{where}: gauc needs eval.group_column")

    @property
    def stopping_metric(self) -> str:
        """The early-stopping metric with ``auto`` resolved: mean_auc when a task is binary, else loss."""
        metric = self.train.early_stopping.metric
        if metric != "auto":
            return metric
        return "mean_auc" if any(t.type == "binary" for t in self.tasks) else "loss"

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


# -------------------------------------------------------------------------------------- loading


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for p in parts[:-1]:
            if isinstance(node, list):
                node = node[int(p)]
            else:
                node = node.setdefault(p, {})
        last = parts[-1]
        parsed = yaml.safe_load(value) if value != "" else ""
        if isinstance(node, list):
            node[int(last)] = parsed
        else:
            node[last] = parsed
    return raw


def union_tags(union: Any) -> set[str]:
    """The ``kind`` tags of an ``Annotated[A | B | ..., Field(discriminator="kind")]`` union."""
    return {member.model_fields["kind"].default for member in get_args(get_args(union)[0])}


# Tags of the tagged unions (features, balancer): pydantic puts them in an error's location; the field path does not.
UNION_TAGS = union_tags(Feature) | union_tags(BalancerConfig)


def format_validation_error(err: ValidationError, title: str = "invalid config", tags: set[str] = UNION_TAGS) -> str:
    """One line per error, ``dotted.path: message``; the ``tags`` of tagged unions are left out of the path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in tags))
        msg = e["msg"].removeprefix("Value error, ")
        m = re.match(r"([\w.]+): (.*)", msg, re.DOTALL)  # a validator's "key.path: problem" names the key itself
        if e["type"] == "value_error" and m:
            key = m.group(1)
            loc = key if not loc or key == loc or key.startswith(loc + ".") else f"{loc}.{key}"
            msg = m.group(2)
        lines.append(f"{loc or '<root>'}: {msg}")
    return f"{title}:\n  " + "\n  ".join(lines)


def parse_config(raw: dict[str, Any], base_dir: str | Path = ".") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("invalid config: top level must be a mapping")
    raw = dict(raw)
    if isinstance(raw.get("data"), dict):
        raw["data"] = {"base_dir": str(base_dir), **raw["data"]}
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is ``{}``); ConfigError otherwise."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config; ``extends: other.yaml`` (relative to this file) is deep-merged under it."""
    if path in seen:
        raise ConfigError(f"{path}: extends cycle")
    raw = read_yaml_mapping(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a file name")
    return _deep_merge(_read_yaml((path.parent / parent).resolve(), (*seen, path)), raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path).resolve()
    raw = _read_yaml(path)
    apply_overrides(raw, overrides or [])
    return parse_config(raw, base_dir=path.parent)
