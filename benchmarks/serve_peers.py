"""Head-to-head /rank benchmark (issue 9): mtrank as shipped vs what a user would build instead.

One run, one machine, one trained model (the same weights in every server), the same request bodies for every
server, closed-loop load over loopback at ``--concurrency`` connections, for ``--sizes`` candidates per request
(default 50, 200, 500, 1000):

1. **Model.** The production-size MMoE of ``benchmarks/configs/production_mmoe.yaml`` (``--arch ple``:
   ``production_ple.yaml``) trained ``--epochs`` (default 1) on 150 000 rows of ``benchmarks/production_model.py``
   data and exported, in child processes: ``mtrank train``, ``mtrank export RUN --out BUNDLES --version fp32`` and
   ``mtrank export RUN --out BUNDLES --version int8 --quantize int8 --no-activate``. A ``--workdir`` holding them
   is reused: ``production.parquet``, ``run_<arch>``, ``bundles`` (``bundles_ple`` for ple) with versions fp32 and
   int8. Each mtrank server reads a bundles directory of its own (``serve_<version>[_ple]``: CURRENT naming the
   version, the version directory a symlink), so whatever ``bundles/CURRENT`` names does not matter.
2. **Requests.** ``--bodies`` distinct bodies per size, cycled: one impression's request-side features (user and
   context; ``user_id`` in the body's ``user_id``) in ``context``, n distinct items' item-side features
   (``item_id`` in the candidate's ``item_id``) in ``candidates[].features``, JSON types as in the data (integer
   codes, numbers); the same files for every server, and the same bodies with their candidates as columns
   (``RankColumnsRequest``) for the mtrank server that takes those.
3. **Preparation** (a child process, the only one importing torch, before any server starts): the torch-rechub
   model exported with torch-rechub's ONNX exporter (``benchmarks.peer_services.export_rechub``); **parity** of
   (b) and (c) with the fp32 bundle (``peer_services.parity``: max |p - p_mtrank| per task over the first 2 bodies
   of each size; the run stops above 1e-4); the fp32 GEMM rate onnxruntime reaches on one thread for a MatMul
   [B, I] x [I, 2048] at each size B (``model_speed.gemm_graph`` / ``round_robin``), the fp32 and int8 bundles'
   ``session.run`` on the first 8 bodies of each size, encoded as the service encodes them and cycled (the
   **quiet** model timings, interleaved with the GEMM runs), and the multiply-adds of one request of B candidates in
   the fp32 bundle (``model_speed.profiled_macs``).
4. **Servers**, all started once and kept up for the whole run, one uvicorn worker unless stated: (a) ``mtrank
   serve --bundles DIR --workers 1`` with the fp32 bundle and ``MTRANK_ONNX__INTRA_OP_THREADS=1`` (what
   ``onnx.intra_op_threads: auto`` gives one worker with its 2 executor threads on 2 cores; the server whose CPU
   is accounted, step 6), with the int8 bundle and fp32 sent the column-form bodies (both with the default
   threads), fp32 with one intra-op thread per core (the default before 2026-11-26), and fp32 with the default
   ``--workers auto`` (one worker per core, one intra-op thread each); (b) naive and (c) rechub: ``python -m uvicorn --factory
   benchmarks.peer_services:naive_app`` / ``rechub_app`` with ``--no-access-log`` (mtrank's access log is off too),
   with torch's and onnxruntime's default threads (all cores).
5. **Load.** ``serve_bench``'s load generator (``_loadgen``: its own process, ``--concurrency`` keep-alive HTTP/1.1
   connections, closed loop, ``--warmup`` then ``--duration`` seconds). Each round visits every size and, at each,
   every server in turn (the server order rotating by round), so noise hits all alike; latencies are pooled over
   rounds, req/s is the median round, server CPU per request comes from /proc over the measured window. The load
   generator shares the machine's cores with the servers.
6. **Inside mtrank** (fp32, 1 worker, 1 intra-op thread; and the int8 server's inference CPU, for the int8 verdict):
   the ``mtrank_rank_stage_seconds`` sums and counts and the
   ``mtrank_rank_stage_cpu_seconds_total`` counters on its /metrics before and after each of its runs give wall and
   inference-thread CPU seconds per request per stage (features, inference, log,
   observe). The model's CPU seconds per request two ways: the inference thread's CPU in ``session.run`` under the
   load (one intra-op thread: ONNX Runtime runs every kernel on that thread) and the quiet ``session.run`` of step 3
   (one thread, so its wall time is its CPU time; conservative, as a run under load takes more CPU, the other threads
   evicting its caches). GFLOP/s = 2 x MAC / those seconds, also as a share of the GEMM rate; the share of the
   server's CPU per request spent outside the model = 1 - those seconds / the server's CPU seconds per request
   (/proc). Under load the inference stage's wall time also holds waits for the GIL and the cores, so it cannot stand
   for the model's CPU.
7. ``--half-load``: after the rounds, mtrank fp32 (1 worker, with one intra-op thread and with one per core, in
   turn) at 500 candidates under open-loop load (``_openloop``: arrivals at half the closed-loop req/s of the
   first in step 5, Poisson and then evenly spaced, each request on an idle keep-alive
   connection or a new one, latency from the scheduled arrival; warm-up, then 2 x ``--duration`` each): p50, p99
   and whether p99 <= 2 x p50, beside what an ideal queue gives under Poisson arrivals (``ideal_tail``).

Targets (issue 9), at 500 candidates, one worker, fp32: requests/s >= 4x (b) and >= 2x (c); the rest as the
verdicts state them. The int8 verdict also gives the model's own int8 speed-up, under the load (the int8 and fp32
servers' inference CPU per request) and quiet (step 3), with the CPU's int8 dot-product instructions
(``serve_bench.int8_isa``): the service's ratio is (outside + fp32 model) / (outside + int8 model), below the model's
own, so a model alone under 1.6x caps every service around it on that CPU.

Usage (from the repository root; OPENBLAS_CORETYPE slows numpy on the benchmark machine, so unset it)::

    env -u OPENBLAS_CORETYPE python benchmarks/serve_peers.py --half-load            # full (~13 min), docs updated
    env -u OPENBLAS_CORETYPE python benchmarks/serve_peers.py --quick --workdir W    # smoke (~1 min), prints only
    ... serve_peers.py --workdir W --ab REV [--ab-bundle int8]   # A/B of req/s against revision REV, prints only
    ... serve_peers.py --workdir W --ab REV --ab-rate 120        # A/B of p50 / p99 at 120 req/s (open loop)

The int8 verdict also states Amdahl's bound (``int8_ceiling``): the fp32 server's CPU outside the model stays, the
model's shrinks to the int8 model's.

Writes raw results to ``--out-json`` and (full runs, or ``--write-docs``) replaces the section between
``<!-- serve-peers:start -->`` and ``<!-- serve-peers:end -->`` in ``--docs`` (markers appended when missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import serve_bench  # noqa: E402
from benchmarks.common import log, working_dir  # noqa: E402
from benchmarks.serve_bench import (  # noqa: E402
    Server,
    ServerConfig,
    benchmark_parser,
    cpu_seconds,
    free_port,
    machine_note,
    median,
    ms,
    process_tree,
    publish,
    quantile,
    summarise_http,
)
from mtrank.encoding import FittedSchema  # noqa: E402

START, END = "<!-- serve-peers:start -->", "<!-- serve-peers:end -->"
SIZES = (50, 200, 500, 1000)
ROWS, SEED = 150_000, 0
PARITY_BODIES = 2  # per size
QUIET_BODIES = 8  # per size, cycled in the quiet model timings (as the load cycles its bodies: distinct items each run)
TARGET_N, TARGET_NAIVE, TARGET_RECHUB = 500, 4.0, 2.0
TARGET_INT8, TARGET_OUTSIDE, TARGET_GEMM = 1.6, 0.35, 0.70
MAX_IDLE_S = 2.0  # the open-loop client's limit on reusing an idle keep-alive connection
STAGE_RE = re.compile(r'^mtrank_rank_stage_(seconds_sum|seconds_count|cpu_seconds_total)\{stage="([^"]+)"\} (\S+)$',
                      re.M)
STAGE_FIELDS = ("seconds_sum", "seconds_count", "cpu_seconds_total")  # stage_totals' list, in this order
ONE_THREAD = {"MTRANK_ONNX__INTRA_OP_THREADS": "1"}
ACCOUNTED = "fp32"  # the server whose CPU per request is split into model and the rest (one intra-op thread)
STAGED = (ACCOUNTED, "int8")  # the servers whose /metrics stages are read (int8: its model's CPU under the load)
HALF_LOAD = ("fp32", "fp32-all")  # the servers run at half load: 1 worker with one intra-op thread, and with all cores


# --------------------------------------------------------------------------------- model and data


@dataclass(frozen=True)
class Paths:
    data: Path
    run: Path
    bundles: Path
    rechub: Path
    work: Path
    suffix: str

    @classmethod
    def of(cls, work: Path, arch: str) -> Paths:
        suffix = "" if arch == "mmoe" else f"_{arch}"
        return cls(work / "production.parquet", work / f"run_{arch}", work / f"bundles{suffix}",
                   work / f"rechub_{arch}.onnx", work, suffix)

    def serving(self, version: str) -> Path:
        """A bundles directory holding only ``version`` (a symlink) with CURRENT naming it."""
        d = self.work / f"serve_{version}{self.suffix}"
        d.mkdir(exist_ok=True)
        if not (d / version).is_symlink():
            (d / version).symlink_to(self.bundles / version, target_is_directory=True)
        (d / "CURRENT").write_text(f"{version}\n")
        return d

    def bodies(self, n: int, columns: bool = False) -> Path:
        return self.work / f"serve_peers-bodies-{n}{'-columns' if columns else ''}.jsonl"


def ensure_model(paths: Paths, arch: str, epochs: int) -> float | None:
    """Data, trained run, fp32 and int8 bundles (what is missing, in child processes); seconds spent or None."""
    from benchmarks.production_model import ARCH_CONFIGS, write

    t0 = time.perf_counter()
    built = False
    with (paths.work / "serve_peers-build.log").open("a") as out:
        def cli(*cmd: str) -> None:
            log(f"mtrank {' '.join(cmd[:2])} ... (log: {out.name})")
            subprocess.run([sys.executable, "-m", "mtrank.cli", *cmd], check=True, cwd=ROOT, stdout=out,
                           stderr=subprocess.STDOUT)

        if not paths.data.exists():
            write(paths.data, ROWS, seed=SEED)
        if not (paths.run / "model.pt").exists():
            shutil.rmtree(paths.run, ignore_errors=True)
            shutil.rmtree(paths.bundles, ignore_errors=True)
            cli("train", str(ARCH_CONFIGS[arch]), "--set", f"data.train=[{paths.data}]", "--set", "train.threads=2",
                "--set", f"train.epochs={epochs}", "--out", str(paths.run))
            built = True
        for name, extra in (("fp32", ()), ("int8", ("--quantize", "int8", "--no-activate"))):
            if not (paths.bundles / name / "manifest.json").exists():
                cli("export", str(paths.run), "--out", str(paths.bundles), "--version", name, *extra)
                built = True
    return time.perf_counter() - t0 if built else None


def write_bodies(paths: Paths, schema: FittedSchema, sizes: list[int], count: int) -> None:
    """``count`` /rank bodies per size (module docstring, 2.) into ``paths.bodies(n)``."""
    import pandas as pd

    req = [f.name for f in schema.features if f.group == "request"]
    item = [f.name for f in schema.features if f.group == "item" and f.name != "item_id"]
    df = pd.read_parquet(paths.data, columns=[*req, "item_id", *item])
    first = df.drop_duplicates("item_id")
    items = dict(zip(first["item_id"].tolist(), first[item].to_dict("records")))
    ids = sorted(items)
    for n in sizes:
        rng = random.Random(SEED * 1_000_003 + n)
        lines = []
        for imp in df.iloc[[rng.randrange(len(df)) for _ in range(count)]][req].to_dict("records"):
            user = imp.pop("user_id")
            cands = [{"item_id": str(i), "features": items[i]} for i in rng.sample(ids, n)]
            lines.append(json.dumps({"user_id": str(user), "context": imp, "candidates": cands}))
        paths.bodies(n).write_text("\n".join(lines) + "\n")
        paths.bodies(n, columns=True).write_text("\n".join(map(_as_columns, lines)) + "\n")


def _as_columns(line: str) -> str:
    """The same body with its candidates as columns (``RankColumnsRequest``)."""
    body = json.loads(line)
    cands = body["candidates"]
    names = sorted(set().union(*(c["features"] for c in cands)))
    body["candidates"] = {"item_id": [c["item_id"] for c in cands],
                          "features": {k: [c["features"].get(k) for c in cands] for k in names}}
    return json.dumps(body)


# ------------------------------------------------------------------------- preparation (child process)


def prepare(paths: Paths, arch: str, sizes: list[int], gemm_runs: int) -> dict[str, Any]:
    """Runs ``_prepare`` in a child process (torch stays out of this one); its JSON."""
    out = paths.work / "serve_peers-prepare.json"
    subprocess.run([sys.executable, __file__, "_prepare", "--workdir", str(paths.work), "--arch", arch,
                    "--gemm-runs", str(gemm_runs), "--sizes", *map(str, sizes)], check=True, cwd=ROOT)
    return json.loads(out.read_text())


def prepare_main(argv: list[str]) -> int:
    """rechub export, parity, GEMM rate and MACs per size (``gemm_runs`` 0: neither of the last two)."""
    ap = argparse.ArgumentParser(prog="serve_peers.py _prepare")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--gemm-runs", type=int, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", required=True)
    a = ap.parse_args(argv)
    paths = Paths.of(Path(a.workdir), a.arch)
    run = paths.run
    from benchmarks.peer_services import export_rechub, parity, read_run

    t0 = time.perf_counter()
    export_rechub(run, paths.rechub)
    res: dict[str, Any] = {"rechub_export_s": time.perf_counter() - t0}
    bodies = {n: [b for b in paths.bodies(n).read_bytes().split(b"\n") if b][:QUIET_BODIES] for n in a.sizes}
    res["parity"] = parity(run, paths.rechub, paths.bundles / "fp32",
                           [b for n in a.sizes for b in bodies[n][:PARITY_BODIES]])
    log(f"parity: {json.dumps(res['parity']['max_abs_diff'])} (ok: {res['parity']['ok']})")
    cfg, schema = read_run(run)
    res["in_dim"] = sum(cfg.model.embedding_dim if f.kind == "categorical" else f.width for f in schema.features)
    if a.gemm_runs:
        res.update(model_facts(paths, a.sizes, bodies, res["in_dim"], a.gemm_runs))
    (paths.work / "serve_peers-prepare.json").write_text(json.dumps(res, indent=1))
    return 0


def model_facts(paths: Paths, sizes: list[int], bodies: dict[int, list[bytes]], in_dim: int, runs: int
                ) -> dict[str, Any]:
    """Before any server starts (no load from this run), one thread, round-robin: ORT's fp32 GEMM rate for [B, I] x
    [I, 2048] and the fp32 and int8 bundles' ``session.run`` as the service runs it (``service.scorer.Model``, the
    encoded ``bodies`` of each size B, cycled: ``runs`` in all per graph and size); the fp32 bundle's multiply-adds
    per request."""
    import numpy as np

    from benchmarks.model_speed import GEMM_N, gemm_graph, profiled_macs, round_robin
    from mtrank.bundle import cpu_session
    from service.feature_store import StoreResult
    from service.schemas import RankRequest
    from service.scorer import Model, RankInput
    from service.settings import FusionSettings, OnnxSettings

    models = {v: Model.load(paths.bundles / v, OnnxSettings(intra_op_threads=1), FusionSettings()) for v in ("fp32", "int8")}
    inputs = {}
    for b in sizes:
        for k, body in enumerate(bodies[b]):
            req = RankRequest.model_validate_json(body)
            inp = RankInput(req.user_id, req.context, [c.item_id for c in req.candidates], [c.features for c in req.candidates])
            inputs[b, k] = models["fp32"].encode(inp, StoreResult())  # the same encoder in both bundles
    with tempfile.TemporaryDirectory(prefix="serve-peers-") as tmp:
        gemm = {b: cpu_session(gemm_graph(b, in_dim, GEMM_N, Path(tmp) / f"gemm_{b}.onnx")) for b in sizes}
        xs = {b: np.random.default_rng(b).standard_normal((b, in_dim)).astype(np.float32) for b in sizes}
        jobs = {**{("gemm", b, k): (gemm[b], {"X": xs[b]}) for b, k in inputs},
                **{(v, b, k): (m.session, x) for v, m in models.items() for (b, k), x in inputs.items()}}
        per_body = {b: len(bodies[b]) for b in sizes}
        times = round_robin(jobs, max(1, runs // max(per_body.values())), 3)
        macs = {str(b): profiled_macs(paths.bundles / "fp32" / "model.onnx", inputs[b, 0], Path(tmp)) for b in sizes}
    pooled = {(kind, b): [t for k in range(per_body[b]) for t in times[kind, b, k]] for kind in ("gemm", *models)
              for b in sizes}
    res = {"gemm_shape": f"[B, {in_dim}] x [{in_dim}, {GEMM_N}]", "macs": macs, "quiet_bodies": per_body,
           "gemm_gflops": {str(b): 2 * b * in_dim * GEMM_N / median(pooled["gemm", b]) / 1e9 for b in sizes},
           "inference_quiet_s": {str(b): median(pooled["fp32", b]) for b in sizes},
           "inference_quiet_int8_s": {str(b): median(pooled["int8", b]) for b in sizes}}
    log("quiet, 1 thread: " + "; ".join(f"B={b} GEMM {res['gemm_gflops'][str(b)]:.1f} GFLOP/s, model "
                                        f"{ms(res['inference_quiet_s'][str(b)])} ms (int8 "
                                        f"{ms(res['inference_quiet_int8_s'][str(b)])} ms)" for b in sizes))
    return res


def inside(http: dict[str, Any], facts: dict[str, Any], sizes: list[int]) -> dict[str, dict[str, Any]]:
    """Per size, mtrank fp32 (1 worker, 1 thread): stage seconds per request (/metrics, under load), the model's
    GFLOP/s and share of the GEMM rate, the share of server CPU outside the model; "load" from the inference
    thread's CPU in ``session.run`` under the load, "quiet" from the quiet ``session.run`` (``model_facts``)."""
    out = {}
    for n in sizes:
        stages = http["stages"][str(n)]
        cpu = http["summary"][str(n)][ACCOUNTED]["server_cpu_ms_per_req"] / 1e3
        mine = [x for x in http["runs"] if x["n"] == n and x["config"] == ACCOUNTED]
        total = max(sum(x["process_cpu_s"] for x in mine), 1e-9)
        row: dict[str, Any] = {"stages_s": stages, "server_cpu_s": cpu, "thread_shares": {
            role: sum(x["thread_cpu_s"][role] for x in mine) / total for role in THREAD_ROLES}}
        row["model_cpu_s"] = http["stage_cpu"][str(n)].get("inference", float("nan"))
        row["int8_model_cpu_s"] = http["int8_model_cpu"][str(n)]
        timed = {"load": row["model_cpu_s"]}
        if "macs" in facts:  # model_facts ran: the quiet timings of both bundles
            timed["quiet"] = row["quiet_s"] = facts["inference_quiet_s"][str(n)]
            row["int8_quiet_s"] = facts["inference_quiet_int8_s"][str(n)]
            row.update(macs=facts["macs"][str(n)], gemm_gflops=facts["gemm_gflops"][str(n)])
        # outside the model: 1 - the model's CPU / the server's, the model's CPU counted two ways: the inference
        # thread's CPU in session.run under the load (one intra-op thread: ORT runs every kernel on it), and the quiet
        # run (conservative: under load a run takes more CPU, other threads evicting its caches); the inference
        # stage's wall time also holds waits for the GIL and the cores, so it cannot stand for CPU
        row["outside_load"] = 1 - row["model_cpu_s"] / cpu
        row["outside_quiet"] = 1 - timed.get("quiet", timed["load"]) / cpu
        for how, secs in timed.items():
            if "macs" in row:
                row[f"gflops_{how}"] = 2 * row["macs"] / secs / 1e9
                row[f"gemm_share_{how}"] = row[f"gflops_{how}"] / row["gemm_gflops"]
        out[str(n)] = row
    return out


