"""The bundle: the versioned, self-describing contract between ``model/`` and ``service/``.

Layout (``docs/bundle.md`` is the reference)::

    BUNDLES_DIR/
      CURRENT                 one line naming the active version (replaced atomically)
      <version>/
        manifest.json         BundleManifest below
        model.onnx            inputs: request_ids/request_dense/item_ids/item_dense (present ones)
                              outputs: p_<task>, p_<chain head>, gate_l<level>_<owner>
        golden.json           encoded input rows + expected raw outputs
        signature.json        optional: Ed25519 signature over manifest.json (``mtrank.signing``)

Torch-free: reading, checksum verification, calibration and golden checks need numpy (and
onnxruntime for the golden run). Writing is atomic: a temporary sibling directory is filled,
fsynced and renamed into place, so a watcher never sees half a bundle.

Version names follow one rule (:data:`VERSION_PATTERN`, :func:`check_version_name`), checked by the
writer, the ``CURRENT`` pointer, the exporter and the service.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtrank.encoding import FittedSchema
from mtrank.onnx_load import cpu_session

if TYPE_CHECKING:
    from mtrank.signing import Trust

log = logging.getLogger("mtrank.bundle")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
GOLDEN = "golden.json"
CURRENT = "CURRENT"
MAX_MODEL_BYTES = 1 << 30  # single-file ONNX (protobuf limit is 2 GiB; we cap at 1 GiB)

# A version name: 1..200 characters of letters, digits, '.', '_', '-', starting with a letter or digit
# (so never hidden, never a path, never '..'), and not the pointer's own name (RESERVED_VERSIONS). Anchored
# for both regex engines that apply it: Python's ``re.fullmatch`` here and pydantic-core's (Rust) in
# ``service.schemas``.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
RESERVED_VERSIONS = frozenset({CURRENT})
VERSION_RULE = ("1-200 characters: letters, digits, '.', '_' and '-', starting with a letter or digit; "
                f"not {', '.join(sorted(RESERVED_VERSIONS))}")
_VERSION_RE = re.compile(VERSION_PATTERN)

# Output sanity on load (``check_outputs``): a regression task's reference outputs may leave the recorded
# range by RANGE_MARGIN x its width (+ RANGE_SLACK x its magnitude, for a range of width 0).
RANGE_MARGIN = 1.0
RANGE_SLACK = 1e-3
SWEEP_MAX_ROWS = 1 << 15  # reference sweep rows recorded at export (docs/bundle.md, "Output sanity")
SWEEP_BATCH = 1024  # the sweep runs in batches of this many rows (export and load alike: int8 scales per batch); a
# serving-sized batch, so the sweep does not grow the serving session's memory arena beyond what /rank needs


class BundleError(Exception):
    """A bundle failed a check; the message says which file and what."""


def check_version_name(version: str, what: str = "version") -> str:
    """Returns ``version`` when it follows the version-name rule; raises BundleError naming ``what`` otherwise.

    The one implementation of the rule (:data:`VERSION_PATTERN`, minus :data:`RESERVED_VERSIONS`): the
    exporter (``what="--version"``), :func:`write_bundle`, :func:`write_current`, :func:`list_versions` and
    the service's registry and admin API all call it.
    """
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or version in RESERVED_VERSIONS:
        raise BundleError(f"{what} {version!r}: not a valid version name ({VERSION_RULE})")
    return version


def is_version_name(version: str) -> bool:
    """:func:`check_version_name` as a predicate."""
    try:
        check_version_name(version)
    except BundleError:
        return False
    return True


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskInfo(_M):
    name: str
    type: Literal["binary", "regression"]
    output: str  # ONNX output name
    chain: dict[str, str] | None = None  # {"parent": ..., "head": ...}
    derived: bool = False  # a chain head: scored, but has no label of its own


class GateInfo(_M):
    output: str  # ONNX output name, [batch, n_experts]
    level: int
    owner: str  # task name, or "shared"
    experts: list[str]  # expert names, in column order


class Calibration(_M):
    """Piecewise-linear map raw -> calibrated score, applied with ``np.interp``. Frozen: the knots are read once."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Literal["identity", "isotonic", "platt"]
    x: list[float]
    y: list[float]
    ece_before: float | None = None
    ece_after: float | None = None
    logloss_before: float | None = None
    logloss_after: float | None = None

    @cached_property
    def _xy(self) -> tuple[np.ndarray, np.ndarray]:
        """The knots as float64 arrays, converted once (``np.interp`` on the lists converts them per call)."""
        return np.asarray(self.x, dtype=np.float64), np.asarray(self.y, dtype=np.float64)

    def apply(self, p: np.ndarray) -> np.ndarray:
        if self.method == "identity":
            return p
        return np.interp(p, *self._xy).astype(p.dtype, copy=False)


