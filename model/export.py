"""``mtrank export RUN_DIR --out BUNDLES_DIR``: a trained run -> a verified, versioned bundle.

Steps: ONNX export (opset 17, dynamic batch) -> onnx.checker -> parity with PyTorch on the whole
validation split (probabilities and gate weights, max abs diff <= 1e-5, else fail) -> calibration
per binary task -> reference statistics (gate usage/entropy, score histograms) -> golden examples
-> optional int8 dynamic quantisation guarded by the AUC drop -> output ranges on validation and the
reference sweep (checked again by every loader) -> atomic write (optionally signed) -> CURRENT pointer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from model.calibrate import fit_calibration
from model.data import Split
from model.evaluate import gate_stats, predict, to_tensors
from model.nets import ExportWrapper, MultiTaskRanker
from model.quantize import quantize_int8
from model.train import load_run
from mtrank.bundle import (
    GOLDEN,
    MODEL,
    BundleError,
    BundleManifest,
    GateInfo,
    Histogram,
    Lineage,
    Quantization,
    Reference,
    ScoreRange,
    TaskInfo,
    check_version_name,
    onnx_runner,
    run_sweep,
    sha256_file,
    sweep_rows_for,
    write_bundle,
    write_current,
)
from mtrank.encoding import FittedSchema
from mtrank.metrics import auc, bin_index, equal_width_edges

OPSET = 17
PARITY_ATOL = 1e-5
N_GOLDEN = 8
HIST_BINS = 20


class ExportError(BundleError):
    pass


def onnx_bytes(model: MultiTaskRanker, example: dict[str, torch.Tensor]) -> bytes:
    """Trace the model to a single-file ONNX graph with a dynamic batch axis."""
    wrapper = ExportWrapper(model).eval()
    args = tuple(example[n] for n in model.input_names)
    # A request batch of 1 broadcasts over the candidates, so it gets its own axis when items exist.
    request_axis = "request_batch" if model.has_item else "batch"
    dynamic = {n: {0: request_axis if n.startswith("request") else "batch"} for n in model.input_names}
    dynamic.update({n: {0: "batch"} for n in wrapper.output_names})
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, buf, input_names=model.input_names, output_names=wrapper.output_names,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def score_ranges(data: bytes, schema: FittedSchema, onnx_out: dict[str, np.ndarray], names: list[str]
                 ) -> tuple[dict[str, ScoreRange], int]:
    """Per scored name: min/max raw output over the validation outputs and the reference sweep (run here the
    way every loader runs it, ``mtrank.bundle.run_sweep``). Returns the ranges and the sweep's row count."""
    rows = sweep_rows_for(schema)
    lo = {n: float(np.min(onnx_out[f"p_{n}"])) for n in names}
    hi = {n: float(np.max(onnx_out[f"p_{n}"])) for n in names}
    with tempfile.NamedTemporaryFile(suffix=".onnx") as fh:
        fh.write(data)
        fh.flush()
        for batch in run_sweep(schema, rows, onnx_runner(fh.name, intra_threads=0)):
            for n in names:
                out = batch[f"p_{n}"]
                if not np.all(np.isfinite(out)):
                    raise ExportError(f"reference sweep: task {n!r} has non-finite outputs; not written")
                lo[n], hi[n] = min(lo[n], float(out.min())), max(hi[n], float(out.max()))
    return {n: ScoreRange(min=lo[n], max=hi[n]) for n in names}, rows