# -------------------------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class Variant:
    cfg: ServerConfig
    bundles: Path | None = None  # mtrank serve --bundles
    factory: str | None = None  # a benchmarks.peer_services app factory
    columns: bool = False  # send the candidates as columns (mtrank's RankColumnsRequest)


class PeerServer(Server):
    """``python -m uvicorn --factory benchmarks.peer_services:<factory>``, one worker, in its own session."""

    def __init__(self, cfg: ServerConfig, factory: str, log_path: Path) -> None:
        self.cfg = cfg
        self.port = free_port()
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "uvicorn", "--factory", f"benchmarks.peer_services:{factory}",
                    "--port", str(self.port), "--no-access-log"]
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
        env.update(cfg.env, PYTHONPATH=str(ROOT))
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)


def variants(paths: Paths) -> list[Variant]:
    from service.settings import available_cores

    peer = {"PEER_RUN_DIR": str(paths.run)}
    cores = available_cores()  # what --workers auto resolves to (each worker: one intra-op thread per core it gets)
    fp32, int8 = paths.serving("fp32"), paths.serving("int8")
    return [
        # one intra-op thread per inference: onnx.intra_op_threads auto for 1 worker and 2 executor threads on 2 cores
        Variant(ServerConfig("fp32", "(a) mtrank fp32, 1 worker, 1 intra-op thread", 1, ONE_THREAD), bundles=fp32),
        Variant(ServerConfig("int8", "(a) mtrank int8, 1 worker", 1, {}), bundles=int8),
        Variant(ServerConfig("columns", "(a) mtrank fp32, 1 worker, candidates as columns", 1, {}), bundles=fp32,
                columns=True),
        Variant(ServerConfig("fp32-all", f"(a) mtrank fp32, 1 worker, {cores} intra-op threads", 1,
                             {"MTRANK_ONNX__INTRA_OP_THREADS": str(cores)}), bundles=fp32),
        Variant(ServerConfig("auto", f"(a) mtrank fp32, the default --workers auto ({cores} workers)", cores, {}),
                bundles=fp32),
        Variant(ServerConfig("naive", "(b) naive: FastAPI + eager PyTorch", 1, peer), factory="naive_app"),
        Variant(ServerConfig("rechub", "(c) torch-rechub -> ONNX Runtime", 1, peer | {"PEER_ONNX": str(paths.rechub)}),
                factory="rechub_app"),
    ]