class Histogram(_M):
    edges: list[float]
    counts: list[int]


class ScoreRange(_M):
    """Smallest and largest raw output of one scored name over the validation split and the sweep rows."""

    min: float
    max: float


class Reference(_M):
    """Validation-set statistics the service monitors against, and the output ranges checked on load."""

    gate_mean: dict[str, list[float]] = {}  # gate output -> mean weight per expert
    gate_entropy: dict[str, float] = {}  # gate output -> mean entropy (nats)
    score_hist: dict[str, Histogram] = {}  # task -> histogram of raw scores
    # binary task -> histogram of calibrated scores (what the service serves; its drift baseline)
    calibrated_score_hist: dict[str, Histogram] = {}
    # Optional (bundles exported before them load without the range check):
    score_range: dict[str, ScoreRange] = {}  # scored name -> raw output range (validation + sweep rows)
    sweep_rows: int = Field(0, ge=0, le=SWEEP_MAX_ROWS)  # rows of the reference sweep (sweep_inputs); 0 = none


class Quantization(_M):
    mode: Literal["none", "int8"] = "none"
    max_abs_diff: float | None = None
    auc_delta: dict[str, float] = {}


class Lineage(_M):
    """Where a bundle came from. ``mtrank refresh`` warm-starts from ``run_dir``/model.pt (checked against
    ``checkpoint_sha256``); ``mtrank calibrate`` writes a child that shares the parent's model.onnx bytes."""

    kind: Literal["train", "refresh", "calibrate"] = "train"
    run_dir: str | None = None  # absolute path of the run directory the model was exported from
    checkpoint_sha256: str | None = None  # sha256 of that run's model.pt
    parent: str | None = None  # refresh / calibrate: the version this one was derived from
    detail: dict[str, Any] = {}  # what made it (refresh: the data window; calibrate: labels used, holdout ECE)


class BundleManifest(_M):
    format_version: int = FORMAT_VERSION
    model_version: str
    created_at: str
    arch: str
    sizes: dict[str, Any]  # embedding_dim, experts, levels, params, ...
    tasks: list[TaskInfo]
    gates: list[GateInfo]
    experts: list[str]
    schema_: dict[str, Any] = Field(alias="schema")
    inputs: list[str]
    opset: int
    calibration: dict[str, Calibration]
    reference: Reference
    metrics: dict[str, Any]  # validation metrics of the run
    quantization: Quantization = Quantization()
    lineage: Lineage = Lineage()  # bundles written before lineage was recorded read as kind "train", no run_dir
    files: dict[str, str] = {}  # file name -> sha256
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @cached_property
    def schema(self) -> FittedSchema:  # type: ignore[override]
        """The fitted feature schema, parsed once."""
        return FittedSchema.from_dict(self.schema_)

    def task(self, name: str) -> TaskInfo:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def scored_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def dump(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, mode="json"), indent=2, sort_keys=False)


# ------------------------------------------------------------------------------------ reading


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest_bytes(bundle_dir: str | Path) -> bytes:
    """The bytes of ``manifest.json`` (what a signature covers); BundleError when it is missing."""
    path = Path(bundle_dir) / MANIFEST
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None


