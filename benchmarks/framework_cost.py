"""What the web framework costs per /rank request: a FastAPI route against a bare ASGI app, both doing nothing.

The floor of the question "what does a pure-ASGI path for ``POST /rank`` save": a route alone, with no router of
other routes, no dependencies and no middleware of the app's (what ``service.api.RankDispatch`` skips in mtrank is
measured by its A/B in docs/benchmarks.md). Two servers, each ``python -m uvicorn --factory`` (uvloop,
httptools, no access log, one worker), answer ``POST /rank`` with the same fixed 500-item JSON response after
reading the whole body: (1) a FastAPI app with one ``async def`` route taking the ``Request`` (``await
request.body()``) and returning a ``Response``, as ``service.api.rank_items`` does; (2) a bare ASGI callable that
reads the body messages and sends the response. ``serve_bench``'s closed-loop load generator (8 connections)
sends the same bodies (``--candidates`` synthetic candidates with 20 integer and float features each, the size of
the head-to-head's list-form bodies) to each in turn, ``--rounds`` rounds alternating; the server's CPU per request
(/proc) is what the framework and the HTTP server cost, the difference between the two what FastAPI adds.

Usage (prints only)::

    env -u OPENBLAS_CORETYPE python benchmarks/framework_cost.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import log  # noqa: E402
from benchmarks.serve_bench import free_port, run_loadgen  # noqa: E402

APPS = {"fastapi": "FastAPI route (Request, await body(), Response)", "asgi": "bare ASGI callable"}


def _response(n: int) -> bytes:
    return json.dumps({"request_id": "r", "items": [{"item_id": str(i), "rank": i + 1, "score": 0.5,
                                                      "task_scores": {"click": 0.1, "like": 0.2, "buy": 0.3}}
                                                     for i in range(n)]}).encode()


def fastapi_app() -> Any:
    from fastapi import FastAPI, Request, Response

    body = _response(int(os.environ["FRAMEWORK_COST_N"]))
    app = FastAPI()

    @app.post("/rank")
    async def rank(request: Request) -> Response:
        await request.body()
        return Response(body, media_type="application/json")

    return app


def asgi_app() -> Any:
    body = _response(int(os.environ["FRAMEWORK_COST_N"]))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def _bodies(n: int, count: int, path: Path) -> Path:
    rng = random.Random(0)
    lines = []
    for _ in range(count):
        cands = [{"item_id": str(rng.randrange(10**6)), "features": {
            **{f"item_code_{k}": rng.randrange(10**5) for k in range(13)},
            **{f"item_value_{k}": rng.random() * 100 for k in range(7)}}} for _ in range(n)]
        lines.append(json.dumps({"user_id": "u1", "context": {"hour": 21, "ctr": 0.05}, "candidates": cands}))
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="framework-cost-") as tmp:
        bodies = _bodies(args.candidates, 16, Path(tmp) / "bodies.jsonl")
        size = len(bodies.read_bytes().split(b"\n", 1)[0])
        servers = {}
        env = {**os.environ, "FRAMEWORK_COST_N": str(args.candidates), "PYTHONPATH": str(ROOT)}
        for key in APPS:
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", f"benchmarks.framework_cost:{key}_app",
                                     "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                                     "--log-level", "warning"], env=env, cwd=ROOT)
            servers[key] = (proc, port)
        time.sleep(3)
        cpu: dict[str, list[float]] = {k: [] for k in APPS}
        rps: dict[str, list[float]] = {k: [] for k in APPS}
        try:
            for r in range(args.rounds):
                for key in list(APPS)[r % 2:] + list(APPS)[:r % 2]:
                    proc, port = servers[key]
                    d = run_loadgen(port, bodies, Path(tmp) / "load.json", [proc.pid], 8, args.duration, args.warmup,
                                    10_000_000, args.candidates)
                    cpu[key].append(sum(d["server_cpu_s"].values()) / d["requests"])
                    rps[key].append(d["requests"] / d["elapsed_s"])
                    log(f"round {r} {key}: {rps[key][-1]:.0f} req/s, {cpu[key][-1] * 1e3:.3f} ms CPU/request")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"{args.candidates} candidates, bodies of {size / 1e3:.0f} KB; median of {args.rounds} rounds:")
    for key, label in APPS.items():
        print(f"  {label}: {med[key] * 1e3:.3f} ms server CPU/request, {statistics.median(rps[key]):.0f} req/s")
    print(f"  FastAPI adds {(med['fastapi'] - med['asgi']) * 1e3:.3f} ms per request")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
