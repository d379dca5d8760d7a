"""Hot-reload memory: bundle load time and the worker's peak RSS while it loads a ~40 M-parameter bundle.

Issue 9 target: **peak RSS during a reload <= 1.3 x (steady RSS + one bundle)**, where *steady RSS* is the
worker's median VmRSS over the seconds before the reload (light load, everything loaded so far still loaded)
and *one bundle* is the size of the new version's ``model.onnx`` on disk.

1. **Bundles.** The production MMoE (``benchmarks/configs/production_mmoe.yaml``, data from
   ``benchmarks/production_model.py``) with bigger hash spaces (``--user-buckets`` for ``user_id``,
   ``--item-buckets`` for ``item_id``; 16-dim embeddings, so the defaults give about 40 M embedding
   parameters), trained 1 epoch on ``--rows`` rows (just a valid bundle) and exported three times (``v1``
   active, ``v2``, ``v3``) in a child process, so this process never imports torch. A ``--workdir`` holding
   them is reused.
2. **Cold load.** ``service.scorer.Model.load`` (default onnx/fusion settings) in a fresh child process,
   ``--cold-loads`` times: seconds, VmRSS before and after, and VmHWM (the load's peak).
3. **Hot reload.** ``python -m mtrank.cli serve --bundles DIR --port P`` (``MTRANK_WORKERS=1``: one process, the
   worker; otherwise the service defaults; ``MTRANK_ADMIN__TOKEN`` set), started with ``benchmarks.serve_bench.Server``; a thread posts ``--rps``
   /rank requests per second with ``--candidates`` candidates drawn from the generated data. Each reload:
   the steady RSS over ``--steady-s`` seconds, then the worker's peak-RSS counter is reset (``5`` into
   ``/proc/PID/clear_refs``) and ``POST /admin/reload {"version": ...}`` runs while a thread samples VmRSS
   every ``--interval-ms``; the peak is the larger of the highest sample and VmHWM (the kernel's exact
   peak); then the RSS after ``--settle-s`` seconds. The reloads cycle v2, v3, v1, ...: the registry keeps
   the previous version loaded (the rollback target) and would *reuse* it, so cycling over three versions
   makes every reload a real load; from the second reload on, steady RSS holds two models and the reload
   loads a third before the oldest is dropped.

Usage (from the repository root)::

    env -u OPENBLAS_CORETYPE python benchmarks/reload_rss.py --workdir /tmp/reload-rss --write-docs

Writes raw results to ``--out-json``; with ``--write-docs`` replaces the section between
``<!-- reload-rss:start -->`` and ``<!-- reload-rss:end -->`` in ``--docs`` (appended when missing).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import log, working_dir, write_docs  # noqa: E402
from benchmarks.serve_bench import Server, ServerConfig, machine_note, process_tree  # noqa: E402

START, END = "<!-- reload-rss:start -->", "<!-- reload-rss:end -->"
TARGET = 1.3
VERSIONS = ("v1", "v2", "v3")
TOKEN = "reload-rss-benchmark"
MIB = 1 << 20
BODY_POOL = 32
SERVER = ServerConfig("R", "1 worker, service defaults", 1, {"MTRANK_ADMIN__TOKEN": TOKEN, "MTRANK_WORKERS": "1"})


# ---------------------------------------------------------------------------------------- bundles


def build(workdir: Path, rows: int, user_buckets: int, item_buckets: int) -> None:
    """Generate data, train the production MMoE with the bigger hash spaces, export ``VERSIONS`` (the first
    active) and write ``build.json`` (embedding parameters, seconds). Runs with torch (child process)."""
    from benchmarks.production_model import ARCH_CONFIGS, write
    from model.export import export_run
    from model.train import load_run, train
    from mtrank.config import load_config

    t0 = time.perf_counter()
    data = write(workdir / f"production_{rows}.parquet", rows, seed=0)
    path = ARCH_CONFIGS["mmoe"]
    index = {f.name: i for i, f in enumerate(load_config(path).features)}
    cfg = load_config(path, [f"data.train=[{data}]", "train.threads=2", "train.epochs=1",
                             f"features.{index['user_id']}.buckets={user_buckets}",
                             f"features.{index['item_id']}.buckets={item_buckets}"])
    train(cfg, workdir / "run")
    trained = time.perf_counter() - t0
    for v in VERSIONS:
        export_run(workdir / "run", workdir / "bundles", version=v, activate=v == VERSIONS[0])
    _, schema, model = load_run(workdir / "run")
    info = {"rows": rows, "user_buckets": user_buckets, "item_buckets": item_buckets,
            "embedding_params": model.embedding.table.weight.numel(), "table_rows": schema.table_size,
            "params": sum(p.numel() for p in model.parameters()), "train_s": trained,
            "build_s": time.perf_counter() - t0}
    (workdir / "build.json").write_text(json.dumps(info))


def ensure_bundles(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``build.json`` of the bundles under ``workdir`` (built in a child process unless all are there)."""
    info = workdir / "build.json"
    if info.exists() and all((workdir / "bundles" / v / "model.onnx").exists() for v in VERSIONS):
        log(f"reusing the bundles in {workdir / 'bundles'}")
        return json.loads(info.read_text()) | {"reused": True}
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"building {len(VERSIONS)} bundles in {workdir} ({args.rows:,} rows, user_id {args.user_buckets:,} and "
        f"item_id {args.item_buckets:,} buckets)")
    out = workdir / "build.log"
    with out.open("w") as fh:
        rc = subprocess.call([sys.executable, __file__, "_build", str(workdir), str(args.rows), str(args.user_buckets),
                              str(args.item_buckets)], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"bundle build failed (rc {rc}); see {out}:\n{out.read_text()[-3000:]}")
    return json.loads(info.read_text()) | {"reused": False}


