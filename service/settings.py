"""Service settings: defaults < YAML config file < ``MTRANK_*`` environment < explicit arguments.

Every key can come from the environment, nested with ``__``: ``MTRANK_FEATURE_STORE__BACKEND=redis``,
``MTRANK_FEATURE_STORE__REDIS__SOCKET_TIMEOUT_MS=20``, ``MTRANK_ADMIN__TOKEN=...``. Mappings and
lists take JSON (``MTRANK_EXPERIMENTS='[{"name": "a", "profile": "ctr_only", "traffic": 0.5}]'``).
``MTRANK_CONFIG`` names the YAML file when no path is passed (that is how uvicorn workers find it).

Problems raise :class:`mtrank.config.ConfigError` with one line per bad key, named by its dotted
path (``feature_store.redis.socket_timeout_ms: Input should be greater than 0``). Fusion expressions
are parsed here, so a syntax error fails at start; their task names are checked against each bundle
when it is loaded (see ``service.registry``).
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from mtrank.bundle import BundleError, check_version_name
from mtrank.config import ConfigError, read_yaml_mapping, union_tags

DEFAULT_PROFILE = "default"


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------- sections


class LimitsSettings(_S):
    max_candidates: int = Field(1000, gt=0)
    max_body_bytes: int = Field(1 << 20, gt=0)  # Content-Length and bytes actually read -> 413
    max_feedback_events: int = Field(1000, gt=0)  # events per POST /feedback
    max_expression_chars: int = Field(512, gt=0)  # request fusion expressions
    unknown_features: Literal["ignore", "reject"] = "ignore"  # feature names the schema does not know


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a container's ``cpus``),
    rounded down, at least 1."""
    n = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def _count_or_auto(v: Any) -> int | str:
    if v == "auto":
        return "auto"
    if type(v) is int or (type(v) is str and v.isdigit()):
        if int(v) >= 0:
            return int(v)
    raise ValueError(f"an integer >= 0 or auto, got {v!r}")


CountOrAuto = Annotated[int | Literal["auto"], PlainValidator(_count_or_auto)]


class OnnxSettings(_S):
    # auto: the available cores shared out among the workers' executor threads (Settings resolves it; standalone:
    # all of them);
    # 0 = onnxruntime's default (all cores)
    intra_op_threads: CountOrAuto = "auto"
    inter_op_threads: int = Field(1, ge=0)
    executor_threads: int = Field(2, gt=0)  # threads running inference (+ calibration, prediction log) off the loop
    allow_spinning: bool = False  # busy-wait in the thread pool: lower latency, burns CPU
    fetch_gates: bool = True  # also fetch gate outputs (observability hook)
    warmup_rounds: int = Field(3, ge=1)
    warmup_candidates: list[int] = [1, 16, 128]


class ReloadSettings(_S):
    poll_interval_ms: int = Field(1000, ge=0)  # CURRENT pointer polling; 0 disables
    pubsub_channel: str | None = "mtrank:reload"  # fleet reloads; needs a Redis URL (below)
    redis_url: str | None = None  # default: feature_store.redis.url when the backend is redis


class BundleTrustSettings(_S):
    """Which bundles the registry accepts (``mtrank.signing``): Ed25519 keys that may sign them."""

    public_keys: list[str] = []  # PEM files of trusted Ed25519 public keys (read and checked at start)
    require_signature: bool | None = None  # refuse unsigned bundles; default: true when public_keys is set

    @field_validator("public_keys")
    @classmethod
    def _keys_load(cls, v: list[str]) -> list[str]:
        from mtrank.signing import load_public_key

        for i, path in enumerate(v):
            try:
                load_public_key(path)
            except BundleError as err:
                raise ValueError(f"{i}: {err}") from None
        return v

    @model_validator(mode="after")
    def _require_needs_keys(self) -> BundleTrustSettings:
        if self.require_signature and not self.public_keys:
            raise ValueError("require_signature: needs at least one key in bundles.public_keys")
        return self

    @property
    def required(self) -> bool:
        """Whether an unsigned bundle is refused (``require_signature``, defaulting to "keys are configured")."""
        return bool(self.public_keys) if self.require_signature is None else self.require_signature


