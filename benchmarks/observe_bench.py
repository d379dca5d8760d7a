"""Observability cost on /rank: scoring with the gate / calibration / drift counters on vs off.

The issue's requirement: observing a request (``service.observe.Observability.observe``: vectorised numpy
over the gate outputs the ONNX run already returned, no per-candidate Python) must cost under 5 % of
the request time. Measured here, every comparison a RATIO against a baseline in the same run on the same
bundle and requests (medians; the variants interleaved):

1. **Bundles** (``serve_bench.ensure_bundle``, a child process each, built in parallel, so the measuring
   process never imports torch): the demo config (``model.synthetic.DEMO_CONFIG``, MMoE, 4 experts, 4 gates)
   and the same config with ``model.arch=ple model.levels=2 model.n_shared_experts=2 model.n_task_experts=1``
   (PLE, 9 gates), each trained 2 epochs (1 with ``--quick``) on ``model.synthetic.write(path, 50_000,
   seed=0)`` and exported. A ``--workdir`` that already holds them is reused.
2. **In-process** (a child process per Prometheus mode, onnxruntime 1 intra-/1 inter-op thread, the
   service's GC tuning): per bundle and for 100, 500 and 1000 candidates (``serve_bench.request_bodies``),
   repetitions alternating (a) ``service.scorer.rank`` with the model loaded with ``onnx.fetch_gates=False``
   and (b) ``rank`` with the gates fetched + ``Observability.observe(model, scored, n, "default", served)``
   (``Observability(Metrics(), Settings(), "embedded")`` primed with ``on_slot("primary", model)``): what
   ``service.api._score_logged`` adds with monitoring on, minus the prediction log (written in both).
   ``observe`` only keeps references to the request's arrays; the counting happens in
   ``Observability.flush`` (a thread of the service, every second), which runs here once per
   ``FLUSH_EVERY`` "on" requests and is charged to them: its time divided by the requests is added to every
   (b) (amortised). Reported: medians of (a), (b), observe + amortised flush, the median of the per-request
   ratios (b)/(a), observe's share of (b), and (b) - (a) as a share of the handler's whole in-process work on
   the same request (body parsing + ``RankRequest`` validation, response building + ``pydantic_core.to_json``,
   the prediction log: timed after each pair). Then ``ModelStats.flush`` of batches of ``FLUSH_EVERY``
   requests, whole and by part (gates, calibration buckets, score bins), per request, and the
   ``mtrank_gate_entropy`` variants for one request's gate arrays (every gate, rows renormalised in float64):
   ``normalised_entropy`` alone; + ``service.metrics.observe_many`` (per candidate: one bucket count per
   bucket); + one ``Histogram.observe`` per candidate in a Python loop; + one ``observe`` of the request's
   mean entropy. The bucket counts of the first two are checked equal. Last,
   ``service.monitor.Monitor.evaluate`` (the monitor thread's work every ``monitoring.interval_s``) over
   the counters those runs filled. Both modes of prometheus-client: single process (values behind a
   mutex) and multiprocess (mmap'ed files; ``PROMETHEUS_MULTIPROC_DIR`` set to a temporary directory in
   the child before the import, which picks the value class), which is how ``mtrank serve --workers N`` runs.
3. **HTTP**: ``mtrank serve`` subprocesses (``serve_bench.Server``: 1 worker, ``MTRANK_ONNX__INTRA_OP_THREADS=1``,
   the demo MMoE bundle), observability on (defaults) vs off (``MTRANK_MONITORING__ENABLED=false``
   ``MTRANK_ONNX__FETCH_GATES=false``: no counters, no monitor thread, no gate outputs fetched), each driven
   by serve_bench's closed-loop load generator (a separate process, ``--concurrency`` keep-alive connections,
   ``--warmup`` s then ``--duration`` s) posting /rank with 500 candidates. Rounds alternate the order
   (on, off; off, on; ...). Reported: req/s (median round), p50 / p99 pooled over rounds, server CPU ms per
   request, the medians of the per-round paired ratios on/off, and the server's own ``mtrank_rank_stage_seconds`` means
   (scraped from /metrics before it stops; a check that the "off" server observed nothing). The
   prediction log (join store) is written in both: it is the feedback feature, not observability.

Usage (from the repository root; OPENBLAS_CORETYPE slows numpy on the benchmark machine, so unset it)::

    env -u OPENBLAS_CORETYPE python benchmarks/observe_bench.py            # full run (~6.5 min), updates the docs
    env -u OPENBLAS_CORETYPE python benchmarks/observe_bench.py --quick    # smoke run (< 1 min), prints only

Writes raw results to ``--out-json`` and (full runs, or ``--write-docs``) replaces the section between
``<!-- observe-bench:start -->`` and ``<!-- observe-bench:end -->`` in ``--docs`` (appended when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serve_bench import (
    BODY_POOL,
    ROOT,
    SEED,
    Server,
    ServerConfig,
    benchmark_parser,
    ensure_bundle,
    log,
    machine_note,
    median,
    ms,
    publish,
    quantile,
    request_bodies,
    run_http_config,
    service_gc,
    summarise_http,
    working_dir,
)

START, END = "<!-- observe-bench:start -->", "<!-- observe-bench:end -->"
SECTION_TITLE = "## Serving: the cost of observability on /rank"
SIZES = (100, 500, 1000)
HEADLINE = 500  # candidates of the HTTP run and of the target
TARGET = 0.05  # observability's share of the request time
ARCHS: dict[str, tuple[str, ...]] = {
    "mmoe": (),  # the demo config as it is
    "ple": ("model.arch=ple", "model.levels=2", "model.n_shared_experts=2", "model.n_task_experts=1"),
}
REPS = {100: 800, 500: 400, 1000: 200}  # (a)/(b) pairs per size, full run
ENTROPY_REPS = {100: 300, 500: 150, 1000: 80}  # requests per entropy variant
VARIANTS = ("entropy", "observe_many", "loop", "mean")  # entropy-histogram variants (see the docstring)
PARTS = ("all", "gates", "calibration", "score_bins")  # ModelStats.observe, whole and by its three parts
FLUSH_EVERY = 100  # the "on" path flushes the kept requests into the counters once per this many requests; the
# flush time divided by the requests is added to every "on" request (amortised): the service flushes every
# monitoring.flush_interval_s (1 s when this was written, i.e. once per ~100 requests at 100 req/s; 0.25 s now)
ENTROPY_BATCHES = 4  # batches of FLUSH_EVERY requests the entropy variants run on (the Python loop on one)
MONITOR_EVALS = 21  # Monitor.evaluate calls timed per bundle (the first one dropped)
ONE_THREAD = {"MTRANK_ONNX__INTRA_OP_THREADS": "1"}
ON = ServerConfig("on", "observability on (defaults)", 1, dict(ONE_THREAD))
OFF = ServerConfig("off", "observability off", 1, {**ONE_THREAD, "MTRANK_MONITORING__ENABLED": "false",
                                                   "MTRANK_ONNX__FETCH_GATES": "false"})


def _clock(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": median(values), "p99": quantile(values, 0.99), "count": len(values)}


# ------------------------------------------------------------------------------------ in-process


def measure_bundle(bundle_dir: Path, bodies: dict[int, list[bytes]], reps: dict[int, int],
                   entropy_reps: dict[int, int]) -> dict[str, Any]:
    """(a) rank without gates vs (b) rank with gates + observe, then the entropy variants, on one bundle."""
    import numpy as np
    import pydantic_core
    from prometheus_client import CollectorRegistry, Histogram

    from mtrank.metrics import normalised_entropy
    from service.feature_store import StoreResult
    from service.feedback.memory import MemoryJoinStore
    from service.metrics import ENTROPY_BUCKETS, Metrics, observe_many
    from service.monitor import Monitor
    from service.observe import Observability, gate_labels
    from service.rank_response import response_items
    from service.schemas import RankRequest
    from service.scorer import Model, RankInput, rank
    from service.settings import FeedbackSettings, FusionSettings, OnnxSettings, Settings

    settings = Settings()
    one_thread = OnnxSettings(intra_op_threads=1, inter_op_threads=1)
    off = Model.load(bundle_dir, one_thread.model_copy(update={"fetch_gates": False}), FusionSettings())
    on = Model.load(bundle_dir, one_thread.model_copy(update={"fetch_gates": True}), FusionSettings())
    metrics = Metrics()
    obs = Observability(metrics, settings, "embedded")
    obs.on_slot("primary", on)
    stats = obs.stats(on)
    assert stats is not None
    fusion_off, fusion_on = off.profiles[settings.fusion.default], on.profiles[settings.fusion.default]
    reject = settings.limits.unknown_features == "reject"
    fb = FeedbackSettings()
    joins = MemoryJoinStore(fb.prediction_ttl_s, fb.prediction_requests, fb.prediction_items, fb.max_events)
    gates = on.manifest.gates
    registry = CollectorRegistry()
    hists = {v: Histogram(f"bench_gate_entropy_{v}", "entropy variant", ["level", "task"], buckets=ENTROPY_BUCKETS,
                          registry=registry) for v in VARIANTS[1:]}
    children = {v: [h.labels(*gate_labels(g)) for g in gates] for v, h in hists.items()}
    sizes = []
    def parse(body: bytes) -> RankRequest:  # what FastAPI does with the body
        return RankRequest.model_validate(json.loads(body))

    def to_input(r: RankRequest) -> RankInput:  # as the /rank handler builds it
        return RankInput(r.user_id, r.context, [c.item_id for c in r.candidates], [c.features for c in r.candidates])

    for n in SIZES:
        pool = bodies[n][:max(reps[n], entropy_reps[n])]
        reqs = [parse(b) for b in pool]
        inps = [to_input(r) for r in reqs]
        for inp in inps:  # warm-up, and the two models must agree
            ra = rank(off, inp, StoreResult(), fusion_off, None, reject)
            rb = rank(on, inp, StoreResult(), fusion_on, None, reject)
            if not all(np.allclose(ra.scored.raw[t], rb.scored.raw[t], atol=1e-6) for t in on.task_names):
                raise AssertionError("scores differ with and without the gate outputs fetched")
            if sorted(rb.scored.gates) != sorted(g.output for g in gates) or ra.scored.gates:
                raise AssertionError("gate outputs not fetched as configured")
        a_total: list[float] = []
        b_rank: list[float] = []
        b_observe: list[float] = []
        b_total: list[float] = []
        a_inf: list[float] = []
        b_inf: list[float] = []
        handler: list[float] = []  # parse + response + prediction log (the rest of the handler's work)
        flushes: list[float] = []  # obs.flush() every FLUSH_EVERY "on" requests
        for k in range(reps[n]):
            i = k % len(inps)
            inp = inps[i]
            t_a = t_b = t_obs = 0.0
            for variant in ((0, 1) if k % 2 == 0 else (1, 0)):
                if variant == 0:
                    t0 = time.perf_counter()
                    ra = rank(off, inp, StoreResult(), fusion_off, None, reject)
                    t_a = time.perf_counter() - t0
                else:
                    t0 = time.perf_counter()
                    rb = rank(on, inp, StoreResult(), fusion_on, None, reject)
                    t1 = time.perf_counter()
                    obs.observe(on, rb.scored, n, "default", len(rb.order))
                    t2 = time.perf_counter()
                    t_b, t_obs = t2 - t0, t2 - t1
                    b_rank.append(t1 - t0)
                    if k % FLUSH_EVERY == FLUSH_EVERY - 1:
                        flushes.append(_clock(obs.flush))
            a_total.append(t_a)
            b_total.append(t_b)
            b_observe.append(t_obs)
            a_inf.append(ra.scored.timings["inference"])
            b_inf.append(rb.scored.timings["inference"])
            t0 = time.perf_counter()  # the rest of the handler, same request, once per pair
            parse(pool[i])
            pydantic_core.to_json({"request_id": f"r{k}", "model_version": on.version, "fusion": "default",
                                   "arm": "default", "degraded": False,
                                   "items": response_items(inp.item_ids, rb, on.task_names, False, True)})
            joins.put(f"{on.version}-{n}-{k}", on.version, "default", inp.item_ids, on.task_names, rb.scored.raw,
                      rb.scored.calibrated)
            handler.append(time.perf_counter() - t0)
        flushes.append(_clock(obs.flush))  # the requests since the last flush
        # observe's cost per request is a mean: observe itself, the flushes it ran inline (when the kept
        # candidates reach service.observe.MAX_PENDING_CANDIDATES) and the explicit ones, spread evenly
        amortised = (sum(b_observe) + sum(flushes)) / reps[n]
        b_total = [t + amortised for t in b_rank]
        b_observe = [amortised] * reps[n]
        pair = [b / a for a, b in zip(a_total, b_total)]
        share = [o / b for o, b in zip(b_observe, b_total)]
        request_share = [(b - a) / (rest + b) for a, b, rest in zip(a_total, b_total, handler)]

        # Entropy histogram variants as the flush runs them: per gate, the gate outputs of FLUSH_EVERY requests
        # concatenated ([N, m] float32), timed per batch and reported per request.
        scs = [on.score(inp, StoreResult(), reject) for inp in inps]
        reg_n = CollectorRegistry()  # the loop's and the check's histograms start empty for each n
        loop_h, check = (Histogram(name, "entropy variant", ["level", "task"], buckets=ENTROPY_BUCKETS, registry=reg_n)
                         for name in ("bench_gate_entropy_loop", "bench_gate_entropy_check"))
        children["loop"] = [loop_h.labels(*gate_labels(g)) for g in gates]
        batches_w = []
        for b in range(ENTROPY_BATCHES):
            batch = [scs[(b * FLUSH_EVERY + k) % len(scs)] for k in range(FLUSH_EVERY)]
            starts = np.cumsum([0] + [n] * (FLUSH_EVERY - 1))  # request boundaries in the batch
            batches_w.append(([np.concatenate([sc.gates[g.output] for sc in batch]) for g in gates], starts))

        def run_variant(variant: str, ws: list[Any], starts: np.ndarray, n: int = n) -> float:
            t0 = time.perf_counter()
            for w, child in zip(ws, children.get(variant, [None] * len(ws))):
                e = normalised_entropy(w)
                if variant == "observe_many":
                    observe_many(child, e)
                elif variant == "loop":
                    for v in e.tolist():
                        child.observe(v)
                elif variant == "mean":
                    for v in (np.add.reduceat(e, starts) / n).tolist():
                        child.observe(v)
            return (time.perf_counter() - t0) / FLUSH_EVERY

        ent: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for k, (ws, starts) in enumerate(batches_w):
            for j in range(len(VARIANTS)):  # the order rotates batch by batch; the loop only once (it is slow)
                variant = VARIANTS[(j + k) % len(VARIANTS)]
                if variant != "loop" or not ent["loop"]:
                    ent[variant].append(run_variant(variant, ws, starts))
        for w, g, b_child in zip(batches_w[0][0], gates, children["loop"]):  # per candidate == observe() each
            a_child = check.labels(*gate_labels(g))
            observe_many(a_child, normalised_entropy(w))
            a_counts = [b.get() for b in a_child._buckets]
            b_counts = [b.get() for b in b_child._buckets]
            if a_counts != b_counts or not np.isclose(a_child._sum.get(), b_child._sum.get(), rtol=1e-6):
                raise AssertionError(f"observe_many and per-candidate observe disagree: {a_counts} vs {b_counts}")

        # Where a flush spends its time: a batch of FLUSH_EVERY scored requests counted by each part (the gate
        # groups; the calibration buckets; the score bins) and by the whole ModelStats.flush, per request.
        split: dict[str, list[float]] = {p: [] for p in PARTS}
        batches = [[scs[(b * FLUSH_EVERY + k) % len(scs)] for k in range(FLUSH_EVERY)] for b in range(5)]
        for batch in batches:
            for p in PARTS:
                t0 = time.perf_counter()
                if p == "all":
                    for sc in batch:
                        stats.observe(sc, n)
                    stats.flush()
                elif p == "gates":
                    for gate in stats.gates:
                        gate.flush([sc.gates for sc in batch])
                else:
                    for binned in stats.binned:  # calibration buckets carry sums, score bins do not
                        if (binned.sums is not None) == (p == "calibration"):
                            binned.flush(batch)
                split[p].append((time.perf_counter() - t0) / FLUSH_EVERY)

        res = {"n": n, "reps": reps[n], "off": _stat(a_total), "on": _stat(b_total), "on_rank": _stat(b_rank),
               "observe": _stat(b_observe), "off_inference": _stat(a_inf), "on_inference": _stat(b_inf),
               "paired_ratio": median(pair), "observe_share": median(share), "handler_rest": _stat(handler),
               "request_share": median(request_share),
               "entropy_reps": entropy_reps[n], "entropy": {v: _stat(x) for v, x in ent.items()},
               "parts": {p: _stat(x) for p, x in split.items()}}
        sizes.append(res)
        log(f"  {on.manifest.arch} n={n}: off {ms(res['off']['median'])} ms, on {ms(res['on']['median'])} ms "
            f"(observe {ms(res['observe']['median'])} ms), on/off {res['paired_ratio']:.3f}; entropy loop "
            f"{ms(res['entropy']['loop']['median'])} vs observe_many {ms(res['entropy']['observe_many']['median'])} ms")
    # The monitor thread's periodic work (every monitoring.interval_s), over the counters filled above.
    monitor = Monitor(metrics, settings.monitoring, lambda: on)
    monitor.on_slot("primary", on)
    evals = [_clock(monitor.evaluate) for _ in range(MONITOR_EVALS)]
    return {"arch": on.manifest.arch, "version": on.version, "gates": len(gates),
            "monitor_evaluate": _stat(evals[1:]), "monitor_interval_s": settings.monitoring.interval_s,
            "experts": [len(g.experts) for g in gates],
            "calibration_tasks": sum(len(b.tasks) for b in stats.binned if b.sums is not None),
            "calibration_buckets": len(stats.edges) - 1,
            "score_bins": [len(b.edges) - 1 for b in stats.binned if b.sums is None for _ in b.tasks],
            "sizes": sizes}


def inprocess_main(argv: list[str]) -> int:
    """Child process: every bundle, one Prometheus mode (chosen by the environment it was started with)."""
    ap = argparse.ArgumentParser(prog="observe_bench.py _inproc")
    ap.add_argument("--bundle", action="append", required=True, help="ARCH=DIR (repeatable)")
    ap.add_argument("--bodies", required=True, help="directory of bodies-N.jsonl")
    ap.add_argument("--scale", type=int, default=1, help="divide the repetitions by this")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from prometheus_client import values

    bodies = {n: [b for b in (Path(args.bodies) / f"bodies-{n}.jsonl").read_bytes().split(b"\n") if b] for n in SIZES}
    reps = {n: max(10, r // args.scale) for n, r in REPS.items()}
    entropy_reps = {n: max(5, r // args.scale) for n, r in ENTROPY_REPS.items()}
    out: dict[str, Any] = {"value_class": values.ValueClass.__name__,
                           "multiproc_dir": os.environ.get("PROMETHEUS_MULTIPROC_DIR"), "bundles": {}}
    with service_gc():
        for spec in args.bundle:
            arch, path = spec.split("=", 1)
            out["bundles"][arch] = measure_bundle(Path(path), bodies, reps, entropy_reps)
    Path(args.out).write_text(json.dumps(out))
    return 0


def run_inprocess(bundles: dict[str, Path], bodies_dir: Path, scale: int, workdir: Path) -> dict[str, Any]:
    """Both Prometheus modes, a child process each (the value class is chosen when prometheus_client is imported)."""
    results = {}
    for mode in ("single", "multiprocess"):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MTRANK_") and k.lower() != "prometheus_multiproc_dir"}
        mp = tempfile.TemporaryDirectory(prefix="observe-bench-prom-", dir=workdir) if mode == "multiprocess" else None
        if mp is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = mp.name
        out = workdir / f"inproc-{mode}.json"
        log(f"in-process, prometheus-client {mode} mode")
        cmd = [sys.executable, __file__, "_inproc", "--bodies", str(bodies_dir), "--scale", str(scale), "--out", str(out),
               *(f"--bundle={arch}={path}" for arch, path in bundles.items())]
        try:
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        finally:
            if mp is not None:
                mp.cleanup()
        results[mode] = json.loads(out.read_text())
    return results


# ------------------------------------------------------------------------------------------ HTTP


STAGE_LINE = re.compile(r'^mtrank_rank_stage_seconds_(sum|count)\{stage="(\w+)"\} (\S+)$')
ENTROPY_COUNT = re.compile(r"^mtrank_gate_entropy_count\{.*\} (\S+)$")


def scrape(server: Server) -> dict[str, Any]:
    """The server's own per-stage means (all requests it served) and how many gate entropies it observed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    entropy = 0.0
    for line in text.splitlines():
        if m := STAGE_LINE.match(line):
            (sums if m.group(1) == "sum" else counts)[m.group(2)] = float(m.group(3))
        elif m := ENTROPY_COUNT.match(line):
            entropy += float(m.group(1))
    return {"stage_mean_s": {s: sums[s] / counts[s] for s in sums if counts.get(s)},
            "stage_requests": max(counts.values(), default=0.0), "gate_entropy_observations": entropy}


