"""``mtrank stack``: on loopback, what docker-compose.yml starts, without Docker.

One ``redis-server`` (feature store in the ``redis`` variant; always the reload channel and the feedback
join store, so feedback joins whichever replica ranked), N service replicas (``mtrank serve`` processes,
each on its own port with its own ``PROMETHEUS_MULTIPROC_DIR``, ``workers`` uvicorn workers each), and
``prometheus`` scraping every replica with the repository's ``docker/prometheus/alerts.yml``. The
``embedded`` variant gives each replica the snapshot as an in-process feature store instead of Redis.

:class:`Stack` is a context manager (the load tests and the observability integration test use it);
:func:`main` runs it in the foreground, prints the URLs, and on Ctrl-C (or SIGTERM) stops everything:
each process runs in a session of its own and is signalled, waited for, and killed if it lingers, so
nothing keeps running after the stack exits.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "docker" / "prometheus"


class StackError(RuntimeError):
    """A part of the stack could not start; the message says which and shows its last output."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        raise StackError(f"{name} not found (Debian: apt-get install {'redis-server' if 'redis' in name else name})")
    return path


@dataclass
class StackConfig:
    bundles: Path  # BUNDLES_DIR shared by every replica
    replicas: int = 2
    workers: int = 1  # uvicorn workers per replica
    feature_store: Literal["redis", "embedded"] = "redis"
    snapshot: Path | None = None  # user + item rows (Parquet/CSV with user_id and item_id columns)
    prometheus: bool = True
    port: int = 8000  # first replica; replica k listens on port + k (0: free ports)
    redis_port: int = 0  # 0: a free port
    prometheus_port: int = 9090
    scrape_interval: str = "5s"
    config: Path | None = None  # a service YAML merged under the stack's own settings
    env: dict[str, str] = field(default_factory=dict)  # extra MTRANK_* variables for every replica
    workdir: Path | None = None  # logs, configs, metric files (default: a temporary directory, removed)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class Stack:
    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self._own_workdir = cfg.workdir is None
        self.workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="mtrank-stack-")).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.admin_token = secrets.token_hex(16)
        self.redis_url = ""
        self.replica_urls: list[str] = []
        self.prometheus_url: str | None = None

    # ------------------------------------------------------------------------------ processes
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        fh = open(log, "wb")  # noqa: SIM115 - the child inherits it; our copy is closed right below
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                 start_new_session=True)  # its own process group: we signal the whole group
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _wait(self, proc: Proc, ready: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise StackError(f"{what} exited with {proc.popen.returncode}:\n{proc.tail()}")
            if ready():
                return
            time.sleep(0.1)
        raise StackError(f"{what} not ready after {timeout:.0f}s:\n{proc.tail()}")

    # ---------------------------------------------------------------------------------- parts
    def _start_redis(self, port: int | None = None) -> None:
        import redis

        port = port or self.cfg.redis_port or free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        proc = self._spawn("redis", [_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no", "--dir", str(self.workdir)])

        def up() -> bool:
            try:
                return bool(redis.Redis.from_url(self.redis_url, socket_connect_timeout=0.2).ping())
            except redis.RedisError:
                return False

        self._wait(proc, up, 15, "redis-server")
        if self.cfg.feature_store == "redis" and self.cfg.snapshot:
            from service.feature_store import push_snapshot

            for side in ("user", "item"):
                push_snapshot(self.redis_url, self.cfg.snapshot, side)

    # -------------------------------------------------------------------- faults (load tests)
    def _redis(self) -> Proc:
        return next(p for p in self.procs if p.name == "redis")

    def kill_redis(self) -> None:
        """SIGKILL redis-server (no persistence: its data is gone)."""
        proc = self._redis()
        proc.popen.kill()
        proc.popen.wait(5)
        self.procs.remove(proc)

    def restart_redis(self) -> None:
        """A new redis-server on the same port, with the snapshot pushed again (as a loader job would)."""
        self._start_redis(int(self.redis_url.rsplit(":", 1)[1].split("/")[0]))

    def pause_redis(self, paused: bool = True) -> None:
        """SIGSTOP (slow, not down: connections hang) or SIGCONT redis-server."""
        self._redis().popen.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def service_config(self) -> dict[str, Any]:
        """The settings every replica gets (over ``cfg.config`` when given)."""
        base: dict[str, Any] = {}
        if self.cfg.config:
            base = yaml.safe_load(Path(self.cfg.config).read_text()) or {}
        fs: dict[str, Any] = ({"backend": "redis", "redis": {"url": self.redis_url}} if self.cfg.feature_store == "redis"
                              else {"backend": "embedded", "snapshot": str(self.cfg.snapshot) if self.cfg.snapshot else None})
        stack = {"workers": self.cfg.workers, "admin": {"token": self.admin_token}, "feature_store": fs,
                 "reload": {"redis_url": self.redis_url}, "feedback": {"redis_url": self.redis_url}}
        return _merge(base, stack)

    def _start_replicas(self) -> None:
        cfg_path = self.workdir / "service.yaml"
        cfg_path.write_text(yaml.safe_dump(self.service_config(), sort_keys=False))
        first = self.cfg.port or 0
        started = []
        for k in range(self.cfg.replicas):
            port = first + k if first else free_port()
            mp = self.workdir / f"prometheus-multiproc-{k}"
            mp.mkdir(exist_ok=True)
            env = {**os.environ, **self.cfg.env, "PROMETHEUS_MULTIPROC_DIR": str(mp), "PYTHONUNBUFFERED": "1"}
            env.pop("MTRANK_CONFIG", None)
            argv = [sys.executable, "-m", "mtrank.cli", "serve", "--bundles", str(Path(self.cfg.bundles).resolve()),
                    "--port", str(port), "--config", str(cfg_path)]
            started.append((self._spawn(f"mtrank-{k + 1}", argv, env), f"http://127.0.0.1:{port}"))
        for proc, url in started:  # they start in parallel; wait for each
            self._wait(proc, lambda url=url: _http_ok(f"{url}/readyz"), 120, f"{proc.name} ({url})")
            self.replica_urls.append(url)

    def _start_prometheus(self) -> None:
        port = self.cfg.prometheus_port or free_port()
        doc = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        doc["global"] = {**doc.get("global", {}), "scrape_interval": self.cfg.scrape_interval,
                         "evaluation_interval": self.cfg.scrape_interval}
        doc["rule_files"] = [str(PROMETHEUS_DIR / f) for f in doc.get("rule_files", [])]
        targets = [u.removeprefix("http://") for u in self.replica_urls]
        for job in doc["scrape_configs"]:
            job.pop("scrape_interval", None)
            job["static_configs"] = [{"targets": targets}]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        proc = self._spawn("prometheus", [_binary("prometheus"), f"--config.file={path}",
                                          f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                                          f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"])
        self.prometheus_url = f"http://127.0.0.1:{port}"
        self._wait(proc, lambda: _http_ok(f"{self.prometheus_url}/-/ready"), 60, "prometheus")

    # -------------------------------------------------------------------------------- control
    def start(self) -> Stack:
        try:
            self._start_redis()
            self._start_replicas()
            if self.cfg.prometheus:
                self._start_prometheus()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process group (newest first), wait, SIGKILL what is left."""
        for proc in reversed(self.procs):
            _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.popen, signal.SIGKILL)
                proc.popen.wait(5)
            _signal_group(proc.popen, signal.SIGKILL)  # stragglers of the group (uvicorn workers)
        self.procs.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self.procs}

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> str:
        lines = [f"  mtrank-{k + 1}: {u}  (POST /rank, GET /routing, /metrics)" for k, u in enumerate(self.replica_urls)]
        lines.append(f"  redis: {self.redis_url}  (feature store: {self.cfg.feature_store}; reload channel; feedback join)")
        if self.prometheus_url:
            lines.append(f"  prometheus: {self.prometheus_url}  (alerts: {self.prometheus_url}/alerts)")
        lines.append(f"  admin token: {self.admin_token}")
        lines.append(f"  logs and configs: {self.workdir}")
        return "\n".join(lines)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _http_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback URLs we built
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so ``finally`` blocks run."""
    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(cfg: StackConfig) -> int:
    with _stop_on_signals():
        stack = Stack(cfg)
        try:
            stack.start()
            print(f"mtrank stack: {cfg.replicas} replica(s) x {cfg.workers} worker(s) serving {cfg.bundles}\n"
                  f"{stack.describe()}\nCtrl-C stops everything.", flush=True)
            while all(p.popen.poll() is None for p in stack.procs):
                time.sleep(0.5)
            dead = [p for p in stack.procs if p.popen.poll() is not None]
            print(f"mtrank stack: {dead[0].name} exited ({dead[0].popen.returncode}); stopping\n{dead[0].tail()}",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("mtrank stack: stopping", file=sys.stderr)
            return 0
        finally:
            stack.stop()
