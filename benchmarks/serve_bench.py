"""Serving benchmark: the service's own scoring path in-process, and /rank over real uvicorn processes.

Every number is a median (or p99) over many requests, and every comparison is a RATIO against a
baseline measured in the same run, on the same bundle and the same requests:

1. **Bundle.** Synthetic feed data (``model.synthetic.write(path, 50_000, seed=0)``), the demo config
   (``model.synthetic.DEMO_CONFIG``, ``train.threads=1``, 2 epochs; 1 with ``--quick``) trained with
   ``model.train.train`` and exported with ``model.export.export_run`` into ``--workdir`` (default: a
   temporary directory). This runs in a child process, so the measuring process never imports torch
   (like the service). A ``--workdir`` that already holds ``bundles/CURRENT`` is reused.
2. **In-process** (onnxruntime intra-/inter-op threads fixed to 1): ``service.scorer.Model.load`` and
   ``service.scorer.rank(model, inp, StoreResult(), fusion, top_k, reject)``, what the /rank handler computes
   (encoding and fusion on its event loop, the graph run and calibration on its inference thread), called as the
   handler would (``RankInput`` built from the body as
   ``service.rank_body.parse_rank`` reads it, the default fusion profile, an empty feature-store result) for 10, 100, 500 and 1000
   candidates whose features are drawn from the synthetic items. Reports total and per-stage medians
   (``Scored.timings``), p99, and the handler's other work on the same requests (body parsing, response
   building, the prediction log). Baselines through the same ``InferenceSession``: (a) one run per
   candidate (batch 1) vs one batched run; (b) request inputs as a batch of 1 broadcast by the graph vs
   the request row repeated n times (row-aligned), same encoded inputs.
3. **HTTP.** ``mtrank serve --bundles DIR --port P`` subprocesses, (A) 1 worker with
   ``MTRANK_ONNX__INTRA_OP_THREADS=2``, (B) ``--workers 2`` with ``MTRANK_ONNX__INTRA_OP_THREADS=1``, and
   (G) A with Python's GC defaults (``MTRANK_GC__FREEZE=false MTRANK_GC__GEN0_THRESHOLD=700``), each driven by
   the same closed-loop load generator (a separate process: ``--concurrency`` keep-alive HTTP/1.1
   connections over loopback on asyncio streams, bounded by ``--duration`` and ``--max-requests``, after
   ``--warmup`` seconds) posting /rank with 100 candidates. Configurations alternate for ``--rounds``
   rounds; latencies are pooled over rounds, req/s is the median round. The load generator runs on the
   same 2 cores as the server; its CPU time and the server processes' CPU time are reported.
4. **A/B** (``--ab BASE_REV [--ab-new REV]``, instead of 2 and 3): the same HTTP run against servers from
   two git revisions (a detached worktree each, C extensions built in place; ``--ab-new`` defaults to this
   working tree), 1 worker with 1 intra-op thread, the revisions alternating round by round; prints per-round
   numbers and a table row (median req/s, median of the paired ratios, p50 and p99, server CPU per request, the
   machine's idle CPU share). ``--ab-env-base`` / ``--ab-env-new KEY=VALUE`` set the environment of one side
   (a setting's A/B: the same revision on both sides).

Usage (from the repository root; OPENBLAS_CORETYPE slows numpy on the benchmark machine, so unset it)::

    env -u OPENBLAS_CORETYPE python benchmarks/serve_bench.py            # full run (~5 min), updates the docs
    env -u OPENBLAS_CORETYPE python benchmarks/serve_bench.py --quick    # smoke run (< 1 min), prints only
    env -u OPENBLAS_CORETYPE python benchmarks/serve_bench.py --ab BASE_REV --ab-new NEW_REV  # ~15 min

Writes raw results to ``--out-json`` and (full runs, or ``--write-docs``) replaces the section between
``<!-- serve-bench:start -->`` and ``<!-- serve-bench:end -->`` in ``--docs`` (markers appended at the
end of the file when missing; nothing else in the file is touched).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import log, revision_tree, working_dir, write_docs  # noqa: E402

START, END = "<!-- serve-bench:start -->", "<!-- serve-bench:end -->"
SECTION_TITLE = "## Serving: in-process scoring and /rank throughput"
SIZES = (10, 100, 500, 1000)
HTTP_CANDIDATES = 100
BODY_POOL = 64  # distinct request bodies per candidate count (cycled)
SEED = 0
CONNECT_STAGGER_S = 0.1  # between the load generator's connection openings (all during warm-up)


# ------------------------------------------------------------------------------------ statistics


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (q in [0, 1]); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.2f}"


# ---------------------------------------------------------------------------------------- bundle


def build_bundle(workdir: Path, epochs: int, overrides: Sequence[str] = ()) -> Path:
    """Synthetic data -> train the demo config (plus ``overrides``, ``key=value``) -> export; returns the
    bundle directory (runs with torch)."""
    import copy

    from model.export import export_run
    from model.synthetic import DEMO_CONFIG, write
    from model.train import train
    from mtrank.config import apply_overrides, parse_config

    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "synthetic.parquet"
    write(data, 50_000, seed=SEED)
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["data"]["train"] = [str(data)]
    cfg = parse_config(apply_overrides(raw, [f"train.epochs={epochs}", "train.threads=1", "train.progress=false",
                                             f"train.seed={SEED}", *overrides]), base_dir=workdir)
    train(cfg, workdir / "run")
    return export_run(workdir / "run", workdir / "bundles")


def ensure_bundle(workdir: Path, epochs: int, overrides: Sequence[str] = ()) -> tuple[Path, float | None]:
    """The bundle under ``workdir/bundles`` (built in a child process unless one exists); build seconds or None."""
    bundles = workdir / "bundles"
    if not (bundles / "CURRENT").exists():
        extra = f", {' '.join(overrides)}" if overrides else ""
        log(f"building the bundle in {workdir} (synthetic 50k rows, demo config{extra}, {epochs} epoch(s), 1 thread)")
        t0 = time.perf_counter()
        out = workdir / "build.log"
        workdir.mkdir(parents=True, exist_ok=True)
        with out.open("w") as fh:
            rc = subprocess.call([sys.executable, __file__, "_build", "--workdir", str(workdir), "--epochs", str(epochs),
                                  *(f"--set={o}" for o in overrides)], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        if rc != 0:
            raise SystemExit(f"bundle build failed (rc {rc}); see {out}:\n{out.read_text()[-3000:]}")
        return bundles / (bundles / "CURRENT").read_text().strip(), time.perf_counter() - t0
    version = (bundles / "CURRENT").read_text().strip()
    log(f"reusing bundle {version} in {bundles}")
    return bundles / version, None


# -------------------------------------------------------------------------------------- requests


def request_bodies(data_path: Path, n_candidates: int, count: int, seed: int) -> list[bytes]:
    """``count`` JSON /rank bodies with ``n_candidates`` candidates each, values drawn from the synthetic data.

    User and context features come from random impressions, item features from the distinct items (a
    random order per request; beyond the number of distinct items, items repeat with a ``~k`` id suffix
    so that ids stay unique). No request_id (the service generates one), default top_k (all) and
    task scores, as a plain client would send.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(data_path).to_pylist()
    items: dict[str, dict[str, Any]] = {}
    for r in table:
        items[r["item_id"]] = {"item_category": r["item_category"], "item_price": r["item_price"],
                               "item_tags": r["item_tags"], "item_popularity": r["item_popularity"]}
    item_ids = sorted(items)
    rng = random.Random(seed * 1_000_003 + n_candidates)
    bodies = []
    for _ in range(count):
        imp = table[rng.randrange(len(table))]
        context = {k: imp[k] for k in ("user_age_bucket", "user_country", "user_activity", "device", "hour")}
        order: list[str] = []
        while len(order) < n_candidates:
            order += rng.sample(item_ids, len(item_ids))
        cands = []
        for j, iid in enumerate(order[:n_candidates]):
            lap = j // len(item_ids)
            cands.append({"item_id": iid if lap == 0 else f"{iid}~{lap}", "features": items[iid]})
        bodies.append(json.dumps({"user_id": imp["user_id"], "context": context, "candidates": cands}).encode())
    return bodies


