"""Model speed in ONNX Runtime: a production-size MMoE and PLE, split first layer vs concatenated input, fp32 vs int8.

One /rank request scores B candidates for one user: ``request_*`` inputs at batch 1, ``item_*`` at batch B. The
models (``benchmarks/production_model.py``: 26 categorical features x 16 dims + 13 numeric, I = 429; MMoE 8 x
[256, 128], PLE 2 levels, towers [64]) are trained for one epoch on synthetic rows and exported with
``model.export.export_run`` (fp32, and int8 dynamic quantisation with its AUC guard). Four graphs per model:

* ``split``   the product: the first layer computes ``request @ W_r`` once and ``item @ W_i`` per candidate;
* ``concat``  the formulation before it (x = [request broadcast, item] @ W), exported from the same weights with
  a subclass used only here (``Concatenated``);

each fp32 and int8 (``model.quantize.quantize_int8``). Every session is ``mtrank.onnx_load.cpu_session`` with one
intra-op thread. The run first measures the machine's fp32 GEMM rate in ORT for the model's widest shape (a MatMul
[B, I] x [I, 8 * 256]), then times every (model, graph, B) round-robin: warm-up, then ``--runs`` timed runs each,
medians. Multiply-adds are counted from an ORT profile of each graph at each B (every MatMul / Gemm / Einsum node as
ORT ran it), so the split's smaller count is what it actually does.

Usage (from the repository root)::

    env -u OPENBLAS_CORETYPE python benchmarks/model_speed.py           # full: 150k rows, 300 runs (~10 min)
    env -u OPENBLAS_CORETYPE python benchmarks/model_speed.py --quick   # smoke: 20k rows, 20 runs; docs untouched
    env -u OPENBLAS_CORETYPE python benchmarks/model_speed.py --ab REV --archs mmoe --candidates 500 --workdir W

``--ab BASE_REV`` times a change to the exported graph instead: the same trained runs exported fp32 and int8 by
``BASE_REV``'s code (a git worktree, ``mtrank export`` in a child process) and by this tree's, the four sessions
round-robin at each size, outputs compared; it prints, the docs are untouched.

Writes raw results to ``--out-json`` and replaces the section between ``<!-- model-speed:start -->`` and
``<!-- model-speed:end -->`` in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import log, revision_tree, working_dir, write_docs  # noqa: E402
from benchmarks.production_model import ARCH_CONFIGS, write  # noqa: E402
from model.layers import SplitInput  # noqa: E402
from model.nets import MultiTaskRanker  # noqa: E402

START, END = "<!-- model-speed:start -->", "<!-- model-speed:end -->"
FORMS, DTYPES = ("split", "concat"), ("fp32", "int8")
GEMM_N = 8 * 256  # the MMoE experts' first layer: 8 experts of 256
TITLES = {"mmoe": "MMoE", "ple": "PLE"}
MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
              "QGemm", "Einsum"}


class Concatenated(MultiTaskRanker):
    """The formulation before the split first layer (the baseline): x = [request broadcast, item] [B, I]."""

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = super().features(inputs)
        return x.cat() if isinstance(x, SplitInput) else x


def prepare(arch: str, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train (unless a finished run is there and --retrain is off), export fp32 + int8 bundles and the concat graphs."""
    from model.data import Split
    from model.evaluate import to_tensors
    from model.export import export_run, onnx_bytes
    from model.quantize import quantize_int8
    from model.train import load_run, train
    from mtrank.bundle import read_manifest
    from mtrank.config import load_config

    run = work / f"run_{arch}"
    train_s = None  # None: a finished run in --workdir was reused
    if args.retrain or not (run / "model.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        cfg = load_config(ARCH_CONFIGS[arch], [f"data.train=[{data}]", f"train.threads={args.train_threads}"])
        t0 = time.perf_counter()
        train(cfg, run)
        train_s = time.perf_counter() - t0
        log(f"{arch}: trained in {train_s:.0f}s")
    bundles = work / f"bundles_{arch}"
    shutil.rmtree(bundles, ignore_errors=True)
    fp32 = export_run(run, bundles, version="fp32", activate=False)
    int8 = export_run(run, bundles, version="int8", activate=False, quantize="int8", max_auc_drop=args.max_auc_drop)
    cfg, schema, model = load_run(run)
    old = Concatenated(schema, cfg.tasks, cfg.model).eval()
    old.load_state_dict(model.state_dict())
    val = Split.load(run / "val.npz")
    example = {k: v[:2] for k, v in to_tensors(val).items()}
    concat = onnx_bytes(old, example)
    paths = {("split", "fp32"): fp32 / "model.onnx", ("split", "int8"): int8 / "model.onnx",
             ("concat", "fp32"): work / f"{arch}_concat_fp32.onnx", ("concat", "int8"): work / f"{arch}_concat_int8.onnx"}
    paths["concat", "fp32"].write_bytes(concat)
    paths["concat", "int8"].write_bytes(quantize_int8(concat))
    metrics = json.loads((run / "metrics.json").read_text())
    quant = read_manifest(int8).quantization
    return {"arch": arch, "paths": paths, "val": val.inputs, "request_dim": model.request_dim,
            "in_dim": model.levels[0].gates[0].linear.in_features, "params": sum(p.numel() for p in model.parameters()),
            "test_auc": {t.name: metrics["test"][t.name]["auc"] for t in cfg.tasks},
            "int8_auc_delta": quant.auc_delta, "int8_max_abs_diff": quant.max_abs_diff, "train_s": train_s}


def feed(val: dict[str, np.ndarray], b: int) -> dict[str, np.ndarray]:
    """One request (validation row 0) and the first ``b`` validation rows' items as candidates."""
    return {k: np.ascontiguousarray(v[:1] if k.startswith("request") else v[:b]) for k, v in val.items()}


def profiled_macs(path: Path, inputs: dict[str, np.ndarray], tmp: Path) -> int:
    """Multiply-adds of one run, from an ORT profile: per MatMul-like node, (elements of its first input) x (last dim
    of its output), i.e. M * K * N for [.., M, K] x [K, N] (and B * m * H for the gates' mix einsum)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / "profile")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, inputs)
    events = json.loads(Path(sess.end_profiling()).read_text())
    total = 0
    for e in events:
        a = e.get("args", {})
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and a.get("op_name") in MATMUL_OPS:
            first = next(iter(a["input_type_shape"][0].values()))
            out = next(iter(a["output_type_shape"][0].values()))
            total += int(np.prod(first)) * out[-1]
    return total


def gemm_graph(m: int, k: int, n: int, path: Path) -> Path:
    """A one-MatMul ONNX graph X [m, k] x W [k, n] (W an initializer), like the first layer of the experts."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "gemm",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def round_robin(jobs: dict[Any, tuple[Any, dict[str, np.ndarray]]], runs: int, warmup: int) -> dict[Any, list[float]]:
    """Time ``sess.run`` of every job in turn (the order rotates each round): ``warmup`` untimed rounds, then
    ``runs`` timed ones; seconds per job."""
    keys = list(jobs)
    times: dict[Any, list[float]] = {k: [] for k in keys}
    for r in range(warmup + runs):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            sess, inputs = jobs[key]
            t0 = time.perf_counter()
            sess.run(None, inputs)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[key].append(dt)
    return times


def export_with(rev: str, run: Path, out: Path, work: Path, max_auc_drop: float) -> dict[str, Path]:
    """fp32 and int8 graphs of ``run`` exported by revision ``rev``'s code: dtype -> model.onnx."""
    shutil.rmtree(out, ignore_errors=True)
    with revision_tree(rev, work / "tree-ab") as tree:
        for dtype, extra in (("fp32", []), ("int8", ["--quantize", "int8", "--max-auc-drop", str(max_auc_drop)])):
            subprocess.run([sys.executable, "-m", "mtrank.cli", "export", str(run), "--out", str(out), "--version", dtype,
                            "--no-activate", *extra], check=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                           stdout=subprocess.DEVNULL)
    return {dtype: out / dtype / "model.onnx" for dtype in DTYPES}


def ab(models: dict[str, dict[str, Any]], work: Path, args: argparse.Namespace) -> str:
    """``--ab``: base (``args.ab``'s export) vs new (this tree's) graphs of the same weights, round-robin; a table."""
    from mtrank.onnx_load import cpu_session

    jobs, diffs = {}, {}
    for arch, m in models.items():
        base = export_with(args.ab, work / f"run_{arch}", work / f"ab_{arch}", work, args.max_auc_drop)
        for dtype in DTYPES:
            sessions = {"base": cpu_session(base[dtype], intra_threads=1),
                        "new": cpu_session(m["paths"]["split", dtype], intra_threads=1)}
            names = [o.name for o in sessions["new"].get_outputs()]
            for b in args.candidates:
                inputs = feed(m["val"], b)
                old, new = (sessions[k].run(names, inputs) for k in ("base", "new"))
                diffs[arch, dtype, b] = max(float(np.max(np.abs(x - y))) for x, y in zip(old, new))
                jobs.update({(arch, dtype, b, k): (sessions[k], inputs) for k in sessions})
    log(f"timing {len(jobs)} sessions x {args.runs} runs round-robin")
    times = {k: statistics.median(v) * 1e3 for k, v in round_robin(jobs, args.runs, args.warmup).items()}
    lines = [f"Base: the graphs exported by {args.ab}; new: by this tree; same weights and inputs, one intra-op thread, "
             f"{args.runs} runs each round-robin, medians. {machine()}.", "",
             "| model | dtype | candidates | base ms | new ms | new / base | max abs diff |", "|---|---|---:|---:|---:|---:|---:|"]
    for arch, dtype, b in diffs:
        t0, t1 = times[arch, dtype, b, "base"], times[arch, dtype, b, "new"]
        lines.append(f"| {TITLES[arch]} | {dtype} | {b} | {t0:.3f} | {t1:.3f} | {t1 / t0:.3f} | {diffs[arch, dtype, b]:.1e} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    import onnxruntime as ort

    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}, onnxruntime {ort.__version__}"


def render(res: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    cands = args.candidates
    ref = 500 if 500 in cands else cands[len(cands) // 2]
    lines = [START, "## Model speed: split first layer and int8 in ONNX Runtime (production-size MMoE and PLE)", "",
             f"Generated {res['generated']} in {res['minutes']:.1f} min with:", "", "```bash", command, "```", "",
             f"Machine: {res['machine']}. Load average (1 min) {res['load_before']:.2f} before timing, "
             f"{res['load_after']:.2f} after; one intra-op thread (`mtrank.onnx_load.cpu_session`), one process.", "",
             f"Models: `benchmarks/configs/production_{{mmoe,ple}}.yaml` (26 categorical features x 16 dims + 13 "
             f"numeric: I = {res['in_dim']}, request part Ir = {res['request_dim']}; MMoE 8 experts [256, 128]; PLE 2 "
             "levels of 1 task + 3 shared experts [256, 128]; towers [64]; 3 binary tasks), trained 1 epoch on "
             f"{args.rows:,} synthetic rows (`benchmarks/production_model.py`; training "
             + ("runs reused from an earlier invocation with this --workdir"
                if all(r["train_s"] is None for r in res["models"].values())
                else ", ".join(f"{a} {r['train_s']:.0f} s" if r["train_s"] is not None else f"{a} reused"
                               for a, r in res["models"].items()))
             + "). One request (batch 1) and B candidates "
             f"per run; {args.runs} timed runs per cell after {args.warmup} warm-up, all cells interleaved "
             "round-robin; medians. MMAC: multiply-adds per run counted from an ORT profile of the graph; GFLOP/s = "
             "2 x MAC / median latency (for int8, the same count in int8 ops); \"% GEMM\" = that rate over the fp32 "
             "GEMM rate ORT reached on a MatMul [B, I] x [I, 2048] in the same run (int8 above 100 % is possible). "
             "Split speed-up: concat median / split median (same precision and B); int8 speed-up: fp32 median / int8 "
             "median (same graph and B).", "",
             "fp32 GEMM rate (ORT MatMul [B, 429] x [429, 2048], one thread): "
             + ", ".join(f"B={b}: {res['gemm'][str(b)]['gflops']:.1f} GFLOP/s" for b in cands) + ".", ""]
    for arch, r in res["models"].items():
        lines += [f"### {TITLES[arch]} ({r['params']:,} parameters; test AUC after 1 epoch: "
                  + ", ".join(f"{t} {v:.3f}" for t, v in r["test_auc"].items())
                  + "; int8 AUC change recorded by the export: "
                  + ", ".join(f"{t} {v:+.4f}" for t, v in r["int8_auc_delta"].items()) + ")", "",
                  "| B | graph | median ms | p90 ms | candidates/s | MMAC | GFLOP/s | % GEMM | split speed-up | int8 speed-up |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b in cands:
            for dtype in DTYPES:
                for form in FORMS:
                    c = r["cells"][f"{form}/{dtype}/{b}"]
                    split_x = (r["cells"][f"concat/{dtype}/{b}"]["median_ms"] / c["median_ms"]) if form == "split" else None
                    int8_x = (r["cells"][f"{form}/fp32/{b}"]["median_ms"] / c["median_ms"]) if dtype == "int8" else None
                    lines.append(f"| {b} | {form} {dtype} | {c['median_ms']:.2f} | {c['p90_ms']:.2f} | "
                                 f"{c['cand_per_s']:,.0f} | {c['mmac']:.1f} | {c['gflops']:.1f} | {c['gemm_frac']:.0%} | "
                                 + (f"{split_x:.2f}x" if split_x else "") + " | " + (f"{int8_x:.2f}x" if int8_x else "") + " |")
        lines.append("")
    lines += [f"Split vs concat outputs (fp32, B = {max(cands)}, request batch 1): max abs diff "
              + ", ".join(f"{a} {r['split_vs_concat_max_abs_diff']:.1e}" for a, r in res["models"].items()) + ".", "",
              f"Targets (issue 9), at B = {ref}, split graphs:", ""]
    for arch, r in res["models"].items():
        fp = r["cells"][f"split/fp32/{ref}"]
        q = r["cells"][f"split/int8/{ref}"]
        ratio = fp["median_ms"] / q["median_ms"]
        best = max(r["cells"][f"split/fp32/{b}"]["gemm_frac"] for b in cands)
        lines += [f"* {TITLES[arch]}: fp32 at {fp['gemm_frac']:.0%} of the measured GEMM rate (best over B "
                  f"{best:.0%}): {'met' if fp['gemm_frac'] >= 0.7 else 'missed'} (target >= 70 %); int8 "
                  f"{ratio:.2f}x fp32 throughput: {'met' if ratio >= 1.6 else 'missed'} (target >= 1.6x); the split "
                  f"{r['cells'][f'concat/fp32/{ref}']['median_ms'] / fp['median_ms']:.2f}x (fp32) and "
                  f"{r['cells'][f'concat/int8/{ref}']['median_ms'] / q['median_ms']:.2f}x (int8) the concatenated "
                  "graph's throughput."]
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=150_000)
    ap.add_argument("--archs", nargs="+", default=["mmoe", "ple"], choices=sorted(ARCH_CONFIGS))
    ap.add_argument("--candidates", type=int, nargs="+", default=[50, 200, 500, 1000])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-auc-drop", type=float, default=0.01, help="int8 export guard (the export's bound)")
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="keep runs here and reuse a finished one (default: a temp dir)")
    ap.add_argument("--retrain", action="store_true", help="train even when --workdir holds a finished run")
    ap.add_argument("--out-json", default="/tmp/model_speed.json")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--ab", metavar="BASE_REV", help="A/B of the exported graph against BASE_REV's export of the same "
                    "runs (prints; docs untouched)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.runs, args.warmup = 20_000, 20, 3
    from mtrank.onnx_load import cpu_session

    t_start = time.perf_counter()
    with working_dir(args.workdir, "model-speed-") as work:
        data = work / f"production_{args.rows}.parquet"
        if not data.exists():
            write(data, args.rows, seed=0)
        models = {a: prepare(a, data, work, args) for a in args.archs}
        if args.ab:
            print(ab(models, work, args))
            return 0
        in_dim = next(iter(models.values()))["in_dim"]

        # the machine's fp32 GEMM rate for the experts' first-layer shape, measured first
        gemm = {b: cpu_session(gemm_graph(b, in_dim, GEMM_N, work / f"gemm_{b}.onnx")) for b in args.candidates}
        xs = {b: np.random.default_rng(b).standard_normal((b, in_dim)).astype(np.float32) for b in args.candidates}
        g_times = round_robin({b: (gemm[b], {"X": xs[b]}) for b in args.candidates}, args.runs, args.warmup)
        res: dict[str, Any] = {"gemm": {}, "models": {}, "machine": machine(), "in_dim": in_dim,
                               "request_dim": next(iter(models.values()))["request_dim"]}
        for b in args.candidates:
            med = statistics.median(g_times[b])
            res["gemm"][str(b)] = {"median_ms": med * 1e3, "gflops": 2 * b * in_dim * GEMM_N / med / 1e9}
            log(f"GEMM [{b}, {in_dim}] x [{in_dim}, {GEMM_N}]: {med * 1e3:.3f} ms, {res['gemm'][str(b)]['gflops']:.1f} GFLOP/s")

        jobs, macs = {}, {}
        for arch, m in models.items():
            sessions = {fd: cpu_session(p, intra_threads=1) for fd, p in m["paths"].items()}
            feeds = {b: feed(m["val"], b) for b in args.candidates}
            names = [o.name for o in sessions["split", "fp32"].get_outputs()]
            outs = [dict(zip(names, sessions[f, "fp32"].run(names, feeds[max(args.candidates)]))) for f in FORMS]
            m["split_vs_concat_max_abs_diff"] = max(float(np.max(np.abs(outs[0][k] - outs[1][k]))) for k in outs[0])
            for (form, dtype), sess in sessions.items():
                for b in args.candidates:
                    jobs[arch, form, dtype, b] = (sess, feeds[b])
                    macs[arch, form, dtype, b] = profiled_macs(m["paths"][form, dtype], feeds[b], work)
        res["load_before"] = os.getloadavg()[0]
        log(f"timing {len(jobs)} cells x {args.runs} runs round-robin (load {res['load_before']:.2f})")
        times = round_robin(jobs, args.runs, args.warmup)
        res["load_after"] = os.getloadavg()[0]
        for arch, m in models.items():
            cells = {}
            for (a, form, dtype, b), ts in times.items():
                if a != arch:
                    continue
                med = statistics.median(ts)
                gflops = 2 * macs[a, form, dtype, b] / med / 1e9
                cells[f"{form}/{dtype}/{b}"] = {
                    "median_ms": med * 1e3, "p90_ms": float(np.quantile(ts, 0.9)) * 1e3, "cand_per_s": b / med,
                    "mmac": macs[a, form, dtype, b] / 1e6, "gflops": gflops, "gemm_frac": gflops / res["gemm"][str(b)]["gflops"]}
                log(f"{arch} {form:6} {dtype} B={b:5}: {med * 1e3:7.3f} ms, {gflops:5.1f} GFLOP/s")
            res["models"][arch] = {k: v for k, v in m.items() if k not in ("paths", "val")} | {"cells": cells}
        res["generated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        res["minutes"] = (time.perf_counter() - t_start) / 60
        Path(args.out_json).write_text(json.dumps(res, indent=1))
        command = "env -u OPENBLAS_CORETYPE python benchmarks/model_speed.py" + (
            " " + shlex.join(argv) if argv else (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""))
        section = render(res, args, command)
        print(section)
        if not args.quick:
            write_docs(Path(args.docs), section, START, END)
            log(f"updated {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