def launch(v: Variant, work: Path) -> Server:
    logf = work / f"serve_peers-server-{v.cfg.key}.log"
    if v.factory is not None:
        return PeerServer(v.cfg, v.factory, logf)
    assert v.bundles is not None
    return Server(v.cfg, v.bundles, logf, work / f"serve_peers-prometheus-{v.cfg.key}")


def stage_totals(port: int) -> dict[str, list[float]]:
    """``mtrank_rank_stage_seconds`` and ``mtrank_rank_stage_cpu_seconds_total`` from /metrics: stage -> [wall seconds,
    count, the inference thread's CPU seconds]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[float]] = {}
    for kind, stage, value in STAGE_RE.findall(text):
        out.setdefault(stage, [0.0, 0.0, 0.0])[STAGE_FIELDS.index(kind)] = float(value)
    return out


THREAD_ROLES = ("event loop", "executor", "other")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of one worker, with its role (``service.threads`` names the service's threads for
    the OS): the **event loop** (the thread whose id is the process id: HTTP, body parsing and validation, response
    building), the inference **executor** (``mtrank-infer_*``: features, inference, calibration, fusion, prediction
    log) and every **other** thread (statistics flush, monitor, shadow; libraries' pools: onnxruntime's, numpy's BLAS,
    uvloop's)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        role = "event loop" if task.name == str(pid) else "executor" if comm.startswith("mtrank-infer") else "other"
        out[int(task.name)] = (role, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def role_cpu(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role between two ``thread_cpu`` readings (a thread started in between counts from 0)."""
    out = dict.fromkeys(THREAD_ROLES, 0.0)
    for tid, (role, secs) in after.items():
        out[role] += secs - before.get(tid, (role, 0.0))[1]
    return out


