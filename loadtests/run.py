"""Headless load tests: the stack (``service.stack``) under locust, steady and with reloads under load.

For each feature-store variant (``embedded``, ``redis``) this starts ``mtrank stack`` with two replicas
(one uvicorn worker and one ONNX thread each) on loopback, then runs ``loadtests/locustfile.py``
headless, bounded in time, twice at the same paced load:

1. **steady**: /rank with the candidate mix (50/200/500/1000, weights 4/3/2/1) and feedback;
2. **reload**: the same, while a publisher writes a new bundle version every ``--reload-every`` seconds
   (a copy of the served bundle under a new version name), points ``CURRENT`` at it and publishes it on
   the Redis reload channel, so both replicas swap while traffic flows.

Checks (the issue's acceptance criteria), all reported and turned into the exit code:

* zero failed requests in every scenario (locust's own failure count: status != 200 or a wrong number
  of items);
* every response carries a version that was active when it was served: published before the response
  ended, and not retired (superseded) more than ``--swap-lag`` seconds before the request started;
* /rank p99 during reloads within 2x the steady p99 (client-side, from every response's timing);
* memory (RSS) of each replica after the last reload within 10 % of its RSS after the first one
  (with ``--reloads 50``: no session or bundle leaks across 50 reloads).

Reports throughput, p50/p95/p99 per candidate class, errors, model versions seen per second, and the
CPU and RSS of every service process (psutil, sampled every 0.5 s), as JSON (``--out``) and markdown;
a full run replaces the ``loadtest`` section of docs/benchmarks.md.

Usage (from the repository root)::

    env -u OPENBLAS_CORETYPE python loadtests/run.py              # full: 2 variants, 50 reloads (~12 min)
    python loadtests/run.py --quick                               # smoke: < 1 min, prints only

Only loopback addresses are used; every process the run starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_bench import machine_note, publish, quantile  # noqa: E402
from mtrank.bundle import MANIFEST, read_current, write_current  # noqa: E402
from service.stack import Stack, StackConfig  # noqa: E402

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
START, END = "<!-- loadtest:start -->", "<!-- loadtest:end -->"


def log(msg: str) -> None:
    print(f"[loadtest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- bundle


def ensure_bundle(workdir: Path, rows: int) -> tuple[Path, Path]:
    """(bundles dir, synthetic data) from ``mtrank demo --no-serve`` in ``workdir`` (a child process: torch)."""
    bundles, data = workdir / "bundles", workdir / "demo.parquet"
    if read_current(bundles) is None:
        log(f"training the demo bundle ({rows} rows) in {workdir}")
        subprocess.run([sys.executable, "-m", "mtrank.cli", "demo", "--no-serve", "--workdir", str(workdir), "--rows",
                        str(rows), "--set", "train.epochs=1", "--set", "train.threads=1"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return bundles, data


def publish_copy(bundles: Path, source: str, version: str) -> None:
    """A copy of bundle ``source`` under ``version`` (same model; manifest renamed), made atomically."""
    tmp = bundles / f".{version}.tmp"
    shutil.copytree(bundles / source, tmp)
    manifest = json.loads((tmp / MANIFEST).read_text())
    manifest["model_version"] = version
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    os.rename(tmp, bundles / version)


# -------------------------------------------------------------------------------- measurement


class Sampler(threading.Thread):
    """CPU % and RSS of each named process (and its children) every ``interval`` seconds."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float, float]]] = {n: [] for n in pids}  # (t, cpu %, rss MiB)
        self._halt = threading.Event()

    def _tree(self, p: Any) -> list[Any]:
        try:
            return [p, *p.children(recursive=True)]
        except Exception:  # noqa: BLE001 - a process gone between samples
            return [p]

    def rss(self, name: str) -> float:
        return sum(q.memory_info().rss for q in self._tree(self.procs[name])) / 2**20

    def run(self) -> None:
        last = {n: sum(sum(q.cpu_times()[:2]) for q in self._tree(p)) for n, p in self.procs.items()}
        t_last = time.monotonic()
        while not self._halt.wait(self.interval):
            now = time.monotonic()
            for name, p in self.procs.items():
                try:
                    cpu = sum(sum(q.cpu_times()[:2]) for q in self._tree(p))
                    self.samples[name].append((time.time(), 100 * (cpu - last[name]) / (now - t_last), self.rss(name)))
                    last[name] = cpu
                except Exception:  # noqa: BLE001
                    pass
            t_last = now

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