def read_manifest(bundle_dir: str | Path, data: bytes | None = None) -> BundleManifest:
    """Parse and validate ``manifest.json`` (or ``data``, its bytes read earlier: verify once, parse the same bytes)."""
    path = Path(bundle_dir) / MANIFEST
    if data is None:
        data = read_manifest_bytes(bundle_dir)
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    if isinstance(raw, dict) and raw.get("format_version") not in (None, FORMAT_VERSION):
        raise BundleError(f"{path}: format_version {raw.get('format_version')} is not supported (want {FORMAT_VERSION})")
    try:
        manifest = BundleManifest.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors())
        raise BundleError(f"{path}: invalid manifest: {problems}") from None
    try:
        _ = manifest.schema  # the feature schema must rebuild too
    except (TypeError, KeyError, ValueError) as err:
        raise BundleError(f"{path}: invalid manifest: schema: {err}") from None
    return manifest


def verify_checksums(bundle_dir: str | Path, manifest: BundleManifest) -> None:
    bundle_dir = Path(bundle_dir)
    for required in (MODEL, GOLDEN):
        if required not in manifest.files:
            raise BundleError(f"{bundle_dir / MANIFEST}: files has no checksum for {required}")
    for name, expected in manifest.files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{path}: missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 mismatch (manifest {expected[:12]}…, file {actual[:12]}…)")


def load_golden(bundle_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    raw = json.loads((Path(bundle_dir) / GOLDEN).read_text())
    inputs = {k: np.asarray(v["data"], dtype=v["dtype"]) for k, v in raw["inputs"].items()}
    outputs = {k: np.asarray(v, dtype=np.float32) for k, v in raw["outputs"].items()}
    return inputs, outputs


def check_golden(bundle_dir: str | Path, run: Any, atol: float = 1e-4) -> float:
    """Run ``run(inputs) -> {name: array}`` on the golden inputs; returns the max abs difference."""
    inputs, expected = load_golden(bundle_dir)
    return _compare_golden(expected, run(inputs), atol)


def _compare_golden(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], atol: float) -> float:
    worst = 0.0
    for name, want in expected.items():
        if name not in got:
            raise BundleError(f"golden: model has no output {name!r}")
        diff = float(np.max(np.abs(np.asarray(got[name], dtype=np.float32) - want))) if want.size else 0.0
        worst = max(worst, diff)
        if not diff <= atol:
            raise BundleError(f"golden: output {name!r} differs from the expected values by {diff:.3g} (> {atol})")
    return worst


# ------------------------------------------------------------------------------- output sanity


