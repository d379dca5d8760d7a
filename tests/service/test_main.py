"""``mtrank serve`` end to end in a subprocess: 2 uvicorn workers, Prometheus multiprocess metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.service.conftest import free_port, rank_body, wait_until
from tests.service.test_api import metric

ROOT = Path(__file__).resolve().parents[2]


def test_cli_serve_two_workers_multiprocess_metrics(tmp_path: Path, make_bundle) -> None:
    bundles = tmp_path / "bundles"
    version = make_bundle(bundles).name
    prom = tmp_path / "prom"
    prom.mkdir()
    (prom / "counter_stale.db").write_bytes(b"")  # stale files from an earlier run are cleared
    cfg = tmp_path / "service.yaml"
    cfg.write_text("workers: 2\nonnx: {executor_threads: 1, warmup_candidates: [1, 8], warmup_rounds: 1}\n"
                   "reload: {pubsub_channel: null}\n")
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mtrank.cli", "serve", "--bundles", str(bundles), "--port", str(port),
                             "--config", str(cfg)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, interval=0.2, what="2-worker server")
        with httpx.Client(base_url=url, timeout=10) as c:
            for _k in range(30):
                with httpx.Client(base_url=url, timeout=10) as fresh:  # new connections spread over workers
                    r = fresh.post("/rank", json=rank_body(4))
                assert r.status_code == 200 and r.json()["model_version"] == version
            wait_until(lambda: len(list(prom.glob("counter_*.db"))) >= 2, 30, what="both workers' metric files")
            text = c.get("/metrics").text
            assert metric(text, "mtrank_http_requests_total", route="/rank", status="200") == 30  # all workers
            assert metric(text, "mtrank_rank_candidates_count") == 30
            assert metric(text, "mtrank_model_info", version=version) == 1
            assert not (prom / "counter_stale.db").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


def test_service_never_imports_torch_or_model() -> None:
    """A serving install has no torch: importing and building the app must not pull it (or model/) in."""
    code = ("import sys\n"
            "import service.main, service.app, service.feature_store, service.registry\n"
            "from service.settings import load_settings\n"
            "service.main.create_app(load_settings(None, bundles_dir='/nonexistent'))\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'model')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for path in (ROOT / "service").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from model" not in text and "import model" not in text, path