def drive(server: Server, n: int, paths: Paths, args: argparse.Namespace, tag: str, columns: bool = False
          ) -> dict[str, Any]:
    """One closed-loop run of serve_bench's load generator against ``server``."""
    return serve_bench.run_loadgen(server.port, paths.bodies(n, columns), paths.work / f"serve_peers-load-{tag}.json",
                                   process_tree(server.proc.pid), args.concurrency, args.duration, args.warmup,
                                   args.max_requests, n)


def measure(v: Variant, server: Server, n: int, r: int, paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    """One run; for mtrank fp32 and int8 (1 worker) also their stage metrics and CPU by thread role over the run."""
    pid = server.proc.pid
    inside = v.cfg.key in STAGED
    if inside:
        stages0, threads0, cpu0 = stage_totals(server.port), thread_cpu(pid), cpu_seconds(pid)
    res = drive(server, n, paths, args, f"{v.cfg.key}-{n}-{r}", v.columns)
    if inside:
        stages = stage_totals(server.port)
        res["stages"] = {st: [x - x0 for x, x0 in zip(now, stages0.get(st, [0.0] * len(now)))]
                         for st, now in stages.items()}
        res["thread_cpu_s"], res["process_cpu_s"] = role_cpu(threads0, thread_cpu(pid)), cpu_seconds(pid) - cpu0
    res.update(config=v.cfg.key, n=n, round=r)
    lat = res["latencies"]
    log(f"n={n:5} {v.cfg.key:8} round {r}: {res['requests'] / res['elapsed_s']:7.1f} req/s, p50 {ms(median(lat))} ms, "
        f"p99 {ms(quantile(lat, 0.99))} ms, errors {res['errors'] + res['exceptions']}")
    return res


def run_http(paths: Paths, args: argparse.Namespace) -> dict[str, Any]:
    vs = variants(paths)
    servers: dict[str, Server] = {}
    startup: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        for v in vs:
            servers[v.cfg.key] = launch(v, paths.work)
        for v in vs:
            servers[v.cfg.key].wait_ready()
            startup[v.cfg.key] = time.perf_counter() - t0  # all start together: an upper bound
        for key in ("fp32", "int8", "columns", "fp32-all"):  # thread_cpu reads one process; the targets are per worker
            if len(process_tree(servers[key].proc.pid)) != 1:
                raise RuntimeError(f"mtrank {key}, 1 worker: expected one process, got {servers[key].cmd}")
        log(f"{len(vs)} servers ready; {args.rounds} round(s) x {len(args.sizes)} sizes x {len(vs)} servers, "
            f"{args.warmup:g} s + {args.duration:g} s each")
        runs = [measure(v, servers[v.cfg.key], n, r, paths, args) | {"startup_s": startup[v.cfg.key]}
                for r in range(args.rounds) for n in args.sizes for v in vs[r % len(vs):] + vs[:r % len(vs)]]
        summary = {str(n): summarise_http([x for x in runs if x["n"] == n], [v.cfg for v in vs]) for n in args.sizes}
        staged = {(key, n): [x for x in runs if x["n"] == n and x["config"] == key and "stages" in x]
                  for key in STAGED for n in args.sizes}
        stages = {str(n): stage_costs(staged[ACCOUNTED, n]) for n in args.sizes}
        stage_cpu = {str(n): stage_costs(staged[ACCOUNTED, n], cpu=True) for n in args.sizes}
        int8_model_cpu = {str(n): stage_costs(staged["int8", n], cpu=True).get("inference", float("nan"))
                          for n in args.sizes}
        half = None
        if args.half_load:
            try:
                half = half_load({k: servers[k] for k in HALF_LOAD}, summary[str(TARGET_N)]["fp32"]["rps"], paths, args)
            except subprocess.CalledProcessError as err:  # keep the closed-loop results
                log(f"half load failed: {err}")
                half = {"error": f"the open-loop client exited with {err.returncode}"}
    finally:
        for s in servers.values():
            s.stop()
    for x in runs:
        x.pop("latencies")
    return {"summary": summary, "stages": stages, "stage_cpu": stage_cpu, "int8_model_cpu": int8_model_cpu,
            "half_load": half, "runs": runs,
            "servers": {v.cfg.key: {"label": v.cfg.label, "cmd": servers[v.cfg.key].cmd, "env": v.cfg.env} for v in vs}}


def stage_costs(runs: list[dict[str, Any]], cpu: bool = False) -> dict[str, float]:
    """Wall seconds (``cpu``: the inference thread's CPU seconds) per request per stage over the runs (their /metrics
    deltas pooled)."""
    sums: dict[str, list[float]] = {}
    for x in runs:
        for stage, (wall, count, thread_cpu) in x["stages"].items():
            acc = sums.setdefault(stage, [0.0, 0.0])
            acc[0] += thread_cpu if cpu else wall
            acc[1] += count
    return {stage: s / c for stage, (s, c) in sums.items() if c}


# ---------------------------------------------------------------------------------- open-loop load


ARRIVALS = ("poisson", "uniform")


def ideal_tail(servers: int, load: float = 0.5, n: int = 200_000) -> float:
    """p99 / p50 of the response time of an ideal queue: Poisson arrivals, ``servers`` servers each busy a constant
    time per request, at ``load`` of its capacity (simulated, fixed seed): the floor that arrival bursts set."""
    rng = random.Random(SEED)
    t, free, resp = 0.0, [0.0] * servers, []
    for _ in range(n):
        t += rng.expovariate(load * servers)
        k = min(range(servers), key=free.__getitem__)
        free[k] = max(t, free[k]) + 1.0
        resp.append(free[k] - t)
    return quantile(resp, 0.99) / quantile(resp, 0.5)


def half_load(servers: dict[str, Server], saturation_rps: float, paths: Paths, args: argparse.Namespace
              ) -> dict[str, Any]:
    """Open-loop runs at half the closed-loop saturation of mtrank fp32 (1 worker), the same arrivals for each of
    ``servers`` in turn: Poisson arrivals (bursts queue), then evenly spaced ones (what is left is the service's own
    variation: GC, the GIL, thread hand-offs)."""
    rate = saturation_rps / 2
    out: dict[str, Any] = {"rate": rate, "saturation_rps": saturation_rps}
    for arrivals in ARRIVALS:
        for key, server in servers.items():
            log(f"half load: {key}, open loop, {arrivals} arrivals at {rate:.1f} req/s (closed-loop saturation "
                f"{saturation_rps:.1f} req/s), n={TARGET_N}")
            res = run_open_loop(server.port, paths.bodies(TARGET_N), rate, arrivals, args,
                                paths.work / f"serve_peers-openloop-{arrivals}-{key}.json")
            log(f"half load, {key}, {arrivals}: {res['requests']} requests, p50 {ms(res['p50'])} ms, p99 "
                f"{ms(res['p99'])} ms, p99 / p50 {res['p99'] / res['p50']:.2f}, errors {res['errors']}")
            out.setdefault(key, {})[arrivals] = res
    return out


def run_open_loop(port: int, bodies: Path, rate: float, arrivals: str, args: argparse.Namespace, out: Path
                  ) -> dict[str, Any]:
    """One open-loop run (``_openloop``, a process of its own) against ``port``: ``args.warmup`` s, then
    2 x ``args.duration`` s measured; its counts with p50, p90, p99 and max (seconds) in place of the latencies."""
    subprocess.run([sys.executable, __file__, "_openloop", "--port", str(port), "--bodies", str(bodies), "--rate",
                    str(rate), "--arrivals", arrivals, "--warmup", str(args.warmup), "--duration", str(2 * args.duration),
                    "--out", str(out)], check=True, cwd=ROOT)
    res = json.loads(out.read_text())
    lat = res.pop("latencies")
    res.update(p50=quantile(lat, 0.5), p90=quantile(lat, 0.9), p99=quantile(lat, 0.99), max=max(lat, default=float("nan")))
    return res


def ab_open_loop(bundles: Path, bodies: Path, args: argparse.Namespace, work: Path) -> str:
    """``--ab`` with ``--ab-rate R``: the tail at a fixed load instead of the saturation req/s. Per round, each side's
    server (``serve_bench.ab_configs``) gets evenly spaced arrivals at R req/s (``run_open_loop``), the sides
    alternating; the report gives per round and as medians over rounds p50, p99 and p99 / p50, and the median of the
    paired p99 ratios."""
    table: list[list[dict[str, Any]]] = []
    with ExitStack() as trees:
        cfgs = serve_bench.ab_configs(args, work, trees)
        for r in range(args.rounds):
            row = []
            for cfg in cfgs:
                server = Server(cfg, bundles, work / f"server-{cfg.key}-{r}.log", work / f"prometheus-{cfg.key}-{r}")
                try:
                    server.wait_ready()
                    res = run_open_loop(server.port, bodies, args.ab_rate, "uniform", args,
                                        work / f"openloop-{cfg.key}-{r}.json")
                finally:
                    server.stop()
                if res["errors"]:
                    raise RuntimeError(f"{cfg.key} round {r}: {res['errors']} errors")
                log(f"open loop {cfg.key} round {r}: {res['requests']} requests, p50 {ms(res['p50'])} ms, p99 "
                    f"{ms(res['p99'])} ms, p99 / p50 {res['p99'] / res['p50']:.2f}")
                row.append(res)
            table.append(row)
    lines = [f"round {r + 1}: " + "; ".join(f"{cfg.key} p50 {ms(x['p50'])} ms, p99 {ms(x['p99'])} ms, p99 / p50 "
                                          f"{x['p99'] / x['p50']:.2f}" for cfg, x in zip(cfgs, row))
             for r, row in enumerate(table)]
    med = [{k: median([row[i][k] for row in table]) for k in ("p50", "p99")} for i in range(2)]
    tail = [median([row[i]["p99"] / row[i]["p50"] for row in table]) for i in range(2)]
    ratio = median([row[1]["p99"] / row[0]["p99"] for row in table])
    lines.append(f"| {cfgs[0].label} → {cfgs[1].label} | {args.ab_rate:g} req/s | {ms(med[0]['p50'])} → "
                 f"{ms(med[1]['p50'])} | {ms(med[0]['p99'])} → {ms(med[1]['p99'])} | **{tail[0]:.2f} → {tail[1]:.2f}** | "
                 f"{ratio:.2f}× |  (evenly spaced arrivals; p50 ms, p99 ms, p99 / p50: medians of {args.rounds} rounds; "
                 "the median paired p99 ratio new / base)")
    return "\n".join(lines)


async def open_loop(port: int, bodies: list[bytes], rate: float, warmup: float, duration: float,
                    arrivals: str = "poisson") -> dict[str, Any]:
    """Arrivals at ``rate``, Poisson or evenly spaced; each request on an idle keep-alive connection (a new one
    when none is idle); latency from the scheduled arrival, so a late server is not hidden by a late client."""
    head = (f"POST /rank HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: {n}\r\n\r\n")
    requests = [head.format(n=len(b)).encode() + b for b in bodies]
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # last used last (LIFO)
    lat: list[float] = []
    counts = {"errors": 0, "connections": 0, "resent": 0}
    t = time.perf_counter()
    t_warm = t + warmup
    t_end = t_warm + duration

    async def connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while idle:  # servers close idle keep-alive connections (uvicorn: after 5 s): never reuse one idle for 2 s
            reader, writer, used = idle.pop()
            if time.perf_counter() - used < MAX_IDLE_S:
                return reader, writer
            writer.close()
        counts["connections"] += 1
        return await asyncio.open_connection("127.0.0.1", port)

    async def one(k: int, t_sched: float) -> None:
        for attempt in range(2):  # a reused connection the server closed meanwhile: once more on a fresh one
            reader, writer = await connection()
            try:
                writer.write(requests[k % len(requests)])
                status, _ = await serve_bench._read_response(reader)
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                counts["resent"] += 1
                if attempt:
                    raise
        idle.append((reader, writer, time.perf_counter()))
        if t_sched >= t_warm:
            lat.append(time.perf_counter() - t_sched)
            counts["errors"] += status != 200

    rng = random.Random(SEED)
    tasks = []
    while (t := t + (rng.expovariate(rate) if arrivals == "poisson" else 1 / rate)) < t_end:
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        tasks.append(asyncio.create_task(one(len(tasks), t)))
    await asyncio.gather(*tasks)
    for _, writer, _ in idle:
        writer.close()
    return {"rate": rate, "arrivals": arrivals, "duration_s": duration, "requests": len(lat),
            "achieved_rps": len(lat) / duration,
            **counts, "latencies": lat}


def openloop_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="serve_peers.py _openloop")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--bodies", required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--warmup", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--arrivals", choices=ARRIVALS, default="poisson")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import uvloop

    bodies = [b for b in Path(a.bodies).read_bytes().split(b"\n") if b]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        res = runner.run(open_loop(a.port, bodies, a.rate, a.warmup, a.duration, a.arrivals))
    Path(a.out).write_text(json.dumps(res))
    return 0