@dataclass(eq=False)  # a Thread must stay hashable
class Publisher(threading.Thread):
    """Publishes a new bundle version every ``every`` seconds, ``count`` times; records when and the RSS after."""

    stack: Stack
    bundles: Path
    source: str
    every: float
    count: int
    sampler: Sampler
    published: list[tuple[float, str]] = field(default_factory=list)
    rss_after: list[dict[str, float]] = field(default_factory=list)
    swap_seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True)

    def run(self) -> None:
        import httpx
        import redis

        client = redis.Redis.from_url(self.stack.redis_url)
        try:
            for k in range(self.count):
                time.sleep(self.every)
                version = f"lt-{int(time.time())}-{k:03d}"
                publish_copy(self.bundles, self.source, version)
                write_current(self.bundles, version)
                t = time.time()
                client.publish("mtrank:reload", version)
                self.published.append((t, version))
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # both replicas swapped?
                    active = [httpx.get(f"{u}/models", timeout=5).json()["active"] for u in self.stack.replica_urls]
                    if all(a == version for a in active):
                        break
                    time.sleep(0.05)
                else:
                    self.errors.append(f"{version}: not active on every replica after 30 s")
                self.swap_seconds.append(time.time() - t)
                self.rss_after.append({name: self.sampler.rss(name) for name in self.sampler.procs})
        except Exception as err:  # noqa: BLE001 - reported, fails the run
            self.errors.append(f"publisher: {type(err).__name__}: {err}")
        finally:
            client.close()


def run_locust(stack: Stack, data: Path, args: argparse.Namespace, duration: float, out: Path) -> dict[str, Any]:
    log_path = out.with_suffix(".jsonl")
    log_path.unlink(missing_ok=True)
    env = {**os.environ, "MTRANK_LT_HOSTS": ",".join(stack.replica_urls), "MTRANK_LT_DATA": str(data),
           "MTRANK_LT_RATE": str(args.rate / args.users), "MTRANK_LT_LOG": str(log_path)}
    cmd = ["locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users), "-r", str(args.users), "-t",
           f"{duration:g}s", "--host", stack.replica_urls[0], "--csv", str(out), "--only-summary", "--stop-timeout",
           "10", "--loglevel", "WARNING"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=duration + 120)
    stats = {}
    import csv

    with open(f"{out}_stats.csv") as fh:
        for row in csv.DictReader(fh):
            stats[row["Name"]] = {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                                  "rps": float(row["Requests/s"])}
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    return {"locust_exit": proc.returncode, "locust_tail": (proc.stdout + proc.stderr)[-2000:], "stats": stats,
            "records": records}


def summarise(res: dict[str, Any], duration: float) -> dict[str, Any]:
    recs = [r for r in res["records"] if r["status"] == 200]
    by_class: dict[str, Any] = {}
    for n in sorted({r["n"] for r in recs}):
        lat = [1000 * (r["end"] - r["start"]) for r in recs if r["n"] == n]
        by_class[str(n)] = {"requests": len(lat), "p50_ms": quantile(lat, 0.5), "p95_ms": quantile(lat, 0.95),
                            "p99_ms": quantile(lat, 0.99)}
    lat_all = [1000 * (r["end"] - r["start"]) for r in recs]
    total = res["stats"].get("Aggregated", {})
    return {"requests": total.get("requests", 0), "failures": total.get("failures", 0),
            "rank_rps": len(recs) / duration, "candidates_per_s": sum(r["n"] for r in recs) / duration,
            "feedback_requests": res["stats"].get("/feedback", {}).get("requests", 0),
            "p50_ms": quantile(lat_all, 0.5), "p95_ms": quantile(lat_all, 0.95), "p99_ms": quantile(lat_all, 0.99),
            "by_class": by_class}


