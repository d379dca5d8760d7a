"""Service test helpers: real uvicorn servers on free ports, a real redis-server, bundle tools.

``require_binary(name)`` skips a test when the binary is absent, unless MTRANK_REQUIRE_BINARIES=1
(CI), where it fails instead. Bundles come from the shared ``make_bundle`` fixture (tests/conftest.py:
a tiny trained run exported with model/export.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mtrank.bundle import MANIFEST, write_current


def require_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        if os.environ.get("MTRANK_REQUIRE_BINARIES") == "1":
            pytest.fail(f"{name} is required (MTRANK_REQUIRE_BINARIES=1) but was not found")
        pytest.skip(f"{name} not found")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Any, timeout: float = 15.0, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ------------------------------------------------------------------------------------- redis


class RedisServer:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        def up() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping())
            except redis.RedisError:
                return False

        wait_until(up, 10, what="redis-server")
        return self

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(require_binary("redis-server"), tmp_path).start()
    try:
        yield server
    finally:
        server.kill()


# ------------------------------------------------------------------------------------ server


class ServerThread:
    """uvicorn serving ``create_app(settings)`` in a background thread of the test process."""

    def __init__(self, settings: Any) -> None:
        import uvicorn

        from service.main import create_app

        self.port = free_port()
        self.settings = settings
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan="on"))
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit as exc:  # uvicorn exits when the lifespan start-up fails
            self.exit_code = int(exc.code or 0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def services(self) -> Any:
        return self.app.state.services

    def start(self, ready: bool = True) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 30, what="uvicorn start")
        if not self.server.started:
            raise RuntimeError(f"server failed to start (exit code {self.exit_code})")
        if ready:
            wait_until(lambda: httpx.get(f"{self.url}/readyz").status_code == 200, 30, what="/readyz")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10.0, **kw)


def settings_for(bundles_dir: Path, **overrides: Any) -> Any:
    """Settings for a test server: fast polling, no pub/sub unless asked, GC and the GIL switch interval untouched."""
    from service.settings import load_settings

    base: dict[str, Any] = {"reload": {"poll_interval_ms": 50, "pubsub_channel": None},
                            "gc": {"freeze": False, "gen0_threshold": 0},
                            "interpreter": {"switch_interval_ms": 5.0},  # Python's default
                            "onnx": {"warmup_candidates": [1, 8], "warmup_rounds": 1}}
    for k, v in overrides.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return load_settings(None, bundles_dir=bundles_dir, **base)


@pytest.fixture
def start_server() -> Iterator[Any]:
    servers: list[ServerThread] = []

    def start(bundles_dir: Path, ready: bool = True, **overrides: Any) -> ServerThread:
        srv = ServerThread(settings_for(bundles_dir, **overrides))
        servers.append(srv)
        return srv.start(ready)

    yield start
    for srv in servers:
        srv.stop()


# ------------------------------------------------------------------------------------ bundles


def clone_bundle(src: Path, bundles_dir: Path, version: str, activate: bool = False) -> Path:
    """A copy of an exported bundle under another version name (same model; only the name differs)."""
    dst = bundles_dir / version
    tmp = bundles_dir / f".{version}.tmp"
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / MANIFEST).read_text())
    manifest["model_version"] = version
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    os.rename(tmp, dst)
    if activate:
        write_current(bundles_dir, version)
    return dst


@pytest.fixture(scope="session")
def base_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bundle exported from the shared tiny run; tests clone it instead of re-exporting."""
    from model.export import export_run

    return export_run(tiny_run, tmp_path_factory.mktemp("base_bundles"), version="base", activate=False)


def rank_body(n: int = 5, **kw: Any) -> dict[str, Any]:
    body = {"user_id": "u1", "context": {"device": "ios", "hour": 21},
            "candidates": [{"item_id": f"i{k}", "features": {"item_category": f"c{k % 3}", "item_price": 10.0 + k}}
                           for k in range(n)]}
    body.update(kw)
    return body


@pytest.fixture(scope="session")
def rankjson() -> Any:
    """``service._rankjson``; the package builds it wherever a C compiler is: skipped without one, a failure under
    MTRANK_REQUIRE_BINARIES=1 (CI, whose machine has one)."""
    from service import rank_body

    if rank_body.rankjson is None:
        if os.environ.get("MTRANK_REQUIRE_BINARIES") == "1":
            pytest.fail("service._rankjson was not built (MTRANK_REQUIRE_BINARIES=1): pip install -e . needs a C compiler")
        pytest.skip("service._rankjson not built (no C compiler at install)")
    return rank_body.rankjson
