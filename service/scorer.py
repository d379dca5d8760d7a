"""One loaded bundle ready to score: ONNX session, feature encoder, calibration, compiled fusion.

A request is scored in one pass, vectorised over the candidates:

1. columns: per schema feature, the raw values over the whole candidate list (request value, else
   feature-store value, else None = the schema default); the request's columns come from the body parser
   (``service.rank_body``: lists, an integer column as int64 [n], a float column as float64 [n]); store
   values fill, one comprehension per feature, the candidates that sent none;
2. ``FeatureEncoder.encode("request", cols, 1)`` -> ``request_ids`` int64 [1, S_r], ``request_dense``
   float32 [1, D_r] (the graph broadcasts a request batch of 1 over the candidates) and
   ``encode("item", cols, n)`` -> ``item_ids`` int64 [n, S_i], ``item_dense`` float32 [n, D_i];
3. ONE ``InferenceSession.run`` fetching every task output ``p_<task>`` float32 [n] (plus gate
   outputs [n, m] when ``onnx.fetch_gates``: the observability hook);
4. calibration (``Calibration.apply``) per task, fusion over calibrated scores -> float64 [n],
   ``argsort`` -> top k.

:class:`InputError` (a 422 naming the field) is raised for request values the schema cannot take.
Instances are immutable after construction and shared by concurrent requests (onnxruntime's
``run`` is thread-safe).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np

from mtrank.bundle import BundleManifest, Calibration, verify_bundle
from mtrank.encoding import FeatureEncoder, FittedFeature, numeric_value
from mtrank.onnx_load import cpu_session
from mtrank.signing import Trust
from service import fusion as fusion_mod
from service.feature_store import EMPTY, Row, StoreResult
from service.settings import DEFAULT_PROFILE, FusionSettings, OnnxSettings, available_cores

log = logging.getLogger("mtrank.service.scorer")

Loc = tuple[str | int, ...]


class InputError(ValueError):
    """A request value the loaded schema cannot take; becomes a 422 naming ``loc``."""

    def __init__(self, loc: Loc, msg: str, kind: str = "value_error") -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.loc = loc
        self.msg = msg
        self.kind = kind


@dataclass
class RankInput:
    """What the scorer needs from a request (validated by ``service.rank_body``), candidates as rows or as columns:

    * rows: ``item_features``, one mapping per candidate, and optionally ``columns`` built from them;
    * rows as columns (``service.rank_body``'s scanned list form): ``columns`` only, every candidate sending every name;
    * columns (``columnar``, the request sent ``candidates`` as columns): ``columns`` only.
    """

    user_id: str | None
    context: Mapping[str, Any]
    item_ids: list[str]  # [n], unique
    item_features: list[Mapping[str, Any]] | None  # [n] per candidate; None when the request sent columns
    # feature name -> [n] values, every name sent (None = not sent; an integer column may be int64 [n], a float one
    # float64 [n])
    columns: Mapping[str, list[Any] | np.ndarray] | None = None
    columnar: bool = False

    def __post_init__(self) -> None:
        if self.columns is None and self.item_features is None:
            raise ValueError("RankInput: item_features or columns")

    def item_names(self) -> set[str]:
        """Every item feature name the request sent."""
        return set(self.columns) if self.columns is not None else set().union(*self.item_features or ())

    def column(self, name: str) -> list[Any] | np.ndarray | None:
        """The values the request sent for item feature ``name``, [n] (None where a candidate has none); None when
        the request has no such column (columns given and none names it)."""
        if self.columns is not None:
            return self.columns.get(name)
        return [f.get(name) for f in self.item_features or ()]

    def sent(self, i: int, name: str) -> Any:
        """The value the request sent for candidate ``i``'s feature ``name`` (None: none)."""
        if self.item_features is not None:
            return self.item_features[i].get(name)
        col = self.columns.get(name) if self.columns is not None else None
        return None if col is None else col[i]

    def item_loc(self, name: str, i: int | None = None) -> Loc:
        """Where candidate ``i``'s ``name`` is in the body (``i`` None: the first candidate sending it)."""
        if self.columnar:
            return ("body", "candidates", "features", name) + (() if i is None else (i,))
        if i is None:  # rows as columns: every candidate sent it
            i = 0 if self.item_features is None else next(j for j, f in enumerate(self.item_features) if name in f)
        return ("body", "candidates", i, "features", name)


@dataclass
class Scored:
    raw: dict[str, np.ndarray]  # task -> float32 [n], straight from the graph
    calibrated: dict[str, np.ndarray]  # task -> float32 [n]
    gates: dict[str, np.ndarray]  # gate output -> float32 [n, m] (empty when not fetched)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    cpu: dict[str, float] = field(default_factory=dict)  # stage -> CPU seconds of the thread that ran it

    def record(self, stage: str, start: tuple[float, float], end: tuple[float, float]) -> None:
        """A stage's wall and CPU seconds from two ``clock()`` readings taken on the thread that ran it."""
        self.timings[stage], self.cpu[stage] = end[0] - start[0], end[1] - start[1]


def clock() -> tuple[float, float]:
    """(wall, this thread's CPU) seconds now; a stage costs the difference of two readings (``Scored.record``)."""
    return time.perf_counter(), time.thread_time()


def _is_number(v: Any) -> bool:
    """Missing (None), or a value ``mtrank.encoding.numeric_value`` takes (the one numeric-feature rule)."""
    return v is None or numeric_value(v) is not None


_NUMBER = "a finite number, boolean or plain decimal numeral string"


def _is_scalar(v: Any) -> bool:
    return not isinstance(v, (list, tuple, dict))


def make_session(path: Path, s: OnnxSettings) -> Any:
    threads = available_cores() if s.intra_op_threads == "auto" else s.intra_op_threads
    return cpu_session(path, threads, s.inter_op_threads, s.allow_spinning)


class Model:
    """A verified bundle, compiled for serving. Build with :meth:`load` (slow: run it off the request path)."""

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, onnx: OnnxSettings, fusion: FusionSettings,
                 session: Any = None) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.version = manifest.model_version
        self.schema = manifest.schema
        self.encoder = FeatureEncoder(self.schema)
        self.onnx_settings = onnx
        self.session = session if session is not None else make_session(self.bundle_dir / "model.onnx", onnx)

        self.task_names: list[str] = manifest.scored_names
        self.task_set = frozenset(self.task_names)
        self.task_types = {t.name: t.type for t in manifest.tasks}
        task_outputs = [manifest.task(t).output for t in self.task_names]
        self.gate_outputs = [g.output for g in manifest.gates] if onnx.fetch_gates else []
        self.fetch = task_outputs + self.gate_outputs
        self.calibration: dict[str, Calibration] = {t: c for t, c in manifest.calibration.items()
                                                     if t in self.task_set and c.method != "identity"}

        feats = self.schema.features
        self.request_features: list[FittedFeature] = [f for f in feats if f.group == "request"]
        self.item_features: list[FittedFeature] = [f for f in feats if f.group == "item"]
        self.request_names = frozenset(f.name for f in self.request_features)
        self.item_names = frozenset(f.name for f in self.item_features)
        self.has_user_features = any(f.side == "user" for f in feats)
        self.has_item_features = bool(self.item_features)
        self.item_input = any(n.startswith("item") for n in manifest.inputs)

        # Fusion: profiles compiled against this bundle's tasks (a bad name fails the load).
        self.fusion_settings = fusion
        tasks = [(t.name, t.type, t.derived) for t in manifest.tasks]
        self.profiles: dict[str, fusion_mod.Fusion] = {
            DEFAULT_PROFILE: fusion_mod.weighted_sum(DEFAULT_PROFILE, fusion_mod.default_weights(tasks), set(self.task_set))}
        for name, profile in fusion.profiles.items():
            self.profiles[name] = fusion_mod.build_profile(name, profile, set(self.task_set))
        self._expr_cache: OrderedDict[str, fusion_mod.Fusion] = OrderedDict()
        self._expr_lock = Lock()

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, bundle_dir: Path, onnx: OnnxSettings, fusion: FusionSettings, trust: Trust | None = None) -> Model:
        """Verify the bundle with the serving session itself (signature with ``trust``, checksums, I/O, golden
        outputs, output sanity), build, warm up."""
        manifest, session = verify_bundle(bundle_dir, lambda path: make_session(path, onnx), trust=trust)
        model = cls(bundle_dir, manifest, onnx, fusion, session=session)
        model.warmup()
        return model

    def warmup(self) -> None:
        """Run every configured batch size a few times, and every fusion profile once."""
        for n in self.onnx_settings.warmup_candidates:
            inp = RankInput(None, {}, [f"warmup{i}" for i in range(n)], [{}] * n)
            for _ in range(self.onnx_settings.warmup_rounds):
                scored = self.score(inp, StoreResult())
            for f in self.profiles.values():
                f({t: v.astype(np.float64) for t, v in scored.calibrated.items()}, n)

    # ------------------------------------------------------------------------------ fusion
    def fusion_for(self, name: str, allow_expressions: bool, max_chars: int) -> fusion_mod.Fusion:
        """A profile by name, or (when allowed) a request expression compiled and cached (LRU)."""
        prof = self.profiles.get(name)
        if prof is not None:
            return prof
        if not allow_expressions:
            raise InputError(("body", "fusion"), f"unknown fusion profile {name!r} (profiles: {sorted(self.profiles)})")
        with self._expr_lock:
            hit = self._expr_cache.get(name)
            if hit is not None:
                self._expr_cache.move_to_end(name)
                return hit
        if len(name) > max_chars:
            raise InputError(("body", "fusion"), f"expression longer than {max_chars} characters")
        try:
            compiled = fusion_mod.expression(name, name, set(self.task_set))
        except fusion_mod.ExpressionError as err:
            msg = str(err).removeprefix(f"profile {name!r}: ")
            raise InputError(("body", "fusion"), f"not a profile ({sorted(self.profiles)}) nor a valid expression: {msg}") from None
        size = self.fusion_settings.expression_cache_size
        if size:
            with self._expr_lock:
                self._expr_cache[name] = compiled
                while len(self._expr_cache) > size:
                    self._expr_cache.popitem(last=False)
        return compiled

    # ----------------------------------------------------------------------------- columns
    def check_unknown(self, inp: RankInput, reject: bool) -> None:
        if not reject:
            return
        extra = set(inp.context) - self.request_names
        if extra:
            raise InputError(("body", "context", min(extra)), "unknown feature (not in the model's request-side schema)")
        extra = inp.item_names() - self.item_names
        if extra:
            raise InputError(inp.item_loc(min(extra)), "unknown feature (not in the model's item-side schema)")

    def check_request(self, inp: RankInput, reject_unknown: bool) -> None:
        """The request-side checks alone (for a request without candidates)."""
        self.check_unknown(inp, reject_unknown)
        self.request_columns(inp, EMPTY)

    def request_columns(self, inp: RankInput, user_row: Row) -> dict[str, Any]:
        """feature name -> [1] raw value: context, else the user's store row (user side), else missing."""
        ctx = inp.context
        cols: dict[str, Any] = {}
        for f in self.request_features:
            v = ctx.get(f.name)
            req_loc: Loc = ("body", "context", f.name)
            if f.name == "user_id" and f.side == "user" and inp.user_id is not None:
                v, req_loc = inp.user_id, ("body", "user_id")
            from_request = v is not None
            if v is None and f.side == "user":
                v = user_row.get(f.name)
            if f.kind == "numeric":
                x = None if v is None else numeric_value(v)
                if x is None and v is not None and from_request:
                    raise InputError(req_loc, f"numeric feature {f.name!r} needs {_NUMBER}, got {v!r}"[:300])
                cols[f.name] = np.array([np.nan if x is None else x], dtype=np.float64)  # bad store value = missing
                continue
            if not (f.kind == "multi_categorical" or _is_scalar(v)):
                if from_request:
                    raise InputError(req_loc, f"{f.kind} feature {f.name!r} needs a single value (not a list), got {v!r}"[:300])
                v = None  # a bad store value counts as missing
            cols[f.name] = [v]
        return cols

    def item_columns(self, inp: RankInput, rows: Sequence[Row]) -> dict[str, Any]:
        """feature name -> [n] raw values: candidate features, else store rows, else missing."""
        n = len(inp.item_ids)
        cols: dict[str, Any] = {}
        for f in self.item_features:
            name = f.name
            given = inp.item_ids if name == "item_id" else inp.column(name)  # the request's ids feed an item_id feature
            if isinstance(given, np.ndarray):  # an int64 or float64 column from the parser: every candidate's, checked
                cols[name] = given.astype(np.float64, copy=False) if f.kind == "numeric" else \
                    given if f.kind == "categorical" else given.tolist()
                continue
            if given is None:
                col: list[Any] = [r.get(name) for r in rows] if rows else [None] * n
            elif rows and name != "item_id" and None in given:  # store values fill the candidates that sent none
                col = [v if v is not None else r.get(name) for v, r in zip(given, rows)]
            else:
                col = given
            if f.kind == "numeric":
                cols[name] = self._numeric_column(f, col, inp)
            elif f.kind == "categorical":
                types = set(map(type, col))
                if types == {str}:
                    col = np.array(col)  # unicode [n]: the encoder's fast path (no per-value canonicalisation)
                elif list in types:
                    col = self._repair(f, col, inp, _is_scalar, "a single value (not a list)")
                cols[name] = col
            else:
                cols[name] = col
        return cols

    def _numeric_column(self, f: FittedFeature, col: list[Any], inp: RankInput) -> np.ndarray:
        """float64 [n], NaN = missing (the schema default). Request values follow ``numeric_value`` (else a
        422); store values it refuses count as missing."""
        if str not in map(type, col):  # no strings (the common case): numpy converts numbers, bools and None at once
            try:
                arr = np.array(col, dtype=np.float64)  # [n]; None -> NaN (= default)
                if arr.ndim == 1:  # request numbers are finite (schema); a store's +-inf becomes the default like NaN
                    return arr
            except (TypeError, ValueError, OverflowError):
                pass
        col = self._repair(f, col, inp, _is_number, _NUMBER)  # strings, lists, store values out of range
        return np.array([np.nan if v is None else numeric_value(v) for v in col], dtype=np.float64)

    def _repair(self, f: FittedFeature, col: list[Any], inp: RankInput, ok: Callable[[Any], bool], what: str) -> list[Any]:
        """Slow path: a request value of the wrong type -> InputError; a bad store value -> missing."""
        bad = [i for i, v in enumerate(col) if not ok(v)]
        for i in bad:
            if inp.sent(i, f.name) is not None:
                raise InputError(inp.item_loc(f.name, i), f"{f.kind} feature {f.name!r} needs {what}, got {col[i]!r}"[:300])
        col = list(col)
        for i in bad:
            col[i] = None
        return col

    # ----------------------------------------------------------------------------- scoring
    def encode(self, inp: RankInput, store: StoreResult, reject_unknown: bool = False) -> dict[str, np.ndarray]:
        self.check_unknown(inp, reject_unknown)
        n = len(inp.item_ids)
        inputs = self.encoder.encode("request", self.request_columns(inp, store.user), 1)  # [1, S_r], [1, D_r]
        if self.item_input:
            inputs.update(self.encoder.encode("item", self.item_columns(inp, store.items), n))  # [n, S_i], [n, D_i]
        else:  # no item features: the graph takes row-aligned request inputs
            inputs = {k: np.repeat(v, n, axis=0) for k, v in inputs.items()}
        return inputs

    def infer(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        outs = self.session.run(self.fetch, dict(inputs))  # ONE run: tasks [n] + gates [n, m]
        k = len(self.task_names)
        raw = dict(zip(self.task_names, outs[:k]))
        gates = dict(zip(self.gate_outputs, outs[k:]))
        return raw, gates

    def calibrate(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t: (self.calibration[t].apply(p) if t in self.calibration else p) for t, p in raw.items()}

    def score(self, inp: RankInput, store: StoreResult, reject_unknown: bool = False) -> Scored:
        """Encode, then :meth:`score_inputs`; the stages ``features`` and ``inference`` timed."""
        t0 = clock()
        inputs = self.encode(inp, store, reject_unknown)
        t1 = clock()
        scored = self.score_inputs(inputs)
        scored.record("features", t0, t1)
        return scored

    def score_inputs(self, inputs: Mapping[str, np.ndarray]) -> Scored:
        """The graph run on encoded inputs (ONNX Runtime runs it without the GIL), then calibration; the stage
        ``inference`` timed."""
        t1 = clock()
        raw, gates = self.infer(inputs)
        t2 = clock()
        scored = Scored(raw, self.calibrate(raw), gates)
        scored.record("inference", t1, t2)
        return scored


@dataclass
class Ranked:
    order: np.ndarray  # int64 [k], indices into the candidates, best first
    fused: np.ndarray  # float64 [n]
    scored: Scored


def order_scored(scored: Scored, fusion: fusion_mod.Fusion, n: int, top_k: int | None) -> Ranked:
    """Fuse the ``n`` candidates' calibrated scores, order them (stable: ties keep the request order), keep the top k."""
    fused = fusion({t: v.astype(np.float64) for t, v in scored.calibrated.items()}, n)  # [n]
    best = np.argsort(-fused, kind="stable")
    return Ranked(best if top_k is None else best[:top_k], fused, scored)


def rank(model: Model, inp: RankInput, store: StoreResult, fusion: fusion_mod.Fusion, top_k: int | None,
         reject_unknown: bool = False) -> Ranked:
    """Score and :func:`order_scored`: what /rank computes for a request, in one call (the handler splits it between the
    event loop and its inference thread, ``service.api.rank_items``)."""
    return order_scored(model.score(inp, store, reject_unknown), fusion, len(inp.item_ids), top_k)