def check_versions(records: list[dict[str, Any]], published: list[tuple[float, str]], initial: str,
                   lag: float) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Responses whose version was not active when served; and versions seen per second."""
    timeline = [(0.0, initial), *published]  # (published at, version), in order
    since = {v: t for t, v in timeline}
    until = {v: timeline[k + 1][0] for k, (_, v) in enumerate(timeline[:-1])}  # superseded at
    bad = []
    per_second: dict[str, dict[str, int]] = {}
    for r in records:
        if r["status"] != 200:
            continue
        v = r["version"]
        sec = str(int(r["end"]))
        per_second.setdefault(sec, {})
        per_second[sec][v] = per_second[sec].get(v, 0) + 1
        if v not in since or since[v] > r["end"] or (v in until and until[v] + lag < r["start"]):
            bad.append(f"{r['replica']} {v} served {r['start']:.3f}..{r['end']:.3f} "
                       f"(published {since.get(v)}, superseded {until.get(v)})")
    return bad, per_second


# --------------------------------------------------------------------------------------- main


def run_variant(variant: str, bundles: Path, data: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    extra = out / "service-extra.yaml"
    extra.write_text("onnx: {intra_op_threads: 1, executor_threads: 1}\n")
    cfg = StackConfig(bundles=bundles, replicas=2, workers=1, feature_store=variant, snapshot=data, prometheus=False,
                      port=0, config=extra, workdir=out / f"stack-{variant}")
    result: dict[str, Any] = {"variant": variant}
    with Stack(cfg) as stack:
        log(f"{variant}: replicas {stack.replica_urls}")
        initial = read_current(bundles)
        assert initial is not None
        sampler = Sampler({name: pid for name, pid in stack.pids().items() if name.startswith("mtrank-")})
        sampler.start()
        try:
            t0 = time.time()
            steady = run_locust(stack, data, args, args.duration, out / f"{variant}-steady")
            steady_window = (t0, time.time())
            pub = Publisher(stack, bundles, initial, args.reload_every, args.reloads, sampler)
            reload_duration = args.reload_every * (args.reloads + 1) + 2
            t1 = time.time()
            pub.start()
            reloading = run_locust(stack, data, args, reload_duration, out / f"{variant}-reload")
            pub.join(60)
            reload_window = (t1, time.time())
        finally:
            sampler.stop()
        write_current(bundles, initial)  # the next variant starts from the same bundle
    bad_steady, _ = check_versions(steady["records"], [], initial, args.swap_lag)
    bad_reload, per_second = check_versions(reloading["records"], pub.published, initial, args.swap_lag)
    result["steady"] = summarise(steady, args.duration)
    result["reload"] = summarise(reloading, reload_duration)
    result["reload"].update({"reloads": len(pub.published), "swap_s_p50": quantile(pub.swap_seconds, 0.5),
                             "swap_s_max": max(pub.swap_seconds, default=float("nan")),
                             "versions_per_second_max": max((len(v) for v in per_second.values()), default=0)})
    result["versions_per_second"] = per_second
    result["bad_versions"] = (bad_steady + bad_reload)[:20]
    result["publisher_errors"] = pub.errors
    result["locust"] = {"steady_exit": steady["locust_exit"], "reload_exit": reloading["locust_exit"],
                        "tail": reloading["locust_tail"][-500:] if reloading["locust_exit"] else ""}
    procs = {}
    for name, samples in sampler.samples.items():
        def window(w: tuple[float, float], samples: list[tuple[float, float, float]] = samples) -> list[tuple[float, float, float]]:
            return [s for s in samples if w[0] <= s[0] <= w[1]]

        st, rl = window(steady_window), window(reload_window)
        procs[name] = {"cpu_pct_steady": sum(s[1] for s in st) / max(1, len(st)),
                       "cpu_pct_reload": sum(s[1] for s in rl) / max(1, len(rl)),
                       "rss_mib_steady_max": max((s[2] for s in st), default=float("nan")),
                       "rss_mib_reload_max": max((s[2] for s in rl), default=float("nan")),
                       "rss_mib_after_first_reload": pub.rss_after[0][name] if pub.rss_after else float("nan"),
                       "rss_mib_after_last_reload": pub.rss_after[-1][name] if pub.rss_after else float("nan")}
    result["processes"] = procs
    s, r = result["steady"], result["reload"]
    growth = max((p["rss_mib_after_last_reload"] / p["rss_mib_after_first_reload"] - 1 for p in procs.values()),
                 default=float("nan"))
    result["checks"] = {
        "zero_errors": s["failures"] == 0 and r["failures"] == 0 and not pub.errors,
        "versions_active": not result["bad_versions"],
        "p99_reload_within_2x_steady": r["p99_ms"] <= 2 * s["p99_ms"],
        "rss_growth_within_10pct": growth <= 0.10,
    }
    result["rss_growth"] = growth
    return result


FAULT_START, FAULT_END = "<!-- loadtest-faults:start -->", "<!-- loadtest-faults:end -->"
FAULT_PLAN = ((8.0, "kill"), (14.0, "restart"), (22.0, "pause"), (28.0, "resume"))  # seconds into the run


def _stack_for(variant: str, bundles: Path, data: Path, out: Path) -> StackConfig:
    extra = out / "service-extra.yaml"
    extra.write_text("onnx: {intra_op_threads: 1, executor_threads: 1}\n")
    return StackConfig(bundles=bundles, replicas=2, workers=1, feature_store=variant, snapshot=data, prometheus=False,
                       port=0, config=extra, workdir=out / f"stack-{variant}")


def run_faults(bundles: Path, data: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Redis killed, restarted, paused and resumed under the paced load (Redis variant, ``FAULT_PLAN``)."""
    import httpx

    duration = 36.0
    with Stack(_stack_for("redis", bundles, data, out)) as stack:
        marks: dict[str, float] = {}

        def inject() -> None:
            t0 = time.time()
            for at, what in FAULT_PLAN:
                time.sleep(max(0.0, t0 + at - time.time()))
                {"kill": stack.kill_redis, "restart": stack.restart_redis, "pause": lambda: stack.pause_redis(True),
                 "resume": lambda: stack.pause_redis(False)}[what]()
                marks[what] = time.time()

        injector = threading.Thread(target=inject, daemon=True)
        t_start = time.time()
        injector.start()
        res = run_locust(stack, data, args, duration, out / "faults")
        injector.join(30)
        text = httpx.get(f"{stack.replica_urls[0]}/metrics", timeout=10).text
    recs = [r for r in res["records"] if r["start"] >= t_start]
    bounds = [("before", t_start), *[(w, marks[w]) for _, w in FAULT_PLAN], ("end", float("inf"))]
    phases = {}
    for (name, lo), (_, hi) in zip(bounds[:-1], bounds[1:]):
        ph = [r for r in recs if lo <= r["start"] < hi]
        lat = [1000 * (r["end"] - r["start"]) for r in ph]
        phases[name] = {"requests": len(ph), "non_200": sum(r["status"] != 200 for r in ph),
                        "degraded_share": sum(bool(r["degraded"]) for r in ph) / max(1, len(ph)),
                        "p50_ms": quantile(lat, 0.5), "p99_ms": quantile(lat, 0.99)}

    def recovery(after: str) -> float:
        t = marks[after]
        ok = [r["end"] for r in recs if r["start"] >= t and r["degraded"] is False]
        return (min(ok) - t) if ok else float("nan")

    errors = {}
    for line in text.splitlines():
        if line.startswith(("mtrank_feature_store_errors_total{", "mtrank_join_store_errors_total{")):
            head, value = line.rsplit(" ", 1)
            errors[head] = float(value)
    rank_failures = sum(v["failures"] for k, v in res["stats"].items() if k.startswith("/rank"))
    return {"phases": phases, "recovery_after_restart_s": recovery("restart"), "recovery_after_resume_s": recovery("resume"),
            "rank_failures": rank_failures, "feedback_failures": res["stats"].get("/feedback", {}).get("failures", 0),
            "errors_replica1": errors, "checks": {"zero_rank_errors": rank_failures == 0 and all(
                p["non_200"] == 0 for p in phases.values())}}