def run_http(bundles: Path, bodies: list[bytes], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bodies_path = workdir / f"bodies-http-{HEADLINE}.jsonl"
    bodies_path.write_bytes(b"\n".join(bodies) + b"\n")
    runs = []
    for r in range(args.rounds):
        for cfg in ((ON, OFF) if r % 2 == 0 else (OFF, ON)):
            res = run_http_config(cfg, bundles, bodies_path, args, workdir, r, expect_items=HEADLINE, before_stop=scrape)
            if res["errors"] or res["exceptions"]:
                raise RuntimeError(f"{cfg.key} round {r}: {res['errors']} errors, {res['exceptions']} exceptions")
            observed = res["gate_entropy_observations"]
            if (cfg is ON) != (observed > 0):
                raise RuntimeError(f"{cfg.key} round {r}: {observed:g} gate entropies observed")
            lat = res["latencies"]
            res.update(rps=res["requests"] / res["elapsed_s"], p50=quantile(lat, 0.5), p99=quantile(lat, 0.99),
                       server_cpu_ms_per_req=1e3 * sum(res["server_cpu_s"].values()) / max(res["requests"], 1))
            runs.append(res)
    summary = summarise_http(runs, (ON, OFF))
    paired = {}
    for key in ("rps", "p50", "p99", "server_cpu_ms_per_req"):
        ratios = []
        for r in range(args.rounds):
            on, off = (next(x for x in runs if x["round"] == r and x["config"] == c) for c in ("on", "off"))
            ratios.append(on[key] / off[key])
        paired[key] = {"median": median(ratios), "rounds": ratios}
    for cfg in (ON, OFF):
        mine = [x for x in runs if x["config"] == cfg.key]
        stages = {s for x in mine for s in x["stage_mean_s"]}
        summary[cfg.key]["stage_mean_s"] = {s: median([x["stage_mean_s"].get(s, 0.0) for x in mine])
                                            for s in sorted(stages)}
    for x in runs:
        x.pop("latencies")  # keep the raw JSON small
    return {"summary": summary, "paired": paired, "runs": runs}


# ------------------------------------------------------------------------------------------- report


def _share(ratio: float) -> float:
    """Share of the 'on' time that the 'off' variant does not spend: 1 - off/on."""
    return 1.0 - 1.0 / ratio


def _monitor_per_request(inproc: dict[str, Any] | None, rps: float) -> float | None:
    """ms of monitor work per request at ``rps`` (MMoE bundle, single process), or None without in-process results."""
    if inproc is None or not rps:
        return None
    b = inproc["single"]["bundles"]["mmoe"]
    return 1e3 * b["monitor_evaluate"]["median"] / (b["monitor_interval_s"] * rps)


def _holds(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def _us(size: dict[str, Any], part: str) -> str:
    return f"{size['parts'][part]['median'] * 1e6:.0f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(meta: dict[str, Any], inproc: dict[str, Any] | None, http: dict[str, Any] | None) -> str:
    m = meta["machine"]
    lines = [START, SECTION_TITLE, "",
             f"Measured {meta['date']} with (runtime {meta['runtime_s'] / 60:.1f} min"
             + (f", bundle builds {meta['build_s']:.0f} s included" if meta["build_s"]
                else ", bundles reused from --workdir")
             + "):", "", "```bash", meta["command"], "```", "",
             f"Machine: {m['cpu']}, **{m['cores']} shared, noisy cores** (load average at start "
             f"{m['loadavg_start'][0]:.2f}); Python {m['python']}, numpy {m['numpy']}, onnxruntime {m['onnxruntime']}, "
             f"prometheus-client {meta['prometheus_client']}. Medians throughout; on and off run interleaved in the same "
             "run on the same bundle and requests, so read the ratios rather than the absolute times.", "",
             "Bundles: the demo config (`model.synthetic.DEMO_CONFIG`: MMoE, 4 experts, tasks ctr, like, ctcvr, "
             "watch_time) and the same config with `model.arch=ple model.levels=2 model.n_shared_experts=2 "
             f"model.n_task_experts=1`, each trained {meta['epochs']} epoch(s) on `model.synthetic.write(path, 50_000, "
             "seed=0)` and exported (" + ", ".join(
                 f"{a}: `{b['version']}`, {b['gates']} gates" for a, b in meta["bundles"].items()) + "). Requests: "
             "`serve_bench.request_bodies` (user/context from synthetic impressions, candidates' features in the "
             "request, default fusion profile, all candidates returned).", ""]
    verdicts: list[str] = []
    if inproc is not None:
        single = inproc["single"]["bundles"]
        lines += ["### In-process: `rank()` with and without observability", "",
                  "One process, onnxruntime 1 intra-op / 1 inter-op thread, the service's GC tuning. **off** = "
                  "`rank()` with the model loaded with `onnx.fetch_gates=False`; **on** = `rank()` with the gate "
                  "outputs fetched + `Observability.observe(...)` (what the /rank handler adds with monitoring on; "
                  "`Observability(Metrics(), Settings(), \"embedded\")` primed with `on_slot(\"primary\", model)`). "
                  "The two alternate request by request. on/off = median of the per-request ratios; observe share = "
                  "median of observe / on; gate fetch = on − off inference stage (the extra ONNX outputs). After each "
                  "pair, the rest of the handler's work on the same request is timed (`json.loads` + `RankRequest` "
                  "validation, `response_items` + `pydantic_core.to_json`, the prediction log `JoinStore.put`): "
                  "share of handler = median of (on − off) / (rest + on), the in-process estimate of the share of the "
                  "request (HTTP and uvicorn not included). Times in ms.", ""]
        for mode, title in (("single", "single process (the default, `--workers 1`)"),
                            ("multiprocess", "multiprocess mode (`PROMETHEUS_MULTIPROC_DIR` set: mmap'ed values, "
                             "as with `--workers N`)")):
            bundles = inproc[mode]["bundles"]
            lines += [f"prometheus-client {title}, value class `{inproc[mode]['value_class']}`:", "",
                      "| arch | gates | candidates | pairs | off p50 | on p50 | observe (mean, flushes included) | gate fetch p50 | on / off | observe share of on | on p99 / off p99 | rest of handler p50 | share of handler |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for arch, b in bundles.items():
                for s in b["sizes"]:
                    fetch = s["on_inference"]["median"] - s["off_inference"]["median"]
                    lines.append(f"| {arch} | {b['gates']} | {s['n']} | {s['reps']} | {ms(s['off']['median'])} | "
                                 f"{ms(s['on']['median'])} | {ms(s['observe']['median'])} | {fetch * 1e3:.3f} | "
                                 f"**{s['paired_ratio']:.3f}** | {_pct(s['observe_share'])} | "
                                 f"{s['on']['p99'] / s['off']['p99']:.3f} | {ms(s['handler_rest']['median'])} | "
                                 f"**{_pct(s['request_share'])}** |")
            lines.append("")
        lines += [f"Where the work goes: `ModelStats.flush` of a batch of {FLUSH_EVERY} scored requests (what the "
                  "flush thread does every second), whole and by part (gates: weights, top-1, candidates, entropy "
                  "histogram; calibration buckets per binary task; score bins per task with a reference histogram), "
                  "median of 5 batches, µs per request (`observe` itself only keeps a reference to the arrays).", "",
                  "| mode | arch | gates | calibration tasks × buckets | score-bin tasks × bins | candidates | whole | gates | calibration | score bins |",
                  "|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
        for mode in ("single", "multiprocess"):
            for arch, b in inproc[mode]["bundles"].items():
                for s in b["sizes"]:
                    pt = {p: s["parts"][p]["median"] * 1e6 for p in PARTS}
                    bins = b["score_bins"]
                    lines.append(f"| {mode} | {arch} | {b['gates']} | {b['calibration_tasks']} × "
                                 f"{b['calibration_buckets']} | {len(bins)} × {max(bins, default=0)} | {s['n']} | "
                                 f"{pt['all']:.0f} | {pt['gates']:.0f} | "
                                 f"{pt['calibration']:.0f} | {pt['score_bins']:.0f} |")
        lines += ["", "The monitor thread's periodic work (`Monitor.evaluate` every `monitoring.interval_s` = "
                  f"{single['mmoe']['monitor_interval_s']:g} s: reads the counters back, window statistics, gauges), "
                  "timed after the runs above in the same process, median of "
                  f"{MONITOR_EVALS - 1}: " + "; ".join(
                      f"{mode} {arch} {ms(b['monitor_evaluate']['median'])} ms" for mode in ("single", "multiprocess")
                      for arch, b in inproc[mode]["bundles"].items()) + " per evaluation.", ""]
        lines += ["### `mtrank_gate_entropy`: per candidate vs per request", "",
                  f"As the flush runs it: per gate, the outputs of {FLUSH_EVERY} requests concatenated ([N, m] float32), "
                  "variants rotating batch by batch, µs per request (all gates): **entropy only** = "
                  "`normalised_entropy(w)`; **observe_many** (per candidate, as shipped) = entropy + "
                  "`service.metrics.observe_many` (one bucket count per bucket; the same counts as one `observe` per "
                  "candidate: checked); **loop** = entropy + one `Histogram.observe` per candidate (one batch); "
                  "**mean** = entropy + one `observe` of each request's mean. The last two columns are the "
                  "histogram's cost over entropy only.", "",
                  "| mode | arch | candidates | entropy only | observe_many | loop | mean | loop / observe_many | observe_many − mean |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for mode in ("single", "multiprocess"):
            for arch, b in inproc[mode]["bundles"].items():
                for s in b["sizes"]:
                    e = {v: s["entropy"][v]["median"] * 1e6 for v in VARIANTS}
                    lines.append(f"| {mode} | {arch} | {s['n']} | {e['entropy']:.1f} | {e['observe_many']:.1f} | "
                                 f"{e['loop']:.1f} | {e['mean']:.1f} | {e['loop'] / e['observe_many']:.1f}× | "
                                 f"{e['observe_many'] - e['mean']:.1f} |")
        lines.append("")
        head = {arch: next(s for s in b["sizes"] if s["n"] == HEADLINE) for arch, b in single.items()}
        mp_head = {arch: next(s for s in b["sizes"] if s["n"] == HEADLINE)
                   for arch, b in inproc["multiprocess"]["bundles"].items()}
        everything = [*head.values(), *mp_head.values()]
        worst_rank = max(_share(s["paired_ratio"]) for s in everything)
        worst_handler = max(s["request_share"] for s in everything)
        verdicts.append(
            f"- **Observability's cost at {HEADLINE} candidates, in-process, as a share of `rank()` + observe** "
            "(1 − off/on, on/off the median per-request ratio): "
            + "; ".join(f"{a} {_pct(_share(s['paired_ratio']))} (on/off {s['paired_ratio']:.3f}; observe alone "
                        f"{ms(s['observe']['median'])} ms = {_pct(s['observe_share'])} of on)" for a, s in head.items())
            + "; multiprocess mode " + "; ".join(f"{a} {_pct(_share(s['paired_ratio']))}" for a, s in mp_head.items())
            + ". **As a share of the handler's work** (parse + rank + observe + response + prediction log): "
            + "; ".join(f"{a} {_pct(s['request_share'])}" for a, s in head.items())
            + "; multiprocess mode " + "; ".join(f"{a} {_pct(s['request_share'])}" for a, s in mp_head.items())
            + f". Target < {_pct(TARGET)} of request time: **{_holds(worst_handler < TARGET)}** against the handler's "
            f"work (worst {_pct(worst_handler)}), **{_holds(worst_rank < TARGET)}** against `rank()` alone (worst "
            f"{_pct(worst_rank)}).")
        verdicts.append(
            f"- **Where it goes** ({HEADLINE} candidates, single process): `ModelStats.flush` per request "
            + "; ".join(f"{a} {_us(s, 'all')} µs, of which the gates {_us(s, 'gates')} µs ({single[a]['gates']} "
                        f"gates), calibration buckets {_us(s, 'calibration')} µs, score bins {_us(s, 'score_bins')} µs"
                        for a, s in head.items())
            + ". Fetching the gate outputs from the ONNX run costs nothing measurable (the gate fetch column). "
              "The flush runs a few numpy passes per gate and per group of tasks over every request kept since the "
              "last flush, and one counter `inc` per (gate, expert) and non-empty bucket per flush, not per "
              "request: its cost grows with candidates and gates, not with the number of requests' Python calls.")
        ent = {a: {v: s["entropy"][v]["median"] * 1e6 for v in VARIANTS} for a, s in head.items()}
        verdicts.append(
            f"- **Entropy histogram: per candidate.** At {HEADLINE} candidates (single process, in the flush), one "
            "observation per candidate costs "
            + "; ".join(f"{a} {e['observe_many'] - e['entropy']:.1f} µs per request over computing the entropies "
                        f"(a per-request mean: {e['mean'] - e['entropy']:.1f} µs; a per-candidate Python loop: "
                        f"{e['loop'] - e['entropy']:.0f} µs)" for a, e in ent.items())
            + ", i.e. "
            + ", ".join(f"{a} {_pct((e['observe_many'] - e['mean']) * 1e-6 / head[a]['on']['median'])}"
                        for a, e in ent.items())
            + " of `rank()` more than a per-request mean: the histogram keeps the distribution over candidates.")
    if http is not None:
        hs, pr = http["summary"], http["paired"]
        h = meta["http"]
        lines += ["### HTTP: /rank with observability on vs off", "",
                  f"`mtrank serve --bundles DIR --port P` (demo MMoE bundle, 1 worker, `MTRANK_ONNX__INTRA_OP_THREADS=1`, "
                  "defaults otherwise: embedded feature store, in-memory prediction log, written in both) as a "
                  "subprocess; serve_bench's load generator (a separate process on the same 2 cores) keeps "
                  f"**{h['concurrency']} keep-alive connections** busy with `POST /rank`, {HEADLINE} candidates: "
                  f"{h['warmup']:g} s warm-up, then {h['duration']:g} s measured, {h['rounds']} round(s), the order "
                  "alternating (on, off; off, on; ...). Latency percentiles pooled over rounds; req/s = median round; "
                  "ratios = median over rounds of on/off in the same round. Stage means are the server's own "
                  "`mtrank_rank_stage_seconds` sum / count (all requests it served, warm-up included).", "",
                  "| config | server env | req/s | p50 ms | p99 ms | requests | server CPU ms/req | features | inference | observe | log |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for cfg in (ON, OFF):
            s = hs[cfg.key]
            env = " ".join(f"`{k}={v}`" for k, v in s["env"].items())
            st = s["stage_mean_s"]
            stages = " | ".join(ms(st.get(k, float("nan"))) for k in ("features", "inference", "observe", "log"))
            lines.append(f"| {cfg.label} | {env} | {s['rps']:.1f} | {ms(s['p50'])} | {ms(s['p99'])} | {s['requests']} | "
                         f"{s['server_cpu_ms_per_req']:.2f} | {stages} |")
        lines += ["", "| on / off (median of paired rounds) | value | per round |", "|---|---:|---|"]
        for key, label in (("rps", "req/s"), ("p50", "p50"), ("p99", "p99"),
                           ("server_cpu_ms_per_req", "server CPU per request")):
            lines.append(f"| {label} | **{pr[key]['median']:.3f}** | "
                         + ", ".join(f"{x:.3f}" for x in pr[key]["rounds"]) + " |")
        lines.append("")
        on, off = hs["on"]["stage_mean_s"], hs["off"]["stage_mean_s"]
        cpu, rps = pr["server_cpu_ms_per_req"], pr["rps"]
        verdicts.append(
            f"- **Over HTTP** ({HEADLINE} candidates, 1 worker, medians of {h['rounds']} paired rounds): server CPU per "
            f"request on/off **{cpu['median']:.3f}** (observability = {_pct(_share(cpu['median']))} of the server's CPU "
            f"per request; per round {min(cpu['rounds']):.3f} to {max(cpu['rounds']):.3f}), req/s on/off "
            f"**{rps['median']:.3f}** ({min(rps['rounds']):.3f} to {max(rps['rounds']):.3f}), p50 "
            f"{pr['p50']['median']:.3f}, "
            f"p99 {pr['p99']['median']:.3f}. Target < {_pct(TARGET)}: **"
            + _holds(_share(cpu["median"]) < TARGET and 1 - rps["median"] < TARGET)
            + f"** (CPU per request and req/s). Server CPU per request on − off = "
            f"{hs['on']['server_cpu_ms_per_req'] - hs['off']['server_cpu_ms_per_req']:.2f} ms"
            + ("" if (mon := _monitor_per_request(inproc, hs["on"]["rps"])) is None else
               f"; the monitor thread accounts for ~{mon:.3f} ms per request (one in-process `Monitor.evaluate` "
               "spread over the requests of one interval)")
            + ". The server's stage means are wall time in the inference thread, "
            "which also waits for the GIL while the event loop parses and serialises other requests, so they run "
            f"above the in-process times: observe {ms(on.get('observe', 0.0))} ms on vs {ms(off.get('observe', 0.0))} ms "
            f"off, inference {ms(on.get('inference', 0.0))} vs {ms(off.get('inference', 0.0))} ms, features "
            f"{ms(on.get('features', 0.0))} vs {ms(off.get('features', 0.0))} ms.")
    lines += ["### Findings", "", *verdicts, "", f"Raw results: `{meta['out_json']}` (JSON, not committed).", "", END]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = benchmark_parser(__doc__, "/tmp/observe_bench.json", "HTTP rounds, on and off alternating (default 6; --quick 1)")
    args = ap.parse_args(argv)
    q = args.quick
    args.duration = args.duration if args.duration is not None else (2.0 if q else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if q else 3.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if q else 6)
    args.epochs = args.epochs if args.epochs is not None else (1 if q else 2)
    if args.concurrency < 1 or args.rounds < 1 or args.duration <= 0 or args.max_requests < 1:
        ap.error("--concurrency, --rounds, --max-requests must be >= 1 and --duration > 0")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_inproc"]:
        return inprocess_main(argv[1:])
    args = parse_args(argv)
    t_start = time.perf_counter()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = machine_note()
    with working_dir(args.workdir, "observe-bench-") as workdir:
        with ThreadPoolExecutor(len(ARCHS)) as pool:  # two 1-thread trainings, one per core
            built = dict(zip(ARCHS, pool.map(lambda a: ensure_bundle(workdir / a, args.epochs, ARCHS[a]), ARCHS)))
        bundles = {a: d for a, (d, _) in built.items()}
        build_s = max((s for _, s in built.values() if s is not None), default=None)
        data = workdir / "mmoe" / "synthetic.parquet"
        if not data.exists():
            from model.synthetic import write  # a reused bundle dir without its data (numpy + pandas only)

            write(data, 50_000, seed=SEED)
        bodies = {n: request_bodies(data, n, BODY_POOL, SEED) for n in SIZES}
        bodies_dir = workdir / "bodies"
        bodies_dir.mkdir(exist_ok=True)
        for n, bs in bodies.items():
            (bodies_dir / f"bodies-{n}.jsonl").write_bytes(b"\n".join(bs) + b"\n")
        from importlib.metadata import version

        meta: dict[str, Any] = {
            "date": date, "machine": machine, "epochs": args.epochs, "build_s": build_s,
            "prometheus_client": version("prometheus-client"),
            "command": shlex.join(["env", "-u", "OPENBLAS_CORETYPE", "python", "benchmarks/observe_bench.py", *argv]),
            "bundles": {}, "out_json": args.out_json,
            "http": {"concurrency": args.concurrency, "duration": args.duration, "warmup": args.warmup,
                     "rounds": args.rounds, "max_requests": args.max_requests},
        }
        for a, d in bundles.items():
            manifest = json.loads((d / "manifest.json").read_text())
            meta["bundles"][a] = {"version": manifest["model_version"], "arch": manifest["arch"],
                                  "gates": len(manifest["gates"])}
        inproc = None if args.skip_inprocess else run_inprocess(bundles, bodies_dir, 20 if args.quick else 1, workdir)
        http = None
        if not args.skip_http:
            log(f"HTTP: on/off x {args.rounds} round(s), {args.warmup:g} s + {args.duration:g} s each, "
                f"{HEADLINE} candidates")
            http = run_http(bundles["mmoe"].parent, bodies[HEADLINE], args, workdir)
        meta["runtime_s"] = time.perf_counter() - t_start
        publish(args, render(meta, inproc, http), {"meta": meta, "inprocess": inproc, "http": http}, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