def request_bodies(bundle_dir: Path, data: Path, n_candidates: int, count: int, seed: int = 0) -> list[bytes]:
    """``count`` /rank bodies: user and context features of a random impression, ``n_candidates`` distinct items
    (their item-side features) of other random impressions; categorical codes as strings."""
    import pyarrow.parquet as pq

    from mtrank.bundle import read_manifest

    feats = read_manifest(bundle_dir).schema.features
    request = [f.name for f in feats if f.group == "request" and f.name != "user_id"]
    item = [f.name for f in feats if f.group == "item" and f.name != "item_id"]
    kinds = {f.name: f.kind for f in feats}
    table = pq.read_table(data, columns=["user_id", "item_id", *request, *item]).to_pylist()

    def value(row: dict[str, Any], name: str) -> Any:
        return row[name] if kinds[name] == "numeric" else str(row[name])

    items = {str(r["item_id"]): {k: value(r, k) for k in item} for r in table}
    ids = sorted(items)
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        imp = table[rng.randrange(len(table))]
        cands = [{"item_id": i, "features": items[i]} for i in rng.sample(ids, n_candidates)]
        bodies.append(json.dumps({"user_id": str(imp["user_id"]), "context": {k: value(imp, k) for k in request},
                                  "candidates": cands}).encode())
    return bodies


# ----------------------------------------------------------------------------------------- memory


