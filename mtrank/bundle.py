"""The bundle: the versioned, self-describing contract between ``model/`` and ``service/``.

Layout (``docs/bundle.md`` is the reference)::

    BUNDLES_DIR/
      CURRENT                 one line naming the active version (replaced atomically)
      <version>/
        manifest.json         BundleManifest below
        model.onnx            inputs: request_ids/request_dense/item_ids/item_dense (present ones)
                              outputs: p_<task>, p_<chain head>, gate_l<level>_<owner>
        golden.json           encoded input rows + expected raw outputs

Torch-free: reading, checksum verification, calibration and golden checks need numpy (and
onnxruntime for the golden run). Writing is atomic: a temporary sibling directory is filled,
fsynced and renamed into place, so a watcher never sees half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtrank.encoding import FittedSchema

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
GOLDEN = "golden.json"
CURRENT = "CURRENT"
MAX_MODEL_BYTES = 1 << 30  # single-file ONNX (protobuf limit is 2 GiB; we cap at 1 GiB)


class BundleError(Exception):
    """A bundle failed a check; the message says which file and what."""


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
    """Piecewise-linear map raw -> calibrated score, applied with ``np.interp``."""

    method: Literal["identity", "isotonic", "platt"]
    x: list[float]
    y: list[float]
    ece_before: float | None = None
    ece_after: float | None = None
    logloss_before: float | None = None
    logloss_after: float | None = None

    def apply(self, p: np.ndarray) -> np.ndarray:
        if self.method == "identity":
            return p
        return np.interp(p, self.x, self.y).astype(p.dtype, copy=False)


class Histogram(_M):
    edges: list[float]
    counts: list[int]


class Reference(_M):
    """Validation-set statistics the service monitors against."""

    gate_mean: dict[str, list[float]] = {}  # gate output -> mean weight per expert
    gate_entropy: dict[str, float] = {}  # gate output -> mean entropy (nats)
    score_hist: dict[str, Histogram] = {}  # task -> histogram of raw scores
    # binary task -> histogram of calibrated scores (what the service serves; its drift baseline)
    calibrated_score_hist: dict[str, Histogram] = {}


class Quantization(_M):
    mode: Literal["none", "int8"] = "none"
    max_abs_diff: float | None = None
    auc_delta: dict[str, float] = {}


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


def read_manifest(bundle_dir: str | Path) -> BundleManifest:
    path = Path(bundle_dir) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
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
    got = run(inputs)
    worst = 0.0
    for name, want in expected.items():
        if name not in got:
            raise BundleError(f"golden: model has no output {name!r}")
        diff = float(np.max(np.abs(np.asarray(got[name], dtype=np.float32) - want))) if want.size else 0.0
        worst = max(worst, diff)
        if not diff <= atol:
            raise BundleError(f"golden: output {name!r} differs from the expected values by {diff:.3g} (> {atol})")
    return worst


def cpu_session(model_path: str | Path, intra_threads: int = 1) -> Any:
    """An onnxruntime CPU session (onnxruntime is imported lazily: verifying needs it, reading does not)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])


def session_runner(sess: Any) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A callable running every output of an onnxruntime session: ``run(inputs) -> {name: array}``."""
    names = [o.name for o in sess.get_outputs()]

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, inputs)))

    return run


def onnx_runner(model_path: str | Path, intra_threads: int = 1) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    return session_runner(cpu_session(model_path, intra_threads))


def verify_bundle(bundle_dir: str | Path, session_factory: Callable[[Path], Any] = cpu_session
                  ) -> tuple[BundleManifest, Any]:
    """Every check a loader makes before serving: manifest, checksums, size, I/O names, golden outputs.

    Returns the manifest and the onnxruntime session the checks ran on (built by ``session_factory``,
    so a server can verify with the very session it will serve with).
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: not a directory")
    manifest = read_manifest(bundle_dir)
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
    check_golden(bundle_dir, session_runner(sess))
    return manifest, sess


# ------------------------------------------------------------------------------------ writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle(bundles_dir: str | Path, manifest: BundleManifest, files: dict[str, bytes]) -> Path:
    """Atomically create ``bundles_dir/<model_version>/`` holding ``files`` plus the manifest.

    Checksums of ``files`` are filled into the manifest. Fails if the version already exists.
    """
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
        with open(tmp / MANIFEST, "w") as fh:
            fh.write(manifest.dump())
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
    """Point ``CURRENT`` at ``version`` atomically (write a temp file, fsync, rename)."""
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
    """Complete bundle versions (directories with a manifest), oldest name first."""
    root = Path(bundles_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists())