# ------------------------------------------------------------------------------------ in-process


@dataclass
class InprocSize:
    n: int
    reps: int
    total: list[float] = field(default_factory=list)
    features: list[float] = field(default_factory=list)
    inference: list[float] = field(default_factory=list)
    rest: list[float] = field(default_factory=list)  # calibration + fusion + argsort (rank() minus the timed stages)
    parse: list[float] = field(default_factory=list)  # service.rank_body.parse_rank (what the handler does)
    respond: list[float] = field(default_factory=list)  # service.rank_response.response_json (what the handler does)
    predlog: list[float] = field(default_factory=list)  # JoinStore.put (memory backend)
    batched: list[float] = field(default_factory=list)  # one session.run over n candidates, request inputs [1, .]
    per_candidate: list[float] = field(default_factory=list)  # n session.runs of batch 1
    row_aligned: list[float] = field(default_factory=list)  # request inputs repeated to [n, .]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "reps": self.reps}
        for name in ("total", "features", "inference", "rest", "parse", "respond", "predlog", "batched",
                     "per_candidate", "row_aligned"):
            values: list[float] = getattr(self, name)
            out[name] = {"median": median(values), "p99": quantile(values, 0.99), "count": len(values)}
        return out


@contextmanager
def service_gc() -> Iterator[None]:
    """The GC tuning the service applies after start-up (``service.app.tune_gc``, default ``gc`` settings)."""
    import gc

    from service.app import tune_gc
    from service.settings import GCSettings

    old = gc.get_threshold()
    tune_gc(GCSettings())
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _clock(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_inprocess(bundle_dir: Path, bodies: dict[int, list[bytes]], reps: dict[int, int],
                  baseline_reps: dict[int, int]) -> dict[str, Any]:
    import numpy as np

    from service.feature_store import StoreResult
    from service.feedback.memory import MemoryJoinStore
    from service.rank_body import RankBody, parse_rank
    from service.rank_response import response_json
    from service.scorer import Model, RankInput, rank
    from service.settings import FeedbackSettings, FusionSettings, OnnxSettings, Settings

    settings = Settings()
    onnx = OnnxSettings(intra_op_threads=1, inter_op_threads=1)
    model = Model.load(bundle_dir, onnx, FusionSettings())
    fusion = model.profiles[settings.fusion.default]  # what _choose_fusion picks: no experiments, no request fusion
    reject = settings.limits.unknown_features == "reject"
    fb = FeedbackSettings()
    predictions = MemoryJoinStore(fb.prediction_ttl_s, fb.prediction_requests, fb.prediction_items, fb.max_events)
    session = model.session
    results: dict[int, InprocSize] = {}
    shapes: dict[str, list[int]] = {}

    def parse(body: bytes) -> RankBody:
        return parse_rank(body, "application/json")

    def to_input(b: RankBody) -> RankInput:  # as the /rank handler builds it
        return RankInput(b.options.user_id, b.options.context, b.item_ids, b.item_features, b.columns, b.columnar)

    with service_gc():
        for n in SIZES:
            res = results[n] = InprocSize(n, reps[n])
            reqs = [parse(b) for b in bodies[n]]
            inps = [to_input(r) for r in reqs]
            for req, inp in zip(reqs, inps):  # warm-up: every request once
                rank(model, inp, StoreResult(), fusion, req.options.top_k, reject)
            for k in range(reps[n]):
                i = k % len(inps)
                req, inp, body = reqs[i], inps[i], bodies[n][i]
                t0 = time.perf_counter()
                ranked = rank(model, inp, StoreResult(), fusion, req.options.top_k, reject)
                total = time.perf_counter() - t0
                t = ranked.scored.timings
                res.total.append(total)
                res.features.append(t["features"])
                res.inference.append(t["inference"])
                res.rest.append(total - t["features"] - t["inference"])
                res.parse.append(_clock(lambda body=body: parse(body)))
                base = {"request_id": f"r{k}", "model_version": model.version, "fusion": settings.fusion.default,
                        "arm": "default", "degraded": False}
                res.respond.append(_clock(lambda ranked=ranked, inp=inp, req=req, base=base: response_json(
                    base, inp.item_ids, ranked, model.task_names, req.options.raw_scores,
                    req.options.return_task_scores)))
                res.predlog.append(_clock(lambda ranked=ranked, inp=inp, key=f"r{n}-{k}": predictions.put(
                    key, model.version, "default", inp.item_ids, model.task_names, ranked.scored.raw,
                    ranked.scored.calibrated)))

            # Baselines on the raw session, same encoded inputs; the variants alternate rep by rep.
            encoded = [model.encode(inp, StoreResult(), reject) for inp in inps]
            if n == HTTP_CANDIDATES:
                shapes = {key: list(v.shape) for key, v in encoded[0].items()}
            for k in range(baseline_reps[n]):
                inputs = encoded[k % len(encoded)]
                req_part = {key: v for key, v in inputs.items() if key.startswith("request")}
                item_part = {key: v for key, v in inputs.items() if key.startswith("item")}
                rows = {**{key: np.repeat(v, n, axis=0) for key, v in req_part.items()}, **item_part}
                t0 = time.perf_counter()
                out_b = session.run(model.fetch, inputs)
                t1 = time.perf_counter()
                out_r = session.run(model.fetch, rows)
                t2 = time.perf_counter()
                singles = [session.run(model.fetch, {**req_part, **{key: v[j : j + 1] for key, v in item_part.items()}})
                           for j in range(n)]
                t3 = time.perf_counter()
                res.batched.append(t1 - t0)
                res.row_aligned.append(t2 - t1)
                res.per_candidate.append(t3 - t2)
                if k == 0:  # the three layouts must give the same scores
                    for j, name in enumerate(model.fetch):
                        one = np.concatenate([s[j] for s in singles])
                        if not (np.allclose(out_b[j], out_r[j], atol=1e-5) and np.allclose(out_b[j], one, atol=1e-5)):
                            raise AssertionError(f"{name}: broadcast / row-aligned / per-candidate outputs differ")
            log(f"in-process n={n}: rank p50 {ms(median(res.total))} ms, p99 {ms(quantile(res.total, 0.99))} ms; "
                f"batched {ms(median(res.batched))} ms vs per-candidate {ms(median(res.per_candidate))} ms")
    return {"model_version": model.version, "arch": model.manifest.arch, "tasks": model.task_names,
            "gates": model.gate_outputs, f"input_shapes_{HTTP_CANDIDATES}": shapes,
            "sizes": [results[n].summary() for n in SIZES]}


# ------------------------------------------------------------------------------------------ HTTP


@dataclass(frozen=True)
class ServerConfig:
    key: str
    label: str
    workers: int
    env: dict[str, str]
    tree: Path = ROOT  # the checkout the server's code comes from (--ab: a worktree of another revision)


CONFIGS = (
    ServerConfig("A", "1 worker, intra-op threads 2", 1, {"MTRANK_ONNX__INTRA_OP_THREADS": "2"}),
    ServerConfig("B", "2 workers, intra-op threads 1", 2, {"MTRANK_ONNX__INTRA_OP_THREADS": "1"}),
    ServerConfig("G", "A + Python GC defaults", 1, {"MTRANK_ONNX__INTRA_OP_THREADS": "2", "MTRANK_GC__FREEZE": "false",
                                                    "MTRANK_GC__GEN0_THRESHOLD": "700"}),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def machine_idle() -> tuple[int, int]:
    """(idle + iowait, all) jiffies of every CPU of the machine since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """``mtrank serve`` in its own session; stopped with SIGTERM to that process (its workers follow)."""

    def __init__(self, cfg: ServerConfig, bundles: Path, log_path: Path, prometheus_dir: Path) -> None:
        self.cfg = cfg
        self.port = free_port()
        self.log_path = log_path
        cmd = [sys.executable, "-m", "mtrank.cli", "serve", "--bundles", str(bundles), "--port", str(self.port),
               "--workers", str(cfg.workers)]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MTRANK_") and k not in ("PROMETHEUS_MULTIPROC_DIR", "OPENBLAS_CORETYPE")}
        env.update(cfg.env, PYTHONPATH=str(cfg.tree))
        if cfg.workers > 1:  # serve() would mkdtemp one (never removed); keep it in the work directory
            env["PROMETHEUS_MULTIPROC_DIR"] = str(prometheus_dir)
        self.cmd = cmd
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cfg.tree,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Every worker logged start-up complete and /readyz answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            if self.log_path.read_text().count("Application startup complete") >= self.cfg.workers:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session this script started for it
                self.proc.wait(10)
        self._log.close()


def run_http_config(cfg: ServerConfig, bundles: Path, bodies_path: Path, args: argparse.Namespace,
                    workdir: Path, round_no: int, expect_items: int = HTTP_CANDIDATES,
                    before_stop: Callable[[Server], dict[str, Any]] | None = None) -> dict[str, Any]:
    """One server, one load-generator run; ``before_stop(server)`` (optional) adds its keys to the result."""
    server = Server(cfg, bundles, workdir / f"server-{cfg.key}-{round_no}.log", workdir / f"prometheus-{cfg.key}-{round_no}")
    try:
        t0 = time.perf_counter()
        server.wait_ready()
        startup = time.perf_counter() - t0
        pids = process_tree(server.proc.pid)
        res = run_loadgen(server.port, bodies_path, workdir / f"load-{cfg.key}-{round_no}.json", pids,
                          args.concurrency, args.duration, args.warmup, args.max_requests, expect_items)
        res.update(config=cfg.key, round=round_no, startup_s=startup, server_cmd=server.cmd, server_env=cfg.env)
        if before_stop is not None:
            res.update(before_stop(server))
        lat = res["latencies"]
        log(f"HTTP {cfg.key} round {round_no}: {res['requests'] / res['elapsed_s']:.1f} req/s, "
            f"p50 {ms(median(lat))} ms, p99 {ms(quantile(lat, 0.99))} ms, errors {res['errors']}")
        return res
    finally:
        server.stop()


def run_http(bundles: Path, bodies: list[bytes], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bodies_path = workdir / "bodies-http.jsonl"
    bodies_path.write_bytes(b"\n".join(bodies) + b"\n")
    runs = [run_http_config(cfg, bundles, bodies_path, args, workdir, r)
            for r in range(args.rounds) for cfg in CONFIGS]
    summary = summarise_http(runs, CONFIGS)
    for x in runs:
        x.pop("latencies")  # keep the raw JSON small
    return {"summary": summary, "runs": runs}


def summarise_http(runs: list[dict[str, Any]], configs: Sequence[ServerConfig]) -> dict[str, dict[str, Any]]:
    """Per configuration: latencies pooled over its rounds, req/s the median round, CPU per request."""
    summary = {}
    for cfg in configs:
        mine = [x for x in runs if x["config"] == cfg.key]
        lat = [v for x in mine for v in x["latencies"]]
        reqs = sum(x["requests"] for x in mine)
        server_cpu = sum(sum(x["server_cpu_s"].values()) for x in mine)
        summary[cfg.key] = {
            "label": cfg.label, "workers": cfg.workers, "env": cfg.env,
            "rps": median([x["requests"] / x["elapsed_s"] for x in mine]),
            "rps_rounds": [x["requests"] / x["elapsed_s"] for x in mine],
            "p50": median(lat), "p90": quantile(lat, 0.90), "p99": quantile(lat, 0.99), "max": max(lat, default=0.0),
            "requests": reqs, "errors": sum(x["errors"] + x["exceptions"] for x in mine),
            "server_cpu_ms_per_req": 1e3 * server_cpu / max(reqs, 1),
            "server_cores": server_cpu / sum(x["cpu_window_s"] for x in mine),
            "client_cpu_ms_per_req": 1e3 * sum(x["client_cpu_s"] for x in mine) / max(reqs, 1),
            "busiest_processes_cpu_s": [sorted(x["server_cpu_s"].values(), reverse=True)[:cfg.workers] for x in mine],
            "startup_s": median([x["startup_s"] for x in mine]),
        }
    return summary


def add_ab_env(ap: argparse.ArgumentParser) -> None:
    """--ab-env-base / --ab-env-new: settings for one side of --ab (a setting's A/B: the same revision on both)."""
    for side in ("base", "new"):
        ap.add_argument(f"--ab-env-{side}", metavar="KEY=VALUE", action="append", default=[],
                        type=_env_pair, help=f"an environment variable for the {side} server of --ab (repeatable)")


def _env_pair(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"KEY=VALUE expected, got {text!r}")
    return text


def ab_configs(args: argparse.Namespace, workdir: Path, trees: ExitStack) -> list[ServerConfig]:
    """The two sides of ``--ab``: base (``args.ab``) and new (``args.ab_new``, None = the working tree), each a git
    worktree of its revision held open by ``trees``, 1 worker, 1 intra-op thread, its ``--ab-env-*`` settings."""
    env = {"MTRANK_ONNX__INTRA_OP_THREADS": "1"}
    sides = (("base", args.ab, args.ab_env_base), ("new", args.ab_new, args.ab_env_new))
    return [ServerConfig(key, " ".join([rev or "working tree", *extra]), 1, env | dict(e.split("=", 1) for e in extra),
                         trees.enter_context(revision_tree(rev, workdir / f"tree-{key}")))
            for key, rev, extra in sides]


def run_ab(bundles: Path, bodies: list[bytes], args: argparse.Namespace, workdir: Path,
           expect_items: int = HTTP_CANDIDATES) -> str:
    """``--ab BASE [--ab-new NEW]``: 1 worker, 1 intra-op thread, the two revisions alternating round by
    round; returns the report (per round, then medians and the median of the paired req/s ratios and of the
    server CPU per request)."""
    bodies_path = workdir / "bodies-http.jsonl"
    bodies_path.write_bytes(b"\n".join(bodies) + b"\n")
    with ExitStack() as trees:
        cfgs = ab_configs(args, workdir, trees)
        rounds = [[run_http_config(cfg, bundles, bodies_path, args, workdir, r, expect_items) for cfg in cfgs]
                  for r in range(args.rounds)]

    def stats(run: dict[str, Any]) -> tuple[float, float, float, float, float]:
        if run["errors"] or run["exceptions"]:
            raise RuntimeError(f"{run['config']} round {run['round']}: {run['errors']} errors, {run['exceptions']} exceptions")
        lat = run["latencies"]
        return (run["requests"] / run["elapsed_s"], quantile(lat, 0.5), quantile(lat, 0.99),
                sum(run["server_cpu_s"].values()) / run["requests"], run["machine_idle"])

    table = [[stats(run) for run in r] for r in rounds]  # [round][side] -> (req/s, p50 s, p99 s, CPU s / request, idle)
    lines = [f"round {r + 1}: " + "; ".join(f"{cfg.key} {rps:.1f} req/s, p50 {ms(p50)} ms, p99 {ms(p99)} ms, "
                                          f"server CPU {ms(cpu)} ms/req, machine idle {idle:.0%}"
                                          for cfg, (rps, p50, p99, cpu, idle) in zip(cfgs, row))
             for r, row in enumerate(table)]
    med = [[median([row[k][i] for row in table]) for i in range(5)] for k in range(2)]  # [side][stat]
    ratio = median([row[1][0] / row[0][0] for row in table])
    cpu_ratio = median([row[1][3] / row[0][3] for row in table])
    lines.append(f"| {cfgs[0].label} → {cfgs[1].label} | {med[0][0]:.1f} → {med[1][0]:.1f} | **{ratio:.2f}×** | "
                 f"{ms(med[0][1])} → {ms(med[1][1])} | {ms(med[0][2])} → {ms(med[1][2])} | "
                 f"{ms(med[0][3])} → {ms(med[1][3])} ({cpu_ratio:.2f}×) | {med[0][4]:.0%} → {med[1][4]:.0%} |  (req/s base → "
                 f"new, median of {args.rounds}; median paired ratio; p50 ms; p99 ms; server CPU ms per request (median "
                 "paired ratio); the machine's CPUs idle: medians of rounds)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ load generator


@dataclass
class LoadState:
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0  # measured responses with a status other than 200
    exceptions: int = 0  # connection failures (the connection is reopened)
    warmup_requests: int = 0
    last: float = 0.0
    checked: bool = False


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            raise RuntimeError("chunked responses are not supported by this load generator")
    if length is None:
        raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
    return status, await reader.readexactly(length)


async def _client(idx: int, port: int, requests: list[bytes], t_warm: float, t_end: float, max_requests: int,
                  expect_items: int, state: LoadState, stride: int) -> None:
    k = idx
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    # Connections open one by one: opened together, one uvicorn worker's accept loop takes them all and the
    # other worker idles (keep-alive pins a connection to the worker that accepted it).
    await asyncio.sleep(idx * CONNECT_STAGGER_S)
    while True:
        t0 = time.perf_counter()
        if t0 >= t_end or state.requests >= max_requests:
            break
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            writer.write(requests[k % len(requests)])
            k += stride
            status, payload = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            if t0 >= t_warm:
                state.exceptions += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            print(f"loadgen: connection error: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        t1 = time.perf_counter()
        if not state.checked and status == 200:
            state.checked = True
            got = len(json.loads(payload)["items"])
            if got != expect_items:
                raise RuntimeError(f"expected {expect_items} items in the response, got {got}")
        if t0 >= t_warm and t1 <= t_end and state.requests < max_requests:
            state.latencies.append(t1 - t0)
            state.requests += 1
            state.last = t1
            if status != 200:
                state.errors += 1
        elif t0 < t_warm:
            state.warmup_requests += 1
    if writer is not None:
        writer.close()


async def loadgen(args: argparse.Namespace) -> dict[str, Any]:
    bodies = [b for b in Path(args.bodies).read_bytes().split(b"\n") if b]
    head = (f"POST /rank HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\nContent-Type: application/json\r\n"
            "Content-Length: {n}\r\n\r\n")
    requests = [head.format(n=len(b)).encode() + b for b in bodies]
    pids = [int(p) for p in args.server_pids.split(",") if p]
    state = LoadState()
    now = time.perf_counter()
    t_warm, t_end = now + args.warmup, now + args.warmup + args.duration
    marks: dict[str, Any] = {}

    def snapshot() -> tuple[float, float, dict[int, float], tuple[int, int]]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), ru.ru_utime + ru.ru_stime, {p: cpu_seconds(p) for p in pids}, machine_idle()

    async def mark_warm() -> None:
        await asyncio.sleep(max(0.0, t_warm - time.perf_counter()))
        marks["warm"] = snapshot()

    marker = asyncio.create_task(mark_warm())
    await asyncio.gather(*(_client(i, args.port, requests, t_warm, t_end, args.max_requests, args.expect_items, state,
                                   args.concurrency) for i in range(args.concurrency)))
    await marker
    t_stop, client_cpu, server_cpu, idle = snapshot()
    t0, client_cpu0, server_cpu0, idle0 = marks["warm"]
    capped = state.requests >= args.max_requests
    elapsed = (state.last if capped else t_end) - t_warm
    return {"requests": state.requests, "elapsed_s": elapsed, "capped_by_max_requests": capped,
            "errors": state.errors, "exceptions": state.exceptions, "warmup_requests": state.warmup_requests,
            "concurrency": args.concurrency, "latencies": state.latencies, "client_cpu_s": client_cpu - client_cpu0,
            "server_cpu_s": {str(p): server_cpu[p] - server_cpu0[p] for p in pids}, "cpu_window_s": t_stop - t0,
            "machine_idle": (idle[0] - idle0[0]) / max(1, idle[1] - idle0[1])}  # share of all CPUs' time idle


def run_loadgen(port: int, bodies: Path, out: Path, server_pids: list[int], concurrency: int, duration: float,
                warmup: float, max_requests: int, expect_items: int) -> dict[str, Any]:
    """One closed-loop run of the load generator in a process of its own (``_loadgen``) against ``port``, the bodies
    one per line of ``bodies``; its results (also left in ``out``)."""
    subprocess.run([sys.executable, __file__, "_loadgen", "--port", str(port), "--bodies", str(bodies),
                    "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup),
                    "--max-requests", str(max_requests), "--expect-items", str(expect_items),
                    "--server-pids", ",".join(map(str, server_pids)), "--out", str(out)], check=True, cwd=ROOT)
    return json.loads(out.read_text())


def loadgen_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="serve_bench.py _loadgen")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--bodies", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--warmup", type=float, required=True)
    ap.add_argument("--max-requests", type=int, required=True)
    ap.add_argument("--expect-items", type=int, required=True)
    ap.add_argument("--server-pids", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        res = runner.run(loadgen(args))
    res["event_loop"] = "uvloop" if factory else "asyncio"
    Path(args.out).write_text(json.dumps(res))
    return 0


# ------------------------------------------------------------------------------------------- report


INT8_DOT = (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"))


def int8_isa(flags: set[str]) -> str:
    """The CPU's int8 dot-product instructions (what ONNX Runtime's int8 GEMMs run fastest on), from /proc/cpuinfo
    flags: e.g. "AVX512-VNNI", or "AVX2, no VNNI" where int8 products go through 16-bit multiply-adds."""
    dot = [name for flag, name in INT8_DOT if flag in flags]
    if dot:
        return ", ".join(dot)
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{simd}, no VNNI" if flags else "CPU flags unknown"


def machine_note() -> dict[str, Any]:
    import numpy
    import onnxruntime

    cpu, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if cpu != "unknown CPU" and flags:
                break
    except OSError:
        pass
    return {"cpu": cpu, "int8_isa": int8_isa(flags), "cores": os.cpu_count(), "python": platform.python_version(), "numpy": numpy.__version__,
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform(), "loadavg_start": os.getloadavg()}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def render(meta: dict[str, Any], inproc: dict[str, Any] | None, http: dict[str, Any] | None) -> str:
    m = meta["machine"]
    lines = [START, SECTION_TITLE, "",
             f"Measured {meta['date']} with (runtime {meta['runtime_s'] / 60:.1f} min, "
             + (f"bundle build {meta['build_s']:.0f} s included" if meta["build_s"] else "bundle reused from --workdir")
             + "):", "",
             "```bash", meta["command"], "```", "",
             f"Machine: {m['cpu']}, **{m['cores']} shared, noisy cores** (load average at start "
             f"{m['loadavg_start'][0]:.2f}); Python {m['python']}, numpy {m['numpy']}, onnxruntime {m['onnxruntime']}. "
             "All figures are medians (p99 where stated) over many requests, and each comparison is a ratio "
             "against a baseline measured in the same run on the same requests, so read the ratios rather than "
             "the absolute times.", "",
             f"Bundle: the demo config (`model.synthetic.DEMO_CONFIG`, {meta['bundle']['arch']}, tasks "
             f"{', '.join(meta['bundle']['tasks'])}) trained {meta['epochs']} epoch(s) on "
             "`model.synthetic.write(path, 50_000, seed=0)` and exported with `model.export.export_run`; "
             f"version `{meta['bundle']['version']}`. Requests: user/context values from random synthetic "
             "impressions, candidates from the synthetic items (features sent in the request, the feature store "
             "empty), default fusion profile, all candidates returned with task scores.", ""]
    if inproc is not None:
        sizes = inproc["sizes"]
        lines += ["### In-process: `service.scorer.rank` (what the /rank handler computes, split between its event loop and inference thread)", "",
                  "`Model.load(bundle, OnnxSettings(intra_op_threads=1, inter_op_threads=1), FusionSettings())`, "
                  "**onnxruntime fixed to 1 intra-op and 1 inter-op thread**, the service's GC tuning applied "
                  "(`gc.freeze()`, gen-0 threshold 50 000); `rank(model, RankInput(...), StoreResult(), "
                  "model.profiles['default'], top_k=None)` in a loop. Stages: `features` and `inference` are "
                  "`Scored.timings` (columns + encoding; the ONNX run, gates fetched); `rest` is calibration + "
                  "fusion + argsort (rank() minus both). Times in ms.", "",
                  "| candidates | requests | rank p50 | rank p99 | features p50 | inference p50 | rest p50 | µs / candidate (p50) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in sizes:
            lines.append(f"| {s['n']} | {s['reps']} | {ms(s['total']['median'])} | {ms(s['total']['p99'])} | "
                         f"{ms(s['features']['median'])} | {ms(s['inference']['median'])} | {ms(s['rest']['median'])} | "
                         f"{1e6 * s['total']['median'] / s['n']:.1f} |")
        lines += ["", "The handler's other work on the same requests, same process (not in `rank()`; parsing and "
                  "the response run on the event loop, the prediction log on the inference thread): parsing = "
                  "`service.rank_body.parse_rank` (what the handler does with the body), "
                  "response = `service.rank_response.response_json`, prediction log = `JoinStore.put` (memory backend). "
                  "Medians in ms; the last column compares them with `rank()` itself.", "",
                  "| candidates | parse p50 | response p50 | prediction log p50 | (parse + response + log) / rank |",
                  "|---:|---:|---:|---:|---:|"]
        for s in sizes:
            extra = s["parse"]["median"] + s["respond"]["median"] + s["predlog"]["median"]
            lines.append(f"| {s['n']} | {ms(s['parse']['median'])} | {ms(s['respond']['median'])} | "
                         f"{ms(s['predlog']['median'])} | {_ratio(extra, s['total']['median'])} |")
        lines += ["", "Baselines through the same `InferenceSession` (1 thread), same encoded inputs, variants "
                  "alternating request by request (outputs checked equal): (a) **one batched run** vs **one run per "
                  "candidate** (batch 1, request inputs [1, ·]); (b) request inputs as a **batch of 1 broadcast** "
                  "in the graph vs the request row **repeated n times** (row-aligned, the training layout; the "
                  "`np.repeat` itself not timed). Medians in ms.", "",
                  "| candidates | runs | batched, broadcast (the service) | (a) per-candidate | batched / per-candidate | (b) row-aligned | broadcast / row-aligned |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for s in sizes:
            lines.append(f"| {s['n']} | {s['batched']['count']} | {ms(s['batched']['median'])} | "
                         f"{ms(s['per_candidate']['median'])} | {_ratio(s['batched']['median'], s['per_candidate']['median'])} | "
                         f"{ms(s['row_aligned']['median'])} | {_ratio(s['batched']['median'], s['row_aligned']['median'])} |")
    if http is not None:
        hs = http["summary"]
        a, b, g = hs["A"], hs["B"], hs["G"]
        h = meta["http"]
        lines += ["", "### HTTP: `mtrank serve` under closed-loop load", "",
                  f"`mtrank serve --bundles DIR --port P` (uvicorn, defaults otherwise: embedded feature store, "
                  f"`onnx.executor_threads` 2) as a subprocess; a separate load-generator process keeps "
                  f"**{h['concurrency']} keep-alive connections** busy over loopback (asyncio streams + uvloop, "
                  f"raw HTTP/1.1), each sending `POST /rank` with {HTTP_CANDIDATES} candidates as soon as the previous "
                  f"answer arrived: {h['warmup']:g} s warm-up, then {h['duration']:g} s measured (at most "
                  f"{h['max_requests']} requests), {h['rounds']} round(s) with the configurations alternating; "
                  "latency percentiles over all measured requests of all rounds, req/s = the median round. "
                  "**The load generator shares the 2 cores with the server**, so the server gets less than 2 cores "
                  "(its CPU per request is listed, as is the generator's).", "",
                  "| config | server | req/s | p50 ms | p90 ms | p99 ms | requests | errors | server CPU ms/req | server cores busy | load-gen CPU ms/req |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key in ("A", "B", "G"):
            s = hs[key]
            env = " ".join(f"`{k}={v}`" for k, v in s["env"].items())
            workers = " `--workers 2`" if s["workers"] > 1 else ""
            lines.append(f"| {key}: {s['label']} | {env}{workers} | {s['rps']:.1f} | {ms(s['p50'])} | {ms(s['p90'])} | "
                         f"{ms(s['p99'])} | {s['requests']} | {s['errors']} | {s['server_cpu_ms_per_req']:.2f} | "
                         f"{s['server_cores']:.2f} | {s['client_cpu_ms_per_req']:.2f} |")
        lines += ["", "| ratio | value |", "|---|---:|",
                  f"| req/s B / A (2 workers vs 1 worker with 2 intra-op threads) | {_ratio(b['rps'], a['rps'])} |",
                  f"| p50 B / A | {_ratio(b['p50'], a['p50'])} |",
                  f"| p99 B / A | {_ratio(b['p99'], a['p99'])} |",
                  f"| p99 G / A (Python GC defaults vs the service's freeze + gen-0 threshold 50 000) | "
                  f"{_ratio(g['p99'], a['p99'])} |",
                  f"| p50 G / A | {_ratio(g['p50'], a['p50'])} |",
                  f"| req/s G / A | {_ratio(g['rps'], a['rps'])} |"]
        if inproc is not None:
            s100 = next(s for s in inproc["sizes"] if s["n"] == HTTP_CANDIDATES)
            work = sum(s100[k]["median"] for k in ("parse", "total", "respond", "predlog"))
            lines.append(f"| server CPU per request B / in-process handler work ({ms(work)} ms: parse + rank + "
                         f"response + prediction log, {HTTP_CANDIDATES} candidates, 1 thread) | "
                         f"{_ratio(b['server_cpu_ms_per_req'] / 1e3, work)} |")
        lines += ["", "Per-round req/s: " + "; ".join(
            f"{k} " + ", ".join(f"{x:.1f}" for x in hs[k]["rps_rounds"]) for k in ("A", "B", "G")) + ". "
            "B's two workers, CPU seconds per round: " + "; ".join(
            " / ".join(f"{c:.1f}" for c in r) for r in b["busiest_processes_cpu_s"]) + "."]
    lines += ["", f"Raw results: `{meta['out_json']}` (JSON, not committed).", "", END]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def publish(args: argparse.Namespace, section: str, raw: dict[str, Any], start: str = START, end: str = END) -> None:
    """Raw results to ``--out-json``, the markdown section to stdout and (full runs, or ``--write-docs``) to
    ``--docs`` between the markers."""
    Path(args.out_json).write_text(json.dumps(raw, indent=1, default=str))
    print(section)
    if not args.no_docs and (not args.quick or args.write_docs):
        write_docs(Path(args.docs), section, start, end)
        log(f"updated {args.docs}")
    elif args.quick:
        log("--quick: docs not updated (add --write-docs to force)")


def benchmark_parser(doc: str, out_json: str, rounds_help: str) -> argparse.ArgumentParser:
    """The options serve_bench and observe_bench share (bundle, HTTP runs, outputs)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (< 1 min): few repetitions, short HTTP runs")
    ap.add_argument("--workdir", help="where data, runs, bundles, logs go (default: a temporary directory, removed)")
    ap.add_argument("--duration", type=float, help="measured seconds per HTTP run (default 20; --quick 2)")
    ap.add_argument("--warmup", type=float, help="HTTP warm-up seconds before measuring (default 3; --quick 1)")
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop connections of the load generator")
    ap.add_argument("--max-requests", type=int, default=200_000, help="cap on measured requests per HTTP run")
    ap.add_argument("--rounds", type=int, help=rounds_help)
    ap.add_argument("--epochs", type=int, help="training epochs for the bundle(s) (default 2; --quick 1)")
    ap.add_argument("--skip-inprocess", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--out-json", default=out_json)
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to update")
    ap.add_argument("--no-docs", action="store_true", help="do not touch the docs file")
    ap.add_argument("--write-docs", action="store_true", help="update the docs even with --quick")
    return ap


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = benchmark_parser(__doc__, "/tmp/serve_bench.json", "HTTP rounds, configurations alternating (default 2; --quick 1)")
    ap.add_argument("--ab", metavar="BASE_REV", help="A/B instead: /rank served by BASE_REV vs --ab-new, alternating "
                    "(1 worker, 1 intra-op thread; prints, docs untouched; --rounds default 7)")
    ap.add_argument("--ab-new", metavar="REV", help="the other side of --ab (default: this working tree)")
    add_ab_env(ap)
    args = ap.parse_args(argv)
    q = args.quick
    args.duration = args.duration if args.duration is not None else (2.0 if q else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if q else 3.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if q else 7 if args.ab else 2)
    args.epochs = args.epochs if args.epochs is not None else (1 if q else 2)
    if args.concurrency < 1 or args.rounds < 1 or args.duration <= 0 or args.max_requests < 1:
        ap.error("--concurrency, --rounds, --max-requests must be >= 1 and --duration > 0")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_loadgen"]:
        return loadgen_main(argv[1:])
    if argv[:1] == ["_build"]:
        ap = argparse.ArgumentParser(prog="serve_bench.py _build")
        ap.add_argument("--workdir", required=True)
        ap.add_argument("--epochs", type=int, required=True)
        ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
        b = ap.parse_args(argv[1:])
        print(f"bundle: {build_bundle(Path(b.workdir), b.epochs, b.set)}")
        return 0

    args = parse_args(argv)
    t_start = time.perf_counter()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = machine_note()
    with working_dir(args.workdir, "serve-bench-") as workdir:
        bundle_dir, build_s = ensure_bundle(workdir, args.epochs)
        data = workdir / "synthetic.parquet"
        if not data.exists():
            from model.synthetic import write  # a reused bundle dir without its data (numpy + pandas only)

            write(data, 50_000, seed=SEED)
        if args.ab:
            print(run_ab(bundle_dir.parent, request_bodies(data, HTTP_CANDIDATES, BODY_POOL, SEED), args, workdir))
            return 0
        bodies = {n: request_bodies(data, n, BODY_POOL, SEED) for n in SIZES}
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        meta: dict[str, Any] = {
            "date": date, "machine": machine, "epochs": args.epochs, "build_s": build_s,
            "command": shlex.join(["env", "-u", "OPENBLAS_CORETYPE", "python", "benchmarks/serve_bench.py", *argv]),
            "bundle": {"version": manifest["model_version"], "arch": manifest["arch"],
                       "tasks": [t["name"] for t in manifest["tasks"]]},
            "http": {"concurrency": args.concurrency, "duration": args.duration, "warmup": args.warmup,
                     "rounds": args.rounds, "max_requests": args.max_requests},
            "out_json": args.out_json,
        }
        inproc = None
        if not args.skip_inprocess:
            scale = 20 if args.quick else 1
            reps = {10: 3000, 100: 1500, 500: 400, 1000: 200}
            baseline = {10: 400, 100: 150, 500: 40, 1000: 20}
            log("in-process scoring (onnxruntime 1 thread)")
            inproc = run_inprocess(bundle_dir, bodies, {n: max(10, r // scale) for n, r in reps.items()},
                                   {n: max(3, r // scale) for n, r in baseline.items()})
        http = None
        if not args.skip_http:
            log(f"HTTP: {len(CONFIGS)} configurations x {args.rounds} round(s), {args.warmup:g} s + {args.duration:g} s each")
            http = run_http(bundle_dir.parent, bodies[HTTP_CANDIDATES], args, workdir)
        meta["runtime_s"] = time.perf_counter() - t_start
        publish(args, render(meta, inproc, http), {"meta": meta, "inprocess": inproc, "http": http})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