def sweep_inputs(schema: FittedSchema, rows: int) -> dict[str, np.ndarray]:
    """The reference sweep: ``rows`` synthetic input rows, row-aligned (request and item inputs both [rows, ...]).

    Row ``r`` gives every slot of every categorical feature ``f`` the global embedding row
    ``f.offset + r % f.size`` and every numeric feature 0 (its training mean), so ``rows >= max(f.size)``
    rows read every row of the embedding table. Deterministic: the exporter and every loader build the same rows.
    """
    r = np.arange(rows, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for group in ("request", "item"):
        feats = schema.id_features(group)
        if feats:
            out[f"{group}_ids"] = np.concatenate(
                [np.repeat((f.offset + r % max(f.size, 1))[:, None], f.n_slots, axis=1) for f in feats], axis=1)
        n_dense = schema.n_dense(group)
        if n_dense:
            out[f"{group}_dense"] = np.zeros((rows, n_dense), dtype=np.float32)
    return out


def sweep_rows_for(schema: FittedSchema) -> int:
    """Rows the exporter records for the sweep: enough to read every embedding row, at most SWEEP_MAX_ROWS."""
    return min(SWEEP_MAX_ROWS, max([f.size for f in schema.features] + [1]))


def run_sweep(schema: FittedSchema, rows: int, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
              ) -> Iterator[dict[str, np.ndarray]]:
    """The sweep's outputs, one dict per batch of SWEEP_BATCH rows (exporter and loader batch alike)."""
    inputs = sweep_inputs(schema, rows)
    for i in range(0, rows, SWEEP_BATCH):
        yield run({k: v[i : i + SWEEP_BATCH] for k, v in inputs.items()})


def allowed_range(task_type: str, recorded: ScoreRange | None) -> tuple[float, float] | None:
    """The interval a task's reference outputs must lie in: [0, 1] for a binary task (always), else the
    recorded range widened by RANGE_MARGIN x its width + RANGE_SLACK x max(1, its magnitude) on each side
    (None: no range recorded, nothing to check)."""
    if task_type == "binary":
        return 0.0, 1.0
    if recorded is None:
        return None
    width = recorded.max - recorded.min
    pad = RANGE_MARGIN * width + RANGE_SLACK * max(1.0, abs(recorded.min), abs(recorded.max))
    return recorded.min - pad, recorded.max + pad


def check_outputs(manifest: BundleManifest, outputs: Mapping[str, np.ndarray], where: str) -> None:
    """Output sanity of one batch of reference outputs (``where`` names the rows in the message).

    Every output (tasks and gates) must be finite, binary tasks' outputs in [0, 1] and, with
    ``reference.score_range`` recorded, regression tasks' outputs in :func:`allowed_range`. BundleError
    naming the task otherwise.
    """
    for t in manifest.tasks:
        values = outputs.get(t.output)
        if values is None:
            continue
        values = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            raise BundleError(f"{where}: task {t.name!r} ({t.output}) has non-finite outputs "
                              f"({int(bad.sum())} of {values.size}, e.g. {values[bad][0]})")
        recorded = manifest.reference.score_range.get(t.name)
        bounds = allowed_range(t.type, recorded)
        if bounds is None or not values.size:
            continue
        lo, hi = bounds
        worst = values[np.argmax(np.maximum(lo - values, values - hi))]
        if not lo <= worst <= hi:
            what = "[0, 1] (a probability)" if recorded is None or t.type == "binary" else (
                f"[{lo:.6g}, {hi:.6g}] (the recorded range [{recorded.min:.6g}, {recorded.max:.6g}] widened)")
            raise BundleError(f"{where}: task {t.name!r} ({t.output}) outputs {worst:.6g}, outside {what}")
    for g in manifest.gates:
        values = outputs.get(g.output)
        if values is not None and not np.all(np.isfinite(values)):
            raise BundleError(f"{where}: gate {g.output!r} has non-finite weights")


def check_reference_outputs(bundle_dir: Path, manifest: BundleManifest, golden_outputs: Mapping[str, np.ndarray],
                            run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
    """Output sanity on the reference rows: the golden rows' outputs (already computed) and the sweep.

    A manifest without ``reference.score_range`` (exported before it existed) gets the golden rows checked
    for finite outputs and binary outputs in [0, 1] only; the regression range check and the sweep are
    skipped, with a log line.
    """
    check_outputs(manifest, golden_outputs, "golden rows")
    ref = manifest.reference
    if not ref.score_range or not ref.sweep_rows:
        log.info("%s: manifest has no reference.score_range / sweep_rows (exported before them): "
                 "output range check skipped", bundle_dir.name)
        return
    for k, batch in enumerate(run_sweep(manifest.schema, ref.sweep_rows, run)):
        last = min(ref.sweep_rows, (k + 1) * SWEEP_BATCH) - 1
        check_outputs(manifest, batch, f"sweep rows {k * SWEEP_BATCH}..{last}")


def session_runner(sess: Any) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A callable running every output of an onnxruntime session: ``run(inputs) -> {name: array}``."""
    names = [o.name for o in sess.get_outputs()]

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, inputs)))

    return run


def onnx_runner(model_path: str | Path, intra_threads: int = 1) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    return session_runner(cpu_session(model_path, intra_threads))


def verify_bundle(bundle_dir: str | Path, session_factory: Callable[[Path], Any] = cpu_session,
                  trust: Trust | None = None) -> tuple[BundleManifest, Any]:
    """Every check a loader makes before serving: signature (with ``trust``), manifest, checksums, size,
    I/O names, golden outputs, output sanity on the reference rows (``check_reference_outputs``).

    ``manifest.json`` is read once: the signature is verified over those bytes and the manifest parsed
    from them. Returns the manifest and the onnxruntime session the checks ran on (built by
    ``session_factory``, so a server can verify with the very session it will serve with). Raises
    BundleError naming the file (or task) and the problem.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: not a directory")
    data = read_manifest_bytes(bundle_dir)
    if trust is not None:
        trust.check(bundle_dir, data)
    manifest = read_manifest(bundle_dir, data)
    verify_checksums(bundle_dir, manifest)
    size = (bundle_dir / MODEL).stat().st_size
    if size > MAX_MODEL_BYTES:
        raise BundleError(f"{bundle_dir / MODEL}: {size} bytes exceeds the {MAX_MODEL_BYTES} byte limit")
    try:
        sess = session_factory(bundle_dir / MODEL)
    except Exception as err:  # onnxruntime raises its own exception types
        raise BundleError(f"{bundle_dir / MODEL}: onnxruntime cannot load it: {err}") from None
    in_names = [i.name for i in sess.get_inputs()]
    if in_names != manifest.inputs or in_names != manifest.schema.input_names():
        raise BundleError(f"{bundle_dir / MODEL}: inputs {in_names} do not match manifest {manifest.inputs}")
    out_names = {o.name for o in sess.get_outputs()}
    wanted = {t.output for t in manifest.tasks} | {g.output for g in manifest.gates}
    if not wanted <= out_names:
        raise BundleError(f"{bundle_dir / MODEL}: outputs {sorted(wanted - out_names)} named in the manifest are missing")
    run = session_runner(sess)
    inputs, expected = load_golden(bundle_dir)
    golden_out = run(inputs)
    _compare_golden(expected, golden_out, 1e-4)
    check_reference_outputs(bundle_dir, manifest, golden_out, run)
    return manifest, sess


# ------------------------------------------------------------------------------------ writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle(bundles_dir: str | Path, manifest: BundleManifest, files: dict[str, bytes],
                 signer: Callable[[bytes], bytes] | None = None) -> Path:
    """Atomically create ``bundles_dir/<model_version>/`` holding ``files`` plus the manifest.

    Checksums of ``files`` are filled into the manifest. ``signer(manifest_bytes) -> signature.json bytes``
    (``mtrank.signing.Signer``) adds a signature, inside the same atomic rename. Fails (BundleError) when
    the version name breaks the rule or the version already exists.
    """
    check_version_name(manifest.model_version, "model_version")
    bundles_dir = Path(bundles_dir)
    bundles_dir.mkdir(parents=True, exist_ok=True)
    final = bundles_dir / manifest.model_version
    if final.exists():
        raise BundleError(f"{final}: version already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.model_version}.tmp-", dir=bundles_dir))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        manifest.files = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        manifest_bytes = manifest.dump().encode()
        extra = {MANIFEST: manifest_bytes}
        if signer is not None:
            from mtrank.signing import SIGNATURE

            extra[SIGNATURE] = signer(manifest_bytes)
        for name, data in extra.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; readers may run as another user
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(bundles_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_current(bundles_dir: str | Path) -> str | None:
    try:
        version = (Path(bundles_dir) / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return version or None


def write_current(bundles_dir: str | Path, version: str) -> None:
    """Point ``CURRENT`` at ``version`` atomically (write a temp file, fsync, rename).

    BundleError when ``version`` breaks the version-name rule or is not a bundle directory.
    """
    check_version_name(version)
    bundles_dir = Path(bundles_dir)
    if not (bundles_dir / version).is_dir():
        raise BundleError(f"{bundles_dir / version}: no such bundle version")
    fd, tmp = tempfile.mkstemp(prefix=".CURRENT.", dir=bundles_dir)
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, bundles_dir / CURRENT)
    _fsync_dir(bundles_dir)


def list_versions(bundles_dir: str | Path) -> list[str]:
    """Complete bundle versions (directories with a valid version name and a manifest), oldest name first."""
    root = Path(bundles_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if is_version_name(p.name) and p.is_dir() and (p / MANIFEST).exists())