def _run_onnx(data: bytes, inputs: dict[str, np.ndarray], batch: int = 8192) -> dict[str, np.ndarray]:
    with tempfile.NamedTemporaryFile(suffix=".onnx") as fh:
        fh.write(data)
        fh.flush()
        run = onnx_runner(fh.name, intra_threads=0)
        n = next(iter(inputs.values())).shape[0]
        parts = [run({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def check_parity(model: MultiTaskRanker, onnx_out: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                 gates: dict[str, np.ndarray]) -> float:
    worst = 0.0
    expected = {**{f"p_{k}": v for k, v in scores.items()}, **gates}
    for name, want in expected.items():
        diff = float(np.max(np.abs(onnx_out[name] - want)))
        worst = max(worst, diff)
        if not diff <= PARITY_ATOL:
            raise ExportError(f"parity: ONNX output {name!r} differs from PyTorch by {diff:.3g} (> {PARITY_ATOL})")
    return worst


def score_histograms(names: list[str], scores: dict[str, np.ndarray], types: dict[str, str]) -> dict[str, Histogram]:
    """Per name: equal-width bins on [0, 1] (binary) or quantile edges (regression) and their counts."""
    hists = {}
    for name in names:
        s = scores[name]
        if types.get(name, "binary") == "binary":
            edges = equal_width_edges(HIST_BINS)
        else:
            edges = np.unique(np.quantile(s, np.linspace(0, 1, HIST_BINS + 1)))
            if len(edges) < 2:
                edges = np.array([s.min(), s.min() + 1.0])
        counts = np.bincount(bin_index(s, edges), minlength=len(edges) - 1)  # the service bins live scores alike
        hists[name] = Histogram(edges=edges.tolist(), counts=counts.tolist())
    return hists


def export_run(run_dir: str | Path, bundles_dir: str | Path, version: str | None = None, activate: bool = True,
               quantize: str | None = None, max_auc_drop: float = 0.002, sign_key: str | Path | None = None,
               lineage: Lineage | None = None) -> Path:
    """Export a finished run into ``bundles_dir/<version>/``; returns the bundle directory.

    ``version`` must follow the version-name rule (``mtrank.bundle.check_version_name``; checked before
    any work, BundleError naming ``version``). ``sign_key``: an Ed25519 private key (PEM) that signs the
    manifest (``mtrank.signing``); loaded before any work too. ``lineage``: kind, parent and detail recorded
    in the manifest (default: a plain ``train`` export); the run directory and checkpoint hash are filled here.
    """
    if version is not None:
        check_version_name(version, "version")
    from mtrank.signing import Signer

    signer = Signer.optional(sign_key)
    run_dir = Path(run_dir)
    cfg, schema, model = load_run(run_dir)
    val = Split.load(run_dir / "val.npz")
    tensors = to_tensors(val)
    scores, gates = predict(model, tensors)

    data = onnx_bytes(model, {k: v[:2] for k, v in tensors.items()})
    onnx_out = _run_onnx(data, val.inputs)
    parity = check_parity(model, onnx_out, scores, gates)

    types = {t.name: t.type for t in cfg.tasks}
    quant = Quantization(mode="none")
    if quantize == "int8":
        qdata = quantize_int8(data)
        q_out = _run_onnx(qdata, val.inputs)
        deltas = {}
        for k, t in enumerate(cfg.tasks):
            if t.type != "binary":
                continue
            m = val.mask[:, k]
            deltas[t.name] = float(auc(val.labels[m, k], q_out[f"p_{t.name}"][m]) - auc(val.labels[m, k], scores[t.name][m]))
        max_diff = max(float(np.max(np.abs(q_out[n] - onnx_out[n]))) for n in onnx_out)
        worst = min(deltas.values(), default=0.0)
        if -worst > max_auc_drop:
            raise ExportError(f"quantize: int8 lowers validation AUC by {-worst:.4f} (> bound {max_auc_drop}); not written")
        quant = Quantization(mode="int8", max_abs_diff=max_diff, auc_delta=deltas)
        data, onnx_out = qdata, q_out
    elif quantize not in (None, "none"):
        raise ExportError(f"quantize: unknown mode {quantize!r} (int8 or none)")

    calibration = {}
    for k, t in enumerate(cfg.tasks):
        if t.type == "binary":
            m = val.mask[:, k]
            calibration[t.name] = fit_calibration(onnx_out[f"p_{t.name}"][m], val.labels[m, k], seed=cfg.train.seed)

    g_stats = gate_stats(model, {g.name: onnx_out[g.name] for g in model.gate_specs})
    served = {n: calibration[n].apply(onnx_out[f"p_{n}"]) for n in calibration}
    ranges, sweep_rows = score_ranges(data, schema, onnx_out, model.output_names)
    reference = Reference(
        score_range=ranges,
        sweep_rows=sweep_rows,
        gate_mean={k: v["mean"] for k, v in g_stats.items()},
        gate_entropy={k: v["entropy"] for k, v in g_stats.items()},
        score_hist=score_histograms(model.output_names, {n: onnx_out[f"p_{n}"] for n in model.output_names}, types),
        calibrated_score_hist=score_histograms(list(served), served, types),
    )
    golden_rows = {k: v[:N_GOLDEN] for k, v in val.inputs.items()}
    # Run the golden rows on their own: int8 dynamic quantisation scales activations per batch.
    golden_out = _run_onnx(data, golden_rows)
    golden = {"inputs": {k: {"dtype": str(v.dtype), "data": v.tolist()} for k, v in golden_rows.items()},
              "outputs": {k: v.tolist() for k, v in golden_out.items()}}

    tasks = [TaskInfo(name=t.name, type=t.type, output=f"p_{t.name}",
                      chain=t.chain.model_dump() if t.chain else None) for t in cfg.tasks]
    tasks += [TaskInfo(name=t.chain.head, type="binary", output=f"p_{t.chain.head}", derived=True)
              for t in cfg.tasks if t.chain is not None]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    created = dt.datetime.now(dt.UTC)
    version = version or f"{created:%Y%m%d-%H%M%S}-{hashlib.sha256(data).hexdigest()[:8]}"
    manifest = BundleManifest(
        model_version=version,
        created_at=created.isoformat(),
        arch=cfg.model.arch,
        sizes={**cfg.model.model_dump(mode="json"), "params": sum(p.numel() for p in model.parameters()),
               "onnx_bytes": len(data), "parity_max_abs_diff": parity},
        tasks=tasks,
        gates=[GateInfo(output=g.name, level=g.level, owner=g.owner, experts=list(g.experts)) for g in model.gate_specs],
        experts=model.experts,
        schema=schema.to_dict(),
        inputs=model.input_names,
        opset=OPSET,
        calibration=calibration,
        reference=reference,
        metrics={"validation": metrics.get("validation", {}), "test": metrics.get("test", {})},
        quantization=quant,
        lineage=(lineage or Lineage()).model_copy(update={
            "run_dir": str(run_dir.resolve()), "checkpoint_sha256": sha256_file(run_dir / "model.pt")}),
    )
    files = {MODEL: data, GOLDEN: json.dumps(golden).encode()}
    bundle = write_bundle(bundles_dir, manifest, files, signer=signer)
    if activate:
        write_current(bundles_dir, version)
    return bundle


def export_summary(bundle: Path) -> dict[str, Any]:
    m = json.loads((bundle / "manifest.json").read_text())
    signature = bundle / "signature.json"
    signed_by = json.loads(signature.read_text())["key_id"] if signature.exists() else None
    return {"bundle": str(bundle), "version": m["model_version"], "signed_by": signed_by,
            "onnx_bytes": m["sizes"]["onnx_bytes"],
            "parity_max_abs_diff": m["sizes"]["parity_max_abs_diff"],
            "calibration": {k: {"method": c["method"], "ece_before": c["ece_before"], "ece_after": c["ece_after"]}
                            for k, c in m["calibration"].items()}}