def run_soak(bundles: Path, data: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``--soak-minutes`` at half the saturation rate (measured first, closed loop) with feedback and reloads."""
    probe_args = argparse.Namespace(**{**vars(args), "rate": 0.0})
    with Stack(_stack_for("redis", bundles, data, out)) as stack:
        probe = summarise(run_locust(stack, data, probe_args, 15.0, out / "saturation"), 15.0)
        rate = 0.5 * probe["rank_rps"]
        soak_args = argparse.Namespace(**{**vars(args), "rate": rate})
        duration = 60.0 * args.soak_minutes
        initial = read_current(bundles)
        assert initial is not None
        sampler = Sampler({name: pid for name, pid in stack.pids().items() if name.startswith("mtrank-")})
        sampler.start()
        pub = Publisher(stack, bundles, initial, duration / (args.soak_reloads + 1), args.soak_reloads, sampler)
        t0 = time.time()
        pub.start()
        try:
            res = run_locust(stack, data, soak_args, duration, out / "soak")
            pub.join(60)
        finally:
            sampler.stop()
        write_current(bundles, initial)
    recs = [r for r in res["records"] if r["status"] == 200]
    first = [1000 * (r["end"] - r["start"]) for r in recs if r["start"] < t0 + 60]
    last = [1000 * (r["end"] - r["start"]) for r in recs if r["start"] >= t0 + duration - 60]
    rss = {name: (samples[min(len(samples) - 1, 120)][2], samples[-1][2]) for name, samples in sampler.samples.items()
           if samples}  # (after the first minute, at the end)
    bad, _ = check_versions(res["records"], pub.published, initial, args.swap_lag)
    total = res["stats"].get("Aggregated", {})
    return {"saturation_rps": probe["rank_rps"], "rate": rate, "minutes": args.soak_minutes,
            "reloads": len(pub.published), "requests": total.get("requests", 0), "failures": total.get("failures", 0),
            "p99_first_min_ms": quantile(first, 0.99), "p99_last_min_ms": quantile(last, 0.99),
            "rss_mib": rss, "bad_versions": bad[:20], "publisher_errors": pub.errors}


def render_faults(meta: dict[str, Any], faults: dict[str, Any] | None, soak: dict[str, Any] | None) -> str:
    lines = [FAULT_START, "", "## Redis faults under load, and a soak", "",
             f"Generated by `loadtests/run.py` on {meta['date']} ({meta['wall_min']:.1f} min wall). Reproduce:", "",
             "```bash", "env -u OPENBLAS_CORETYPE python loadtests/run.py --faults --soak", "```", ""]
    if faults is not None:
        lines += ["**Faults** (`mtrank stack`, Redis variant: feature store, reload channel and join store on one "
                  "redis-server; the steady scenario's paced load): Redis killed at 8 s, restarted (new process, same "
                  "port, snapshot pushed again) at 14 s, paused with SIGSTOP at 22 s, resumed at 28 s.", "",
                  "| phase | /rank requests | non-200 | degraded share | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for name, p in faults["phases"].items():
            lines.append(f"| {name} | {p['requests']} | {p['non_200']} | {100 * p['degraded_share']:.0f} % | "
                         f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} |")
        lines += ["", f"/rank failures: **{faults['rank_failures']}**; first non-degraded answer "
                  f"{faults['recovery_after_restart_s']:.2f} s after the restart and "
                  f"{faults['recovery_after_resume_s']:.2f} s after SIGCONT (feature-store breaker: 0.5 s). "
                  f"/feedback calls answered 503 while Redis was unusable (by design: the client retries): "
                  f"{faults['feedback_failures']}. Error counters on replica 1 afterwards: "
                  + ", ".join(f"`{k}` {v:g}" for k, v in faults["errors_replica1"].items() if v) + ".", ""]
    if soak is not None:
        lines += [f"**Soak**: saturation measured first (15 s closed loop, 8 users): {soak['saturation_rps']:.1f} /rank "
                  f"per s; then {soak['minutes']:g} min at half of it ({soak['rate']:.1f} /rank per s) with feedback "
                  f"and {soak['reloads']} reloads: {soak['requests']} requests, {soak['failures']} failed; p99 "
                  f"{soak['p99_first_min_ms']:.1f} ms in the first minute vs {soak['p99_last_min_ms']:.1f} ms in the "
                  "last; RSS (MiB) after the first minute → at the end: "
                  + ", ".join(f"{n} {a:.0f} → {b:.0f} ({100 * (b / a - 1):+.1f} %)" for n, (a, b) in soak["rss_mib"].items())
                  + f"; versions never active when served: {len(soak['bad_versions'])}.", ""]
    lines.append(FAULT_END)
    return "\n".join(lines)


def render(meta: dict[str, Any], results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [START, "", "## Load tests (locust): steady and reload under load", "",
             f"Generated by `loadtests/run.py` on {meta['date']} ({meta['wall_min']:.1f} min wall).", "",
             "Reproduce (from the repository root):", "", "```bash",
             "env -u OPENBLAS_CORETYPE python loadtests/run.py", "```", "",
             f"**Setup:** `mtrank stack` with 2 replicas × 1 uvicorn worker × 1 ONNX thread, the demo MMoE bundle, "
             f"Redis for reloads and the feedback join; locust ({args.users} users, paced to {args.rate:g} /rank per s in "
             f"total, each followed by a /feedback batch when the simulated user clicks, ~{100 * 0.02:g} % of items) "
             f"with the candidate mix 50/200/500/1000 (weights 4/3/2/1, top_k 50); steady {args.duration:g} s, then "
             f"the same load while a new bundle version is published every {args.reload_every:g} s "
             f"({args.reloads} reloads). Everything (2 replicas, Redis, locust) shares the machine's "
             f"{meta['machine']['cores']} cores ({meta['machine']['cpu']}).", "",
             "| variant | scenario | /rank req/s | candidates/s | p50 ms | p95 ms | p99 ms | failed | feedback calls |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for sc in ("steady", "reload"):
            s = res[sc]
            lines.append(f"| {res['variant']} | {sc} | {s['rank_rps']:.1f} | {s['candidates_per_s']:,.0f} | "
                         f"{s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} | {s['failures']} | "
                         f"{s['feedback_requests']} |")
    lines += ["", "p50 / p99 per candidate class (ms, client-side):", "",
              "| variant | scenario | " + " | ".join(f"{n} cands" for n in ("50", "200", "500", "1000")) + " |",
              "|---|---|---|---|---|---|"]
    for res in results:
        for sc in ("steady", "reload"):
            bc = res[sc]["by_class"]
            cells = [f"{bc[n]['p50_ms']:.1f} / {bc[n]['p99_ms']:.1f}" if n in bc else "–" for n in ("50", "200", "500", "1000")]
            lines.append(f"| {res['variant']} | {sc} | " + " | ".join(cells) + " |")
    lines += ["", "Service processes (CPU % of one core, mean; RSS MiB):", "",
              "| variant | process | CPU steady | CPU reloading | RSS steady max | RSS after 1st reload | RSS after last reload |",
              "|---|---|---|---|---|---|---|"]
    for res in results:
        for name, p in res["processes"].items():
            lines.append(f"| {res['variant']} | {name} | {p['cpu_pct_steady']:.0f} | {p['cpu_pct_reload']:.0f} | "
                         f"{p['rss_mib_steady_max']:.0f} | {p['rss_mib_after_first_reload']:.0f} | "
                         f"{p['rss_mib_after_last_reload']:.0f} |")
    lines += ["", "Acceptance:", ""]
    for res in results:
        c, r = res["checks"], res["reload"]
        lines.append(
            f"- {res['variant']}: zero errors **{'holds' if c['zero_errors'] else 'FAILS'}**; every response's version "
            f"active when served **{'holds' if c['versions_active'] else 'FAILS'}** ({r['reloads']} reloads, both "
            f"replicas swapped in {r['swap_s_p50']:.2f} s median, {r['swap_s_max']:.2f} s max; at most "
            f"{r['versions_per_second_max']} versions seen in one second); p99 while reloading "
            f"{r['p99_ms']:.1f} ms vs steady {res['steady']['p99_ms']:.1f} ms "
            f"(≤ 2×: **{'holds' if c['p99_reload_within_2x_steady'] else 'FAILS'}**); RSS growth from the first to the "
            f"last reload {100 * res['rss_growth']:+.1f} % (≤ 10 %: **{'holds' if c['rss_growth_within_10pct'] else 'FAILS'}**).")
    lines += ["", END]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: embedded only, short, few reloads; prints only")
    ap.add_argument("--variants", default=None, help="comma-separated: embedded,redis (default both; --quick embedded)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rate", type=float, default=None, help="total /rank per second (default 20; --quick 10)")
    ap.add_argument("--duration", type=float, default=None, help="steady seconds (default 60; --quick 5)")
    ap.add_argument("--reload-every", type=float, default=None, help="seconds between versions (default 3; --quick 1.5)")
    ap.add_argument("--reloads", type=int, default=None, help="versions published (default 50; --quick 3)")
    ap.add_argument("--swap-lag", type=float, default=5.0, help="seconds a superseded version may still answer")
    ap.add_argument("--rows", type=int, default=50_000, help="synthetic rows for the demo bundle")
    ap.add_argument("--faults", action="store_true", help="instead of the scenarios: Redis killed/paused under load")
    ap.add_argument("--soak", action="store_true", help="instead of the scenarios: a soak at half saturation")
    ap.add_argument("--soak-minutes", type=float, default=10.0)
    ap.add_argument("--soak-reloads", type=int, default=20)
    ap.add_argument("--workdir", help="bundle, logs and results (default: a temporary directory, removed)")
    ap.add_argument("--out-json", default="/tmp/loadtest.json")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="update the docs even with --quick")
    args = ap.parse_args(argv)
    q = args.quick
    args.variants = (args.variants or ("embedded" if q else "embedded,redis")).split(",")
    args.rate = args.rate if args.rate is not None else (10.0 if q else 20.0)
    args.duration = args.duration if args.duration is not None else (5.0 if q else 60.0)
    args.reload_every = args.reload_every if args.reload_every is not None else (1.5 if q else 3.0)
    args.reloads = args.reloads if args.reloads is not None else (3 if q else 50)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mtrank-loadtest-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        bundles, data = ensure_bundle(workdir, args.rows)
        if args.faults or args.soak:
            return faults_main(bundles, data, args, workdir, started)
        results = []
        for variant in args.variants:
            out = workdir / f"results-{variant}"
            out.mkdir(exist_ok=True)
            results.append(run_variant(variant, bundles, data, args, out))
            log(f"{variant}: {json.dumps(results[-1]['checks'])}")
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_min": (time.time() - started) / 60,
                "machine": machine_note(), "args": {k: v for k, v in vars(args).items() if k != "docs"}}
        publish(args, render(meta, results, args), {"meta": meta, "results": results}, START, END)
        # a smoke run is too short for the latency and memory bounds: it fails on correctness alone
        gate = ("zero_errors", "versions_active") if args.quick else tuple(results[0]["checks"])
        ok = all(r["checks"][c] for r in results for c in gate)
        for r in results:
            for line in r["bad_versions"] + r["publisher_errors"]:
                log(f"{r['variant']}: {line}")
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def faults_main(bundles: Path, data: Path, args: argparse.Namespace, workdir: Path, started: float) -> int:
    faults = run_faults(bundles, data, args, workdir) if args.faults else None
    if faults is not None:
        log(f"faults: {json.dumps(faults['checks'])}")
    soak = run_soak(bundles, data, args, workdir) if args.soak else None
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_min": (time.time() - started) / 60,
            "machine": machine_note()}
    publish(args, render_faults(meta, faults, soak), {"meta": meta, "faults": faults, "soak": soak}, FAULT_START,
            FAULT_END)
    ok = (faults is None or faults["checks"]["zero_rank_errors"]) and (
        soak is None or (not soak["failures"] and not soak["bad_versions"] and not soak["publisher_errors"]))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