class AdminSettings(_S):
    token: SecretStr | None = None  # bearer token for /admin/*; unset = admin API disabled (403)


class RedisSettings(_S):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "mtrank"  # keys: <prefix>:user:<id>, <prefix>:item:<id> (JSON objects)
    socket_timeout_ms: float = Field(20.0, gt=0)
    connect_timeout_ms: float = Field(20.0, gt=0)
    budget_ms: float | None = Field(None, gt=0)  # whole lookup; default 2 x socket timeout
    retry_after_ms: float = Field(500.0, ge=0)  # after a failure, skip Redis this long (circuit breaker)
    cache_ttl_s: float = Field(5.0, ge=0)  # local TTL cache of user/item rows; 0 disables
    cache_max_entries: int = Field(100_000, ge=0)
    max_connections: int = Field(64, gt=0)

    @property
    def budget_s(self) -> float:
        return (self.budget_ms if self.budget_ms is not None else 2 * self.socket_timeout_ms) / 1000.0


class FeatureStoreSettings(_S):
    backend: Literal["embedded", "redis", "none"] = "embedded"
    snapshot: str | None = None  # embedded: one Parquet/CSV file keyed by both key columns
    user_snapshot: str | None = None  # embedded: rows keyed by user_key_column
    item_snapshot: str | None = None  # embedded: rows keyed by item_key_column
    user_key_column: str = "user_id"
    item_key_column: str = "item_id"
    redis: RedisSettings = RedisSettings()
    log_interval_s: float = Field(10.0, ge=0)  # rate limit of degradation warnings


# --------------------------------------------------------------------------------------- fusion


class WeightedSumProfile(_S):
    type: Literal["weighted_sum"] = "weighted_sum"
    weights: dict[str, float] = Field(min_length=1)


class WeightedProductProfile(_S):
    type: Literal["weighted_product"] = "weighted_product"
    weights: dict[str, float] = Field(min_length=1)
    eps: float = Field(1e-6, gt=0)  # scores are clipped to [eps, inf) before the power


class ExpressionProfile(_S):
    type: Literal["expression"] = "expression"
    expression: str = Field(min_length=1)

    @field_validator("expression")
    @classmethod
    def _parses(cls, v: str) -> str:
        from service.fusion import ExpressionError, parse_expression

        try:
            parse_expression(v)
        except ExpressionError as err:
            raise ValueError(str(err)) from None
        return v


FusionProfile = Annotated[WeightedSumProfile | WeightedProductProfile | ExpressionProfile, Field(discriminator="type")]


class FusionSettings(_S):
    # Named profiles. Unless one is named "default", "default" is weighted_sum with weight 1 on
    # every non-derived binary task of the loaded bundle.
    profiles: dict[str, FusionProfile] = {}
    default: str = DEFAULT_PROFILE  # profile used when a request names none (and no arm applies)
    allow_request_expressions: bool = False  # request "fusion" may be an expression string
    expression_cache_size: int = Field(256, ge=0)

    @model_validator(mode="after")
    def _default_exists(self) -> FusionSettings:
        if self.default != DEFAULT_PROFILE and self.default not in self.profiles:
            raise ValueError(f"default: profile {self.default!r} is not defined in fusion.profiles")
        return self

    def has(self, name: str) -> bool:
        return name == DEFAULT_PROFILE or name in self.profiles


class ExperimentArm(_S):
    name: str = Field(min_length=1, max_length=64)
    profile: str
    traffic: float = Field(gt=0.0, le=1.0)


class FeedbackLogNone(_S):
    """No feedback log (the default)."""

    kind: Literal["none"] = "none"