# --------------------------------------------------------------------------------------------- report


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def int8_ceiling(row: dict[str, Any]) -> str:
    """Amdahl's bound on the int8 server, from the fp32 server's own numbers under the load: the work outside the
    model (HTTP, parse, features, calibration, fusion, statistics, response: the same code in both servers) stays,
    the model's CPU shrinks to the int8 model's. So the server's CPU per request can shrink at most
    (outside + fp32 model) / (outside + int8 model), and 1.6x needs outside <= (fp32 - 1.6 int8) / 0.6."""
    fp32, int8 = row["model_cpu_s"], row["int8_model_cpu_s"]
    outside = row["server_cpu_s"] - fp32
    ceiling = (outside + fp32) / (outside + int8)
    need = (fp32 - TARGET_INT8 * int8) / (TARGET_INT8 - 1)
    return (f"With the {ms(outside)} ms of server CPU per request outside the model, the same in both servers, the "
            f"int8 model's {ms(int8)} ms in place of {ms(fp32)} ms bound the server's CPU per request at "
            f"{ceiling:.2f}x less (Amdahl); {TARGET_INT8:g}x needs at most {ms(need)} ms outside the model.")


def verdicts(summary: dict[str, Any], inside: dict[str, Any], isa: str) -> list[str]:
    """The issue's targets at 500 candidates (fp32, one worker), met or missed; ``isa``: the CPU's instructions for
    int8 dot products (``serve_bench.machine_note``)."""
    s, row = summary.get(str(TARGET_N)), inside.get(str(TARGET_N))
    if s is None or row is None:
        return [f"Targets not evaluated: {TARGET_N} candidates not in --sizes."]
    met = lambda ok: "**met**" if ok else "**missed**"  # noqa: E731
    out = []
    for key, target in (("naive", TARGET_NAIVE), ("rechub", TARGET_RECHUB)):
        ratio = s["fp32"]["rps"] / s[key]["rps"]
        out.append(f"mtrank fp32 (1 worker) vs {s[key]['label']} at {TARGET_N} candidates: {ratio:.2f}x the "
                   f"requests/s, target >= {target:g}x: {met(ratio >= target)}.")
    ratio = s["int8"]["rps"] / s["fp32"]["rps"]
    # the model's own int8 speed-up bounds the service's: (outside + fp32 model) / (outside + int8 model) < fp32 / int8
    alone = {"under the load (its CPU per request)": row["model_cpu_s"] / row["int8_model_cpu_s"]}
    if "quiet_s" in row:
        alone["quiet (one thread, bodies cycled)"] = row["quiet_s"] / row["int8_quiet_s"]
    capped = max(alone.values()) < TARGET_INT8
    out.append(f"int8 vs fp32 (1 worker) at {TARGET_N} candidates: {ratio:.2f}x the requests/s, target >= "
               f"{TARGET_INT8:g}x: {met(ratio >= TARGET_INT8)}; server CPU per request "
               f"{s['fp32']['server_cpu_ms_per_req'] / s['int8']['server_cpu_ms_per_req']:.2f}x less; the model alone "
               + ", ".join(f"{x:.2f}x {how}" for how, x in alone.items())
               + (f": below the target itself, so no service around this model reaches it on this CPU ({isa})."
                  if capped else f". {int8_ceiling(row)}"))
    out.append(f"Server CPU outside the model at {TARGET_N} candidates: {row['outside_load']:.0%} with the model's CPU "
               f"under the load, {row['outside_quiet']:.0%} with its quiet run, target <= {TARGET_OUTSIDE:.0%}: "
               f"{met(row['outside_load'] <= TARGET_OUTSIDE)} / {met(row['outside_quiet'] <= TARGET_OUTSIDE)}.")
    if "gemm_share_quiet" in row:
        out.append(f"The model at {TARGET_N} candidates (quiet run): {row['gemm_share_quiet']:.0%} of the GEMM rate, "
                   f"target >= {TARGET_GEMM:.0%}: {met(row['gemm_share_quiet'] >= TARGET_GEMM)}.")
    return out


