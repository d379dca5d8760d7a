"""Calibration refresh: ECE before and after ``mtrank calibrate`` on feedback from a deliberately miscalibrated bundle.

Evidence for the calibration refresh (docs/bundle.md, "Calibration refresh"), end to end on the real service:

1. **Bundle.** ``serve_bench.ensure_bundle`` (a child process, so this one never imports torch): the demo
   config trained ``--epochs`` epochs on ``model.synthetic.write(path, 50_000, seed=0)`` and exported into
   ``WORKDIR/model`` (reused when present). Its calibration tables (fitted on the validation split) are
   taken as **the truth**: a served item's label for binary task t is drawn from ``Bernoulli(cal_t(raw))``.
2. **Miscalibration.** A new version of the same model (``write_bundle``: model.onnx and golden.json
   byte-identical) whose tables are distorted: ``sigmoid(logit(cal_t(x)) + SHIFT)`` on a 201-point grid
   (over-predicts: odds x e^SHIFT), the calibrated reference histograms recomputed to match. It is the only
   version in a fresh bundles directory, and CURRENT names it.
3. **Serve.** ``mtrank serve`` (``serve_bench.Server``: a subprocess, 1 worker) with ``feedback.log`` =
   ``jsonl`` in ``WORKDIR/.../feedback``, ``monitoring.window_s`` 3600 (the window covers a whole phase: it
   restarts at the hot reload) and ``monitoring.interval_s`` 1.
4. **Phase 1 traffic.** ``--requests`` /rank calls (``serve_bench.request_bodies``: ``--candidates``
   candidates each, all returned, ``raw_scores: true`` so this client can draw the true labels), then
   /feedback with one event per served item labelling every calibrated task (batches of 1000 events).
   ``GET /routing`` (re-evaluates the window), then ``mtrank_calibration_ece{task}`` from ``GET /metrics``:
   the live ECE *before*.
5. **Calibrate.** ``python -m mtrank.cli calibrate BUNDLE --feedback LOG`` (defaults: holdout 0.3 of the
   requests, 500 labels per side, bootstrap confidence 0.95); its JSON summary gives the holdout ECE of the
   current vs the refitted tables. It moves CURRENT; the service hot-reloads it (``/models`` polled).
6. **Phase 2 traffic** on fresh request bodies (another seed), the same way: the live ECE *after*. The
   **noise floor** is the ECE the truth itself scores on phase 2's labels (the served raw scores and labels
   read back from the feedback log): no table can do better than that on these labels but by chance.

Usage (from the repository root; OPENBLAS_CORETYPE slows numpy on the benchmark machine, so unset it)::

    env -u OPENBLAS_CORETYPE python benchmarks/calibration_refresh.py            # full run (~2 min), updates the docs
    env -u OPENBLAS_CORETYPE python benchmarks/calibration_refresh.py --quick    # smoke run, prints only

Writes raw results to ``--out-json`` and (full runs, or ``--write-docs``) replaces the section between
``<!-- calibration-refresh:start -->`` and ``<!-- calibration-refresh:end -->`` in ``--docs``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from serve_bench import (
    ROOT,
    SEED,
    Server,
    ServerConfig,
    ensure_bundle,
    log,
    machine_note,
    request_bodies,
    working_dir,
    write_docs,
)

START, END = "<!-- calibration-refresh:start -->", "<!-- calibration-refresh:end -->"
SECTION_TITLE = "## Calibration refresh: ECE before and after `mtrank calibrate` (no retraining)"
SHIFT = 1.0  # logit shift of the miscalibrated tables
GRID = 201
FEEDBACK_BATCH = 1000  # events per /feedback call (limits.max_feedback_events)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def miscalibrate(original: Path, bundles: Path, version: str) -> Path:
    """Step 2 of the module docstring: the distorted version of ``original`` in ``bundles``."""
    from model.recalibrate import calibrated_histogram
    from mtrank.bundle import Calibration, Lineage, read_manifest, write_bundle, write_current

    m = read_manifest(original)
    grid = np.linspace(0.0, 1.0, GRID)
    tables = {t: Calibration(method="platt", x=grid.tolist(),
                             y=(1.0 / (1.0 + np.exp(-(_logit(c.apply(grid)) + SHIFT)))).tolist())
              for t, c in m.calibration.items()}
    ref = m.reference.model_copy(deep=True)
    for t, cal in tables.items():
        if t in ref.score_hist and t in ref.calibrated_score_hist:
            ref.calibrated_score_hist[t] = calibrated_histogram(
                ref.score_hist[t], cal, np.asarray(ref.calibrated_score_hist[t].edges))
    data = m.model_dump(by_alias=True, mode="json")
    data.update(model_version=version, created_at=dt.datetime.now(dt.UTC).isoformat(), files={},
                calibration={t: c.model_dump(mode="json") for t, c in tables.items()},
                reference=ref.model_dump(mode="json"),
                lineage=Lineage(kind="calibrate", parent=m.model_version, run_dir=m.lineage.run_dir,
                                checkpoint_sha256=m.lineage.checkpoint_sha256,
                                detail={"benchmark": f"tables distorted: sigmoid(logit(p) + {SHIFT})"}).model_dump())
    manifest = type(m).model_validate(data)
    path = write_bundle(bundles, manifest, {name: (original / name).read_bytes() for name in m.files})
    write_current(bundles, version)
    return path


class Client:
    """One keep-alive HTTP/1.1 connection to the server, reopened once when the server closed it while idle
    (uvicorn's keep-alive timeout: 5 s, shorter than the calibrate step)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body else {}
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()  # the next request() reconnects
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.call(method, path, body if isinstance(body, bytes | None) else json.dumps(body).encode())
        if status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {data[:500]!r}")
        return json.loads(data)


def traffic(client: Client, bodies: list[bytes], truth: dict[str, Any], rng: np.random.Generator) -> dict[str, int]:
    """/rank each body (raw scores back), then /feedback: every served item labelled for every task of ``truth``
    with a draw from ``truth[t].apply(raw)``. Returns the counts the service answered."""
    events: list[dict[str, Any]] = []
    for body in bodies:
        doc = json.loads(body)
        doc["raw_scores"] = True
        res = client.json("POST", "/rank", doc)
        items = res["items"]
        labels = {t: rng.random(len(items)) < cal.apply(np.asarray([it["task_scores"][t] for it in items],
                                                                   dtype=np.float32)).astype(np.float64)
                  for t, cal in truth.items()}
        events += [{"request_id": res["request_id"], "item_id": it["item_id"],
                    "labels": {t: int(labels[t][k]) for t in truth}} for k, it in enumerate(items)]
    totals = {"accepted": 0, "duplicates": 0, "joined": 0}
    for i in range(0, len(events), FEEDBACK_BATCH):
        out = client.json("POST", "/feedback", {"events": events[i:i + FEEDBACK_BATCH]})
        for k in totals:
            totals[k] += out[k]
    return {"requests": len(bodies), "events": len(events), **totals}


def live_ece(client: Client, tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per task: the window's ECE and labels from /routing (re-evaluated on the call), and the
    ``mtrank_calibration_ece`` gauge from /metrics right after (the same evaluation)."""
    routing = client.json("GET", "/routing")
    _, text = client.call("GET", "/metrics")
    gauge: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith("mtrank_calibration_ece{"):
            head, value = line.rsplit(" ", 1)
            gauge[head.split('task="', 1)[1].split('"', 1)[0]] = float(value)
    cal = routing.get("calibration", {})
    return {t: {"gauge": gauge.get(t, float("nan")), "routing": cal.get(t, {}).get("ece"),
                "labels": cal.get(t, {}).get("labels", 0)} for t in tasks}


def wait_active(client: Client, version: str, timeout: float = 60.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if client.json("GET", "/models")["active"] == version:
            return time.perf_counter() - t0
        time.sleep(0.1)
    raise RuntimeError(f"the service did not load {version} within {timeout:.0f} s")


def noise_floor(log_dir: Path, version: str, truth: dict[str, Any]) -> dict[str, float]:
    """ECE of the truth itself on the labels served by ``version`` (read back from the feedback log)."""
    from mtrank.feedback_log import read_feedback
    from mtrank.metrics import ece

    cols = read_feedback(log_dir)
    out = {}
    for t, cal in truth.items():
        m = (cols.model_version == version) & (cols.task == t)
        out[t] = float(ece(cols.label[m], cal.apply(cols.raw[m].astype(np.float32)).astype(np.float64)))
    return out


# --------------------------------------------------------------------------------------------- report


def _f(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def render(meta: dict[str, Any], res: dict[str, Any]) -> str:
    m = meta["machine"]
    cal = res["calibrate"]
    lines = [START, SECTION_TITLE, "",
             f"Measured {meta['date']} (runtime {meta['runtime_s'] / 60:.1f} min, "
             + (f"bundle build {meta['build_s']:.0f} s included" if meta["build_s"] else "bundle reused from --workdir")
             + f"; {m['cpu']}, {m['cores']} cores, Python {m['python']}, onnxruntime {m['onnxruntime']}):", "",
             "```bash", meta["command"], "```", "",
             "The calibrate step it runs (paths shortened):", "",
             "```bash", res["calibrate_command"], "```", "",
             f"Setup: the demo MMoE bundle (`{res['original']}`: trained {meta['epochs']} epoch(s) on 50k synthetic "
             "rows, exported) is the truth: a served item's label for task t is drawn from `Bernoulli(cal_t(raw))`, "
             "its exported calibration table. The service serves a **deliberately miscalibrated** version of the "
             f"same model (`{res['miscalibrated']}`, model.onnx byte-identical): every table replaced by "
             f"`sigmoid(logit(cal_t(x)) + {SHIFT:g})` (over-predicts). Real `mtrank serve` (1 worker), "
             "`feedback.log: {kind: jsonl}`; per phase "
             f"{res['phase1']['requests']} /rank calls × {meta['candidates']} candidates, every item labelled for "
             f"every calibrated task ({res['phase1']['joined']} joined events per phase). `mtrank calibrate` then "
             f"wrote `{cal['version']}` from the phase-1 log ({res['calibrate_s']:.1f} s) and moved CURRENT; the service "
             f"was serving it {res['reload_s']:.1f} s after the command returned (pointer polling, 1 s); phase 2 "
             "ran on fresh requests.", "",
             "| task | labels fit / holdout | holdout ECE: served table → refit (method) | bootstrap wins | "
             "live ECE before (miscalibrated) | live ECE after (refit) | noise floor (truth on phase 2) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for t, d in cal["tasks"].items():
        b, a = res["before"][t], res["after"][t]
        wins = "–" if d["bootstrap_win_share"] is None else f"{d['bootstrap_win_share']:.0%}"
        lines.append(f"| {t} | {d['labels_fit']} / {d['labels_holdout']} | {_f(d['ece_holdout_before'])} → "
                     f"**{_f(d['ece_holdout_after'])}** ({d['method']}{'' if d['kept'] else ', not kept'}) | "
                     f"{wins} | "
                     f"{_f(b['gauge'])} ({b['labels']} labels) | **{_f(a['gauge'])}** ({a['labels']} labels) | "
                     f"{_f(res['floor'][t])} |")
    lines += ["",
              "Live ECE is the `mtrank_calibration_ece{task}` gauge read from `/metrics` right after `GET /routing` "
              "re-evaluated the monitoring window (10 equal-width buckets of the served calibrated score; the "
              "window restarts when a new bundle is swapped in, so *after* covers phase 2 only). Holdout ECE is "
              "`mtrank calibrate`'s own check (the same 10 buckets) on the 30 % of phase-1 requests it held out. "
              "The noise floor is what the true probability itself scores on phase 2's labels: ECE of a perfectly "
              "calibrated score is not 0 on a finite sample.", "",
              f"Raw results: `{meta['out_json']}` (JSON, not committed).", "", END]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer requests, 1 epoch; docs not updated")
    ap.add_argument("--workdir", help="where data, runs, bundles, logs go (default: a temporary directory, removed)")
    ap.add_argument("--epochs", type=int, help="training epochs of the bundle (default 2; --quick 1)")
    ap.add_argument("--requests", type=int, help="/rank calls per phase (default 800; --quick 150)")
    ap.add_argument("--candidates", type=int, default=50, help="candidates per /rank (all labelled)")
    ap.add_argument("--out-json", default="/tmp/calibration_refresh.json")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="update the docs even with --quick")
    args = ap.parse_args(argv)
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.requests = args.requests or (150 if args.quick else 800)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    meta: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_note(),
                            "command": "env -u OPENBLAS_CORETYPE python benchmarks/calibration_refresh.py"
                            + "".join(f" {shlex.quote(a)}" for a in argv),
                            "epochs": args.epochs, "candidates": args.candidates, "out_json": args.out_json}
    with working_dir(args.workdir, "calibration-refresh-") as workdir:
        original, meta["build_s"] = ensure_bundle(workdir / "model", args.epochs)
        data = workdir / "model" / "synthetic.parquet"
        from mtrank.bundle import read_manifest

        truth = dict(read_manifest(original).calibration)
        tasks = list(truth)
        run = workdir / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        bundles, log_dir = run / "bundles", run / "feedback"
        miscal = miscalibrate(original, bundles, "miscalibrated").name
        log(f"serving {miscal} (tables distorted by +{SHIFT} in logit) from {bundles}")
        env = {"MTRANK_FEEDBACK__LOG__KIND": "jsonl", "MTRANK_FEEDBACK__LOG__DIR": str(log_dir),
               "MTRANK_MONITORING__WINDOW_S": "3600", "MTRANK_MONITORING__INTERVAL_S": "1",
               "MTRANK_ONNX__INTRA_OP_THREADS": "1"}
        server = Server(ServerConfig("cal", "calibration refresh", 1, env), bundles, run / "server.log", run / "prom")
        res: dict[str, Any] = {"original": original.name, "miscalibrated": miscal}
        try:
            server.wait_ready()
            client = Client(server.port)
            rng = np.random.default_rng(SEED)
            t0 = time.perf_counter()
            res["phase1"] = traffic(client, request_bodies(data, args.candidates, args.requests, SEED), truth, rng)
            res["before"] = live_ece(client, tasks)
            log(f"phase 1 ({time.perf_counter() - t0:.1f} s): {res['phase1']}; live ECE "
                f"{ {t: round(v['gauge'], 4) for t, v in res['before'].items()} }")

            cmd = [sys.executable, "-m", "mtrank.cli", "calibrate", str(bundles / miscal), "--feedback", str(log_dir)]
            res["calibrate_command"] = shlex.join(["mtrank", "calibrate", f"bundles/{miscal}", "--feedback",
                                                   "feedback/"])
            t0 = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            res["calibrate_s"] = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"mtrank calibrate exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
            res["calibrate"] = json.loads(done.stdout)
            version = res["calibrate"]["version"]
            log(f"calibrate ({res['calibrate_s']:.1f} s) wrote {version}: "
                + "; ".join(f"{t}: {d['reason']}" for t, d in res["calibrate"]["tasks"].items()))
            res["reload_s"] = wait_active(client, version)

            t0 = time.perf_counter()
            res["phase2"] = traffic(client, request_bodies(data, args.candidates, args.requests, SEED + 1), truth, rng)
            res["after"] = live_ece(client, tasks)
            log(f"phase 2 ({time.perf_counter() - t0:.1f} s): live ECE "
                f"{ {t: round(v['gauge'], 4) for t, v in res['after'].items()} }")
        finally:
            server.stop()
        res["floor"] = noise_floor(log_dir, res["calibrate"]["version"], truth)
        meta["runtime_s"] = time.perf_counter() - t_start
        section = render(meta, res)
        Path(args.out_json).write_text(json.dumps({"meta": meta, "results": res}, indent=1, default=str))
        print(section)
        if not args.no_docs and (not args.quick or args.write_docs):
            write_docs(Path(args.docs), section, START, END)
            log(f"updated {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