class FeedbackLogJsonl(_S):
    """Joined labels as JSON lines in ``dir``, one file per worker process, rotated (mtrank.feedback_log.JsonlWriter)."""

    kind: Literal["jsonl"] = "jsonl"
    dir: str = Field(min_length=1)  # created when missing
    max_bytes: int = Field(64 << 20, gt=0)  # a new file before a batch that would take the current one past this
    max_age_s: float | None = Field(3600.0, gt=0)  # ... or once the current one is this old; null: size only
    fsync: bool = False  # fsync after every batch (durable against a host crash, slower)


class FeedbackLogRedis(_S):
    """Joined labels on the Redis stream ``<feedback.key_prefix>:feedback``, at the join store's Redis URL
    (``feedback.redis_url``, else the feature store's) (mtrank.feedback_log.RedisStreamWriter)."""

    kind: Literal["redis"] = "redis"
    maxlen: int = Field(100_000, gt=0)  # XADD MAXLEN ~: stream entries kept (one per /feedback call that joined)


FeedbackLogSettings = Annotated[FeedbackLogNone | FeedbackLogJsonl | FeedbackLogRedis, Field(discriminator="kind")]


class FeedbackSettings(_S):
    # Prediction log + label dedup (service/feedback/). auto = redis when a Redis URL resolves (redis_url,
    # else feature_store.redis.url when that backend is redis), else sqlite when sqlite_path is set, else memory.
    backend: Literal["auto", "memory", "sqlite", "redis"] = "auto"
    max_events: int = Field(100_000, gt=0)  # memory/sqlite: labelled (request, item) keys kept (oldest evicted)
    prediction_requests: int = Field(50_000, gt=0)  # memory/sqlite: /rank responses kept for the feedback join
    prediction_items: int = Field(1_000_000, gt=0)  # ... and at most this many candidates over all of them
    prediction_ttl_s: float = Field(3600.0, gt=0)  # predictions, and labels (from their first label), expire
    # Labels whose request has no kept prediction when they arrive ("orphans": unknown or expired request ids)
    # get a bound of their own, so they cannot crowd out the labels that join: memory/sqlite keep at most
    # orphan_max_events such (request, item) keys (oldest evicted); every backend expires them after orphan_ttl_s.
    orphan_max_events: int = Field(10_000, gt=0)
    orphan_ttl_s: float = Field(300.0, gt=0)
    sqlite_path: str | None = None  # one file shared by the workers of a host (serve() sets one for workers > 1)
    sqlite_busy_timeout_ms: int = Field(1000, ge=0)  # wait this long for another process's write lock
    redis_url: str | None = None  # default: feature_store.redis.url when feature_store.backend is redis
    key_prefix: str = "mtrank"  # keys: <prefix>:pred:<request_id>, <prefix>:fb:<request_id>
    socket_timeout_ms: float = Field(50.0, gt=0)  # redis: socket and connect timeout
    retry_after_ms: float = Field(500.0, ge=0)  # redis, and the feedback log: after a failure, skip it this long
    # The feedback log (service/feedback/log.py): every joined label with its served scores, for `mtrank calibrate`.
    # A mapping without `kind` that names a `dir` is a jsonl log.
    log: FeedbackLogSettings = FeedbackLogNone()

    @field_validator("log", mode="before")
    @classmethod
    def _log_kind(cls, v: Any) -> Any:
        if isinstance(v, dict) and "kind" not in v and "dir" in v:
            return {**v, "kind": "jsonl"}
        return v

    @model_validator(mode="after")
    def _backend_needs(self) -> FeedbackSettings:
        if self.backend == "sqlite" and not self.sqlite_path:
            raise ValueError("sqlite_path: required when feedback.backend is sqlite")
        return self


class RoutingThresholds(_S):
    """When a routing check fails, per gate, over the monitoring window (docs/metrics.md, Routing checks)."""

    divergence: float = Field(0.05, gt=0, le=1)  # Jensen-Shannon divergence (bits) of live vs reference mean weights
    dead_fraction: float = Field(0.1, gt=0, lt=1)  # dead: an expert's mean weight < dead_fraction / n_experts
    collapse_share: float = Field(0.9, gt=0, le=1)  # collapse: one expert's mean weight > collapse_share
    entropy_delta: float = Field(0.2, gt=0, le=1)  # |live - reference| mean normalised entropy


