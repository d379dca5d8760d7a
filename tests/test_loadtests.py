"""loadtests/run.py --quick: locust against ``mtrank stack`` with reloads under load, as a smoke test.

The full run (latency and memory bounds, both feature-store variants, 50 reloads) is a benchmark
(docs/benchmarks.md); here the run is short and must still have zero failed requests and only responses
whose model version was active when they were served.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import require_binary

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_load_test_with_reloads_has_no_errors(tmp_path: Path, make_bundle, demo_data: Path) -> None:
    require_binary("redis-server")
    if shutil.which("locust") is None:
        pytest.fail("locust (dev extra) is not installed")
    make_bundle(tmp_path / "bundles")
    shutil.copy(demo_data, tmp_path / "demo.parquet")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "loadtests/run.py", "--quick", "--workdir", str(tmp_path), "--out-json",
                           str(out), "--no-docs"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (res,) = json.loads(out.read_text())["results"]
    assert res["checks"]["zero_errors"] and res["checks"]["versions_active"]
    assert res["reload"]["reloads"] == 3 and res["steady"]["requests"] > 20
    assert res["steady"]["feedback_requests"] + res["reload"]["feedback_requests"] > 0
    assert len(res["steady"]["by_class"]) >= 3  # the candidate mix (50/200/500/1000) is drawn per request
    assert {len(v) for v in res["versions_per_second"].values()} <= {1, 2}  # at most one swap per second