def vm(pid: int) -> dict[str, int]:
    """``Vm*`` lines of ``/proc/PID/status`` in bytes (VmRSS, VmHWM, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Vm"):
            key, val = line.split(":", 1)
            out[key] = int(val.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def sampling(pid: int, interval_s: float) -> Iterator[list[int]]:
    """VmRSS of ``pid`` every ``interval_s`` in a thread while the block runs; the list fills as it goes."""
    samples: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            samples.append(vm(pid)["VmRSS"])
            stop.wait(interval_s)

    t = threading.Thread(target=loop, name="rss-sampler", daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join()
        samples.append(vm(pid)["VmRSS"])


def window_rss(pid: int, seconds: float, interval_s: float) -> int:
    """Median VmRSS over ``seconds``."""
    with sampling(pid, interval_s) as samples:
        time.sleep(seconds)
    return int(statistics.median(samples))


# ------------------------------------------------------------------------------------------- load


class Load(threading.Thread):
    """Posts /rank ``rps`` times a second (bodies cycled, one keep-alive connection) until ``stop()``;
    counts answers by status."""

    def __init__(self, port: int, bodies: Sequence[bytes], rps: float) -> None:
        super().__init__(name="rank-load", daemon=True)
        self.port, self.bodies, self.period = port, bodies, 1.0 / rps
        self.status: dict[str, int] = {}
        self.latencies: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        k, due = 0, time.monotonic()
        while not self._halt.is_set():
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/rank", self.bodies[k % len(self.bodies)], {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                key = str(resp.status)
            except (OSError, http.client.HTTPException) as err:
                key = type(err).__name__
                conn.close()
            self.latencies.append(time.perf_counter() - t0)
            self.status[key] = self.status.get(key, 0) + 1
            k, due = k + 1, due + self.period
            self._halt.wait(max(0.0, due - time.monotonic()))
        conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join()


# ------------------------------------------------------------------------------------- HTTP calls


def call(port: int, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 300.0) -> Any:
    """One JSON request with the admin token; the decoded answer (RuntimeError unless 200)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, data, {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        text = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{method} {path}: {resp.status} {text[:500]!r}")
    return json.loads(text)


def reload_once(port: int, pid: int, version: str, bundle_bytes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Steady RSS, then one admin reload to ``version`` under RSS sampling, then the settled RSS."""
    interval = args.interval_ms / 1000.0
    steady = window_rss(pid, args.steady_s, interval)
    hwm_reset = reset_peak(pid)
    with sampling(pid, interval) as samples:
        t0 = time.perf_counter()
        outcome = call(port, "POST", "/admin/reload", {"version": version})
        wall = time.perf_counter() - t0
    hwm = vm(pid)["VmHWM"] if hwm_reset else None
    peak = max(max(samples), hwm or 0)
    after = window_rss(pid, args.settle_s, interval)
    if outcome.get("status") != "loaded" or outcome.get("active") != version:
        raise RuntimeError(f"reload to {version}: unexpected answer {outcome}")
    return {"version": version, "previous": outcome.get("previous"), "steady_rss": steady, "peak_sampled": max(samples),
            "samples": len(samples), "vmhwm": hwm, "peak_rss": peak, "after_rss": after, "reload_s": wall,
            "ratio": peak / (steady + bundle_bytes)}


def run_server(cfg: ServerConfig, bundles: Path, bodies: list[bytes], bundle_bytes: int, args: argparse.Namespace,
               workdir: Path) -> dict[str, Any]:
    """One server of ``cfg`` (one worker) serving ``bundles``: start-up numbers and ``args.reloads`` measured reloads
    under light load."""
    server = Server(cfg, bundles, workdir / f"server-{cfg.key}.log", workdir / "prometheus")
    try:
        t0 = time.perf_counter()
        server.wait_ready()
        ready_s = time.perf_counter() - t0
        pid = server.proc.pid
        if len(process_tree(pid)) > 1:
            raise RuntimeError(f"the server runs {len(process_tree(pid))} processes; this benchmark measures one worker")
        start = call(server.port, "GET", "/models")["last_reload"]
        log(f"server ready in {ready_s:.1f} s (bundle load at start-up {start['seconds']:.2f} s), "
            f"RSS {vm(pid)['VmRSS'] / MIB:.0f} MiB")
        load = Load(server.port, bodies, args.rps)
        load.start()
        reloads = []
        order = [VERSIONS[(i + 1) % len(VERSIONS)] for i in range(args.reloads)]
        for version in order:
            r = reload_once(server.port, pid, version, bundle_bytes, args)
            log(f"reload -> {version}: steady {r['steady_rss'] / MIB:.0f} MiB, peak {r['peak_rss'] / MIB:.0f} MiB "
                f"(ratio {r['ratio']:.2f}), after {r['after_rss'] / MIB:.0f} MiB, {r['reload_s']:.2f} s")
            reloads.append(r)
        load.stop()
        lat = sorted(load.latencies)
        return {"ready_s": ready_s, "startup_load_s": start["seconds"], "reloads": reloads, "rank_status": load.status,
                "rank_p50_ms": 1e3 * statistics.median(lat), "rank_max_ms": 1e3 * lat[-1], "server_cmd": server.cmd}
    finally:
        server.stop()


# ------------------------------------------------------------------------------------- cold loads


def cold_load(bundle_dir: Path) -> dict[str, Any]:
    """``Model.load`` once in this (fresh) process: seconds, VmRSS before (imports done) and after, VmHWM."""
    import gc

    from service.scorer import Model
    from service.settings import FusionSettings, OnnxSettings

    gc.collect()
    pid = os.getpid()
    before = vm(pid)["VmRSS"]
    reset_peak(pid)
    t0 = time.perf_counter()
    model = Model.load(bundle_dir, OnnxSettings(), FusionSettings())
    seconds = time.perf_counter() - t0
    after = vm(pid)
    del model
    return {"load_s": seconds, "rss_before": before, "rss_after": after["VmRSS"], "vmhwm": after["VmHWM"]}


def cold_loads(bundle_dir: Path, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        res = subprocess.run([sys.executable, __file__, "_coldload", str(bundle_dir)], cwd=ROOT, check=True,
                             capture_output=True, text=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = out[-1]
        log(f"cold Model.load: {r['load_s']:.2f} s, RSS {r['rss_before'] / MIB:.0f} -> {r['rss_after'] / MIB:.0f} MiB, "
            f"peak {r['vmhwm'] / MIB:.0f} MiB")
    return out


# ------------------------------------------------------------------------------------------ report


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Medians and maxima over the reloads and the cold loads; the target verdict (worst ratio <= TARGET)."""
    rel, cold = res["server"]["reloads"], res["cold"]

    def stat(xs: list[float]) -> dict[str, float]:
        return {"median": statistics.median(xs), "max": max(xs)}

    worst = max(r["ratio"] for r in rel)
    return {"ratio": stat([r["ratio"] for r in rel]), "reload_s": stat([r["reload_s"] for r in rel]),
            "peak_over_steady": stat([r["peak_rss"] - r["steady_rss"] for r in rel]),
            "cold_load_s": stat([c["load_s"] for c in cold]),
            "model_rss": stat([c["rss_after"] - c["rss_before"] for c in cold]),
            "cold_peak_over_before": stat([c["vmhwm"] - c["rss_before"] for c in cold]),
            "met": worst <= TARGET}


def machine() -> str:
    """CPU, cores, kernel, Python and onnxruntime versions (``serve_bench.machine_note``) in one line."""
    m = machine_note()
    return (f"{m['cpu']}, {m['cores']} logical CPUs, {m['platform']}, Python {m['python']}, "
            f"onnxruntime {m['onnxruntime']}, numpy {m['numpy']}")


def mib(b: float) -> str:
    return f"{b / MIB:,.0f}"


def render(res: dict[str, Any], command: str) -> str:
    b, s, srv = res["build"], res["summary"], res["server"]
    size = res["bundle_bytes"]
    lines = [START, "## Hot reload: load time and peak RSS (a bundle with about 40 M embedding parameters)", "",
             f"Generated {res['generated']} with:", "", "```bash", command, "```", "",
             f"Machine: {res['machine']}.", "",
             f"Bundle: `benchmarks/configs/production_mmoe.yaml` with `user_id` hashed into {b['user_buckets']:,} and "
             f"`item_id` into {b['item_buckets']:,} buckets: {b['embedding_params']:,} embedding parameters (16 dims, "
             f"{b['table_rows']:,} rows), {b['params']:,} in all; trained 1 epoch on {b['rows']:,} rows of "
             "`benchmarks/production_model.py` data"
             + (" (reused from the work directory)" if b["reused"] else f" ({b['train_s']:.0f} s)")
             + f", exported as {', '.join(VERSIONS)}. **One bundle** = `model.onnx` on disk: {mib(size)} MiB "
             f"({size:,} bytes).", "",
             f"Server: `python -m mtrank.cli serve --bundles DIR` (`MTRANK_WORKERS=1`: one process, otherwise the "
             f"service defaults; ready in "
             f"{srv['ready_s']:.1f} s, bundle load at start-up {srv['startup_load_s']:.2f} s), {res['args']['rps']:g} "
             f"/rank requests/s with {res['args']['candidates']} candidates during the run (answers: "
             + ", ".join(f"{k}: {v}" for k, v in sorted(srv["rank_status"].items()))
             + f"; p50 {srv['rank_p50_ms']:.1f} ms, max {srv['rank_max_ms']:.0f} ms). Per reload: **steady** = median "
             f"VmRSS of the worker over {res['args']['steady_s']:g} s before it; **peak** = max(VmRSS sampled every "
             f"{res['args']['interval_ms']:g} ms, VmHWM reset just before the reload) during `POST /admin/reload`; "
             f"**after** = median over {res['args']['settle_s']:g} s after it; ratio = peak / (steady + one bundle). "
             "The reloads cycle through three versions so each loads a model (the previous version stays loaded as "
             "the rollback target: from the second reload on, steady holds two models).", "",
             "| # | reload | steady MiB | peak MiB | peak - steady MiB | after MiB | reload s | ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(srv["reloads"], 1):
        lines.append(f"| {i} | {r['previous']} -> {r['version']} | {mib(r['steady_rss'])} | {mib(r['peak_rss'])} | "
                     f"{mib(r['peak_rss'] - r['steady_rss'])} | {mib(r['after_rss'])} | {r['reload_s']:.2f} | "
                     f"{r['ratio']:.2f} |")
    lines += ["", f"Median / max over the reloads: ratio {s['ratio']['median']:.2f} / {s['ratio']['max']:.2f}, "
              f"peak - steady {mib(s['peak_over_steady']['median'])} / {mib(s['peak_over_steady']['max'])} MiB, reload "
              f"{s['reload_s']['median']:.2f} / {s['reload_s']['max']:.2f} s.", "",
              f"Cold `service.scorer.Model.load` in a fresh process ({len(res['cold'])} runs, median / max): "
              f"{s['cold_load_s']['median']:.2f} / {s['cold_load_s']['max']:.2f} s; RSS grows by "
              f"{mib(s['model_rss']['median'])} MiB ({s['model_rss']['median'] / size:.2f} x the file; the first "
              "session of the process, so onnxruntime's one-time state is included) and peaks "
              f"{mib(s['cold_peak_over_before']['median'])} MiB above the RSS before the load "
              f"({s['cold_peak_over_before']['median'] / size:.2f} x the file).", "",
              f"Target (issue 9): peak RSS during a reload <= {TARGET} x (steady RSS + one bundle): "
              f"**{'met' if s['met'] else 'missed'}** (worst ratio {s['ratio']['max']:.2f}).", "", END]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--workdir", default=None, help="bundles are built here and reused (default: a temp dir)")
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--user-buckets", type=int, default=2_000_000)
    ap.add_argument("--item-buckets", type=int, default=500_000)
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--cold-loads", type=int, default=3)
    ap.add_argument("--rps", type=float, default=5.0, help="/rank requests per second during the run")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--steady-s", type=float, default=3.0)
    ap.add_argument("--settle-s", type=float, default=3.0)
    ap.add_argument("--interval-ms", type=float, default=5.0)
    ap.add_argument("--out-json", default="/tmp/reload_rss.json")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--write-docs", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_build"]:
        build(Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    if argv[:1] == ["_coldload"]:
        print(json.dumps(cold_load(Path(argv[1]))))
        return 0
    args = parse_args(argv)
    with working_dir(args.workdir, "reload-rss-") as work:
        info = ensure_bundles(work, args)
        bundles = work / "bundles"
        bundle_bytes = (bundles / VERSIONS[0] / "model.onnx").stat().st_size
        log(f"{info['embedding_params']:,} embedding parameters; model.onnx {bundle_bytes / MIB:.0f} MiB")
        bodies = request_bodies(bundles / VERSIONS[0], work / f"production_{info['rows']}.parquet", args.candidates,
                                BODY_POOL)
        res: dict[str, Any] = {"build": info, "bundle_bytes": bundle_bytes, "args": vars(args),
                               "machine": machine()}
        res["cold"] = cold_loads(bundles / VERSIONS[0], args.cold_loads)
        res["server"] = run_server(SERVER, bundles, bodies, bundle_bytes, args, work)
        res["summary"] = summarise(res)
        res["generated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        Path(args.out_json).write_text(json.dumps(res, indent=1))
        command = "env -u OPENBLAS_CORETYPE python benchmarks/reload_rss.py" + (" " + shlex.join(argv) if argv else "")
        section = render(res, command)
        print(section)
        if args.write_docs:
            write_docs(Path(args.docs), section, START, END)
            log(f"updated {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