class MonitoringSettings(_S):
    enabled: bool = True  # gate / calibration / drift / experiment counters per /rank
    window_s: float = Field(300.0, gt=0)  # sliding window of the routing checks, PSI and ECE
    interval_s: float = Field(5.0, gt=0)  # how often the window statistics are re-evaluated
    # per-request statistics reach the counters at least this often; a shorter interval is a shorter flush, which holds
    # the GIL while it counts (1 s at 120 req/s x 500 candidates: 60 000 candidates a flush; docs/benchmarks.md, half load)
    flush_interval_s: float = Field(0.25, gt=0)
    min_candidates: int = Field(500, ge=1)  # fewer candidates in the window: routing checks and PSI not evaluated
    min_labels: int = Field(100, ge=1)  # fewer joined labels in the window: ECE not evaluated
    calibration_buckets: int = Field(10, ge=2, le=100)  # equal-width buckets of the served probability
    calibration_edges: list[float] | None = None  # explicit edges instead (ascending, from 0 to 1)
    routing: RoutingThresholds = RoutingThresholds()

    @field_validator("calibration_edges")
    @classmethod
    def _edges(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if len(v) < 3 or v[0] != 0.0 or v[-1] != 1.0 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("need at least 3 strictly ascending edges from 0.0 to 1.0")
        return v

    def edges(self) -> list[float]:
        if self.calibration_edges is not None:
            return list(self.calibration_edges)
        n = self.calibration_buckets
        return [round(i / n, 10) for i in range(n + 1)]


class ShadowSettings(_S):
    version: str | None = None  # bundle version scored in the shadow slot (also settable with PUT /admin/shadow)
    sample: float = Field(0.1, ge=0.0, le=1.0)  # fraction of /rank requests scored by the shadow model
    queue_size: int = Field(64, gt=0)  # pending shadow jobs; a full queue drops (counted)
    top_k: int = Field(10, gt=0)  # k of the top-k overlap

    @field_validator("version")
    @classmethod
    def _version_name(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_version_name(v)
            except BundleError as err:
                raise ValueError(str(err).removeprefix(f"version {v!r}: ")) from None
        return v


class GCSettings(_S):
    freeze: bool = True  # gc.freeze() after start-up: long-lived objects leave the young generations
    gen0_threshold: int = Field(50_000, ge=0)  # 0 keeps Python's default (700)


class InterpreterSettings(_S):
    # sys.setswitchinterval after start-up: how long a thread holding the GIL runs on while another waits for it
    # (an inference thread back from onnxruntime, the event loop with a request). Python's default is 5 ms.
    switch_interval_ms: float = Field(0.5, gt=0, le=1000)


# ------------------------------------------------------------------------------------- settings


_FILE_DATA: ContextVar[dict[str, Any] | None] = ContextVar("mtrank_service_file_data", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MTRANK_", env_nested_delimiter="__", extra="forbid", frozen=True)

    bundles_dir: Path = Path("bundles")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(gt=0)  # uvicorn worker processes (Prometheus multiprocess mode when > 1); auto (default): cores
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    limits: LimitsSettings = LimitsSettings()
    onnx: OnnxSettings = OnnxSettings()
    reload: ReloadSettings = ReloadSettings()
    admin: AdminSettings = AdminSettings()
    bundles: BundleTrustSettings = BundleTrustSettings()  # bundle signatures (next to bundles_dir)
    feature_store: FeatureStoreSettings = FeatureStoreSettings()
    fusion: FusionSettings = FusionSettings()
    experiments: list[ExperimentArm] = []
    experiment_salt: str = "mtrank"
    feedback: FeedbackSettings = FeedbackSettings()
    gc: GCSettings = GCSettings()
    interpreter: InterpreterSettings = InterpreterSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    shadow: ShadowSettings = ShadowSettings()

    @model_validator(mode="before")
    @classmethod
    def _auto_parallelism(cls, data: Any) -> Any:
        """``workers: auto`` (the default) = ``available_cores()``; ``onnx.intra_op_threads: auto`` (the default) =
        the cores per inference thread: cores / (workers x ``onnx.executor_threads``), at least 1, so the ONNX Runtime
        threads of the runs that can be in flight at once do not oversubscribe the machine."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        cores = available_cores()
        if data.get("workers", "auto") == "auto":
            data["workers"] = cores
        onnx = data.get("onnx", {})
        if isinstance(onnx, OnnxSettings):
            auto, executors = onnx.intra_op_threads, onnx.executor_threads
        elif isinstance(onnx, dict):
            auto = onnx.get("intra_op_threads", "auto")
            executors = onnx.get("executor_threads", OnnxSettings.model_fields["executor_threads"].default)
        else:
            return data  # not a mapping: its own error names it
        try:
            threads = max(1, cores // (int(data["workers"]) * int(executors)))
        except (TypeError, ValueError, ZeroDivisionError):
            return data  # a bad workers or executor_threads value: its own error names it
        if auto == "auto":
            data["onnx"] = onnx.model_copy(update={"intra_op_threads": threads}) if isinstance(onnx, OnnxSettings) \
                else {**onnx, "intra_op_threads": threads}
        return data

    @model_validator(mode="after")
    def _experiments(self) -> Settings:
        names = [a.name for a in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError("experiments: arm names must be unique")
        for i, arm in enumerate(self.experiments):
            if not self.fusion.has(arm.profile):
                raise ValueError(f"experiments.{i}.profile: profile {arm.profile!r} is not defined in fusion.profiles")
        total = sum(a.traffic for a in self.experiments)
        if total > 1.0 + 1e-9:
            raise ValueError(f"experiments: traffic adds up to {total:g} (> 1)")
        return self

    @property
    def pubsub_url(self) -> str | None:
        if not self.reload.pubsub_channel:
            return None
        if self.reload.redis_url:
            return self.reload.redis_url
        return self.feature_store.redis.url if self.feature_store.backend == "redis" else None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        file_source = InitSettingsSource(settings_cls, init_kwargs=_FILE_DATA.get() or {})
        return init_settings, env_settings, file_source


_PROFILE_TAGS = ("weighted_sum", "weighted_product", "expression")
_LOG_TAGS = union_tags(FeedbackLogSettings)


def _format(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        parts = e["loc"]  # drop the discriminator tag pydantic inserts after a profile name and after feedback.log
        loc = ".".join(str(p) for i, p in enumerate(parts)
                       if not (i >= 2 and parts[i - 2] == "profiles" and p in _PROFILE_TAGS)
                       and not (i >= 1 and parts[i - 1] == "log" and p in _LOG_TAGS))
        msg = e["msg"].removeprefix("Value error, ")
        m = re.match(r"([\w.]+): (.*)", msg, re.DOTALL)  # model validators say "key.path: problem"
        if e["type"] == "value_error" and m:
            loc, msg = ".".join(p for p in (loc, m.group(1)) if p), m.group(2)
        lines.append(f"{loc or '<root>'}: {msg}")
    return f"invalid service config ({origin}):\n  " + "\n  ".join(lines)


def read_config_file(path: str | Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "service config")


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from (lowest first) defaults, the YAML file, ``MTRANK_*`` variables, ``overrides``.

    ``config_path`` defaults to ``$MTRANK_CONFIG``. Raises ConfigError naming every bad key.
    """
    config_path = config_path or os.environ.get("MTRANK_CONFIG") or None
    data = read_config_file(config_path) if config_path else {}
    token = _FILE_DATA.set(data)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        raise ConfigError(_format(err, str(config_path) if config_path else "environment")) from None
    finally:
        _FILE_DATA.reset(token)