def render(meta: dict[str, Any], facts: dict[str, Any], http: dict[str, Any] | None) -> str:
    m = meta["machine"]
    sizes = meta["sizes"]
    par = facts["parity"]
    lines = [START, "## Serving head-to-head: mtrank vs a naive FastAPI + PyTorch service and torch-rechub + ONNX Runtime",
             "", f"Measured {meta['date']} (runtime {meta['runtime_s'] / 60:.1f} min"
             + (f", model build {meta['build_s']:.0f} s included" if meta["build_s"] else ", model reused from --workdir")
             + ") with:", "", "```bash", meta["command"], "```", "",
             f"Machine: {m['cpu']} ({m['int8_isa']}), **{m['cores']} shared, noisy cores** (load average at start "
             f"{m['loadavg_start'][0]:.2f}), the load generator on the same cores; Python {m['python']}, onnxruntime "
             f"{m['onnxruntime']}, " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ". Method: "
             "`benchmarks/serve_peers.py` (module docstring); peers: `benchmarks/peer_services.py`.", "",
             f"Model: `{meta['config']}` trained on {ROWS:,} rows of `benchmarks/production_model.py` data (input "
             f"I = {facts['in_dim']}), the same weights in every server: (a) mtrank's bundles (`mtrank export`, fp32 "
             "and int8), (b) rebuilt as eager PyTorch modules, (c) copied into torch-rechub's model and exported with "
             "its ONNX exporter. (b) and (c) fuse uncalibrated probabilities (the run holds no calibration); mtrank "
             "fuses calibrated ones. Requests: one impression's user and context features, n distinct items' "
             f"features, {meta['bodies']} bodies per size cycled, all candidates returned with task scores; "
             f"{meta['concurrency']} closed-loop connections, {meta['warmup']:g} s warm-up + {meta['duration']:g} s "
             f"measured per server and size, {meta['rounds']} round(s) interleaved; p50 / p99 over all rounds' "
             "requests, req/s the median round.", "",
             f"Parity with the fp32 bundle's raw `p_<task>` ({par['requests']} requests, {par['candidates']} "
             f"candidates, tolerance {par['tolerance']:g}): "
             + "; ".join(f"{name} " + ", ".join(f"{t} {v:.1e}" for t, v in d.items())
                         for name, d in par["max_abs_diff"].items())
             + f": **{'OK' if par['ok'] else 'FAILED'}**.", ""]
    if http is None:
        return "\n".join([*lines, END])
    summ = http["summary"]
    keys = list(http["servers"])
    lines += ["| candidates | server | req/s | candidates/s | p50 ms | p99 ms | server CPU ms/req | errors |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        for k in keys:
            s = summ[str(n)][k]
            lines.append(f"| {n} | {s['label']} | {s['rps']:.1f} | {s['rps'] * n:,.0f} | {ms(s['p50'])} | "
                         f"{ms(s['p99'])} | {s['server_cpu_ms_per_req']:.2f} | {s['errors']} |")
    lines += ["", "Throughput ratios (req/s, same size):", "",
              "| candidates | fp32 / (b) | fp32 / (c) | int8 / (b) | int8 / (c) | workers auto / (b) | workers auto / (c) | int8 / fp32 | columns / fp32 |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        s = summ[str(n)]
        lines.append(f"| {n} | " + " | ".join(_x(s[a]["rps"], s[b]["rps"]) for a in ("fp32", "int8", "auto")
                                              for b in ("naive", "rechub")) + f" | {_x(s['int8']['rps'], s['fp32']['rps'])} | "
                     f"{_x(s['columns']['rps'], s['fp32']['rps'])} |")
    ins = http["inside"]
    stages = sorted({st for n in sizes for st in ins[str(n)]["stages_s"]})
    quiet = "macs" in facts

    def both(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[f"{key}_load"], fmt) + (" / " + format(row[f"{key}_quiet"], fmt) if quiet else "")

    lines += ["", "Inside mtrank (fp32, 1 worker, 1 intra-op thread). Stages: `mtrank_rank_stage_seconds` sum / count "
              "on its /metrics over its runs (wall ms per request, under the load above). The model's cost two ways, "
              "**load / quiet**: the inference thread's CPU in `session.run` under the load "
              "(`mtrank_rank_stage_cpu_seconds_total{stage=\"inference\"}`: with one intra-op thread ONNX Runtime runs "
              "every kernel on that thread), and the same `session.run` (the service's session "
              "settings and fetches, the encoded inputs of 8 bodies cycled) timed before the servers "
              "started" + (f" ({ms(facts['inference_quiet_s'][str(sizes[-1])])} ms at {sizes[-1]})" if quiet else "")
              + "; GFLOP/s = 2 x MAC (counted from an ORT profile of the graph) / that time, % of the fp32 GEMM rate "
              f"ORT reached on one thread for {facts.get('gemm_shape', 'a MatMul')} in the same quiet phase; outside "
              "the model = 1 - the model's CPU seconds / the server's CPU seconds per request (/proc), **load / "
              "quiet** as above (the quiet run is the conservative one: under load a run takes more CPU, the other "
              "threads evicting its caches); event loop / executor / other "
              "threads = the server's CPU split by thread (/proc, the threads named by `service.threads`): the main "
              "thread (HTTP, body parsing and validation, features, fusion, response building), the `mtrank-infer_*` "
              "executor threads (inference, calibration, prediction log, statistics kept) and all others (statistics "
              "flush, monitor; onnxruntime's, numpy's and uvloop's own threads). Under load the stages' wall time also "
              "holds waits for the GIL and the cores (the event loop, the second executor thread and the load "
              "generator compete), which is why the share outside the model takes CPU time, not the stage's wall "
              "time.", "",
              "| candidates | " + " | ".join(f"{st} ms" for st in stages) + " | server CPU ms/req | event loop | executor | other threads | outside the model"
              + (" | MMAC | GFLOP/s | GEMM GFLOP/s | % of GEMM" if quiet else "") + " |",
              "|---:|" + "---:|" * (len(stages) + (9 if quiet else 5))]
    for n in sizes:
        row = ins[str(n)]
        lines.append(f"| {n} | " + " | ".join(f"{row['stages_s'][st] * 1e3:.2f}" if st in row["stages_s"] else ""
                                             for st in stages)
                     + f" | {row['server_cpu_s'] * 1e3:.2f} | "
                     + " | ".join(f"{row['thread_shares'][role]:.0%}" for role in THREAD_ROLES)
                     + f" | {row['outside_load']:.0%} / {row['outside_quiet']:.0%}"
                     + (f" | {row['macs'] / 1e6:.1f} | {both(row, 'gflops', '.1f')} | {row['gemm_gflops']:.1f} | "
                        f"{both(row, 'gemm_share', '.0%')}" if quiet else "") + " |")
    half = http["half_load"]
    if half is not None and "error" in half:
        lines += ["", f"Half load: not measured ({half['error']})."]
    elif half is not None:
        labels = http["servers"]
        lines += ["", f"Half load (mtrank fp32, 1 worker, with one intra-op thread and with one per core, "
                  f"{TARGET_N} candidates, open loop at {half['rate']:.1f} req/s = "
                  f"half the closed-loop {half['saturation_rps']:.1f} req/s; latency from each request's scheduled "
                  "arrival; a keep-alive connection idle for 2 s is not reused). Poisson arrivals come in bursts that "
                  "queue: an ideal queue with a constant service time has p99 / p50 = "
                  f"{ideal_tail(1):.1f} with one server and {ideal_tail(2):.1f} with two at half load under them "
                  "(simulated), so the target cannot hold for them; evenly spaced arrivals leave the service's own "
                  "variation (GC, the GIL, thread hand-offs):", "",
                  "| server | arrivals | requests | p50 ms | p90 ms | p99 ms | max ms | p99 / p50 | target p99 <= 2 x p50 | "
                  "errors | connections opened | resent |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for key, arrivals in ((k, a) for a in ARRIVALS for k in HALF_LOAD if k in half):
            h = half[key][arrivals]
            lines.append(f"| {labels[key]['label']} | {arrivals} | {h['requests']} | {ms(h['p50'])} | {ms(h['p90'])} | "
                         f"{ms(h['p99'])} | "
                         f"{ms(h['max'])} | {h['p99'] / h['p50']:.2f} | {'met' if h['p99'] <= 2 * h['p50'] else 'missed'}"
                         f" | {h['errors']} | {h['connections']} | {h['resent']} |")
    lines += ["", "Targets (issue 9):", "", *(f"* {v}" for v in verdicts(summ, http["inside"], m["int8_isa"])), "",
              f"Raw results: `{meta['out_json']}` (JSON, not committed).", "", END]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = benchmark_parser(__doc__, "/tmp/serve_peers.json", "rounds, servers and sizes interleaved (default 3; --quick 1)")
    ap.set_defaults(epochs=1)
    ap.add_argument("--arch", choices=("mmoe", "ple"), default="mmoe")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                    help="candidates per request, comma-separated (default 50,200,500,1000; --quick 50,500)")
    ap.add_argument("--bodies", type=int, default=32, help="distinct request bodies per size")
    ap.add_argument("--half-load", action="store_true",
                    help=f"then an open-loop run of mtrank fp32 at {TARGET_N} candidates at half its saturation req/s")
    ap.add_argument("--ab", metavar="BASE_REV", help="A/B instead: mtrank (1 worker, 1 intra-op thread, the --ab-bundle "
                    "bundle) from BASE_REV vs --ab-new at --ab-size candidates, alternating (prints, docs untouched; "
                    "--rounds default 5)")
    ap.add_argument("--ab-bundle", choices=("fp32", "int8"), default="fp32", help="the bundle both sides of --ab serve")
    ap.add_argument("--ab-new", metavar="REV", help="the other side of --ab (default: this working tree)")
    ap.add_argument("--ab-size", type=int, default=TARGET_N, help=f"candidates per request in --ab (default {TARGET_N})")
    ap.add_argument("--ab-columns", action="store_true", help="--ab sends the bodies with their candidates as columns")
    ap.add_argument("--ab-rate", type=float, metavar="REQ_PER_S",
                    help="--ab compares the tail instead: evenly spaced arrivals at this rate (open loop, 2 x --duration "
                    "s measured), p50 / p99 per side")
    serve_bench.add_ab_env(ap)
    args = ap.parse_args(argv)
    q = args.quick
    args.duration = args.duration if args.duration is not None else (2.0 if q else 8.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if q else 2.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if q else 5 if args.ab else 3)
    args.sizes = args.sizes or ([args.ab_size] if args.ab else [50, 500] if q else list(SIZES))
    args.gemm_runs = 0 if args.skip_inprocess else (20 if q else 200)
    if args.concurrency < 1 or args.rounds < 1 or args.duration <= 0 or args.bodies < PARITY_BODIES:
        ap.error(f"--concurrency, --rounds must be >= 1, --duration > 0, --bodies >= {PARITY_BODIES}")
    if args.ab_rate is not None and (not args.ab or args.ab_rate <= 0):
        ap.error("--ab-rate needs --ab and a rate > 0")
    if args.half_load and TARGET_N not in args.sizes:
        ap.error(f"--half-load needs {TARGET_N} in --sizes")
    return args


def main(argv: list[str]) -> int:
    commands: dict[str, Callable[[list[str]], int]] = {"_prepare": prepare_main, "_openloop": openloop_main}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    args = parse_args(argv)
    t_start = time.perf_counter()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = machine_note()
    with working_dir(args.workdir, "serve-peers-") as work:
        paths = Paths.of(work, args.arch)
        build_s = ensure_model(paths, args.arch, args.epochs)
        schema = FittedSchema.from_dict(json.loads((paths.run / "schema.json").read_text()))
        write_bodies(paths, schema, args.sizes, args.bodies)
        if args.ab:
            bodies_path = paths.bodies(args.ab_size, args.ab_columns)
            if args.ab_rate:
                print(ab_open_loop(paths.serving(args.ab_bundle), bodies_path, args, work))
                return 0
            bodies = [b for b in bodies_path.read_bytes().split(b"\n") if b]
            print(serve_bench.run_ab(paths.serving(args.ab_bundle), bodies, args, work, args.ab_size))
            return 0
        log("preparing: rechub export, parity" + (", GEMM rate, MACs" if args.gemm_runs else ""))
        facts = prepare(paths, args.arch, args.sizes, args.gemm_runs)
        if not facts["parity"]["ok"]:
            raise SystemExit(f"parity failed: {json.dumps(facts['parity'], indent=1)}")
        http = None if args.skip_http else run_http(paths, args)
        if http is not None:
            http["inside"] = inside(http, facts, args.sizes)
        meta = {"date": date, "machine": machine, "build_s": build_s, "runtime_s": time.perf_counter() - t_start,
                "command": shlex.join(["env", "-u", "OPENBLAS_CORETYPE", "python", "benchmarks/serve_peers.py", *argv]),
                "config": f"benchmarks/configs/production_{args.arch}.yaml", "sizes": args.sizes, "bodies": args.bodies,
                "concurrency": args.concurrency, "warmup": args.warmup, "duration": args.duration,
                "rounds": args.rounds, "out_json": args.out_json,
                "versions": {p: metadata.version(p) for p in ("torch", "torch-rechub", "fastapi", "pydantic", "uvicorn")}}
        publish(args, render(meta, facts, http), {"meta": meta, "facts": facts, "http": http}, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
