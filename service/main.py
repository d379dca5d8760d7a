"""Entry points: ``serve()`` (called by ``mtrank serve`` and ``mtrank demo``) and the uvicorn worker factory.

With ``workers > 1`` uvicorn spawns worker processes that build the app from the environment
(``app_from_env``): ``serve`` exports the explicit arguments as ``MTRANK_*`` variables and the
config path as ``MTRANK_CONFIG``, and turns on Prometheus multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``; a fresh temporary directory unless one is set, whose stale files are
cleared) so ``/metrics`` on any worker reports all of them. Unless Redis or a file is configured for the
feedback join (``feedback.*``), the workers share a SQLite file in a fresh temporary directory
(``MTRANK_FEEDBACK__SQLITE_PATH``) so feedback joins whichever worker ranked the request.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from fastapi import FastAPI

from service.settings import Settings, load_settings


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mtrank").setLevel(level.upper())


def create_app(settings: Settings) -> FastAPI:
    from service.app import create_app as _create

    return _create(settings)


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: settings from ``MTRANK_*`` and ``MTRANK_CONFIG``."""
    settings = load_settings()
    _configure_logging(settings.log_level)
    return create_app(settings)


def _multiprocess_dir() -> None:
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not d:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mtrank-prometheus-")
        return
    Path(d).mkdir(parents=True, exist_ok=True)
    for f in Path(d).glob("*.db"):
        f.unlink(missing_ok=True)


def _shared_feedback_file(settings: Settings) -> None:
    """Workers share one SQLite file for the feedback join unless Redis or a file is configured (or memory asked)."""
    from service.feedback import resolve_backend

    if resolve_backend(settings) == "memory" and settings.feedback.backend == "auto":
        path = Path(tempfile.mkdtemp(prefix="mtrank-feedback-")) / "join.sqlite3"
        os.environ["MTRANK_FEEDBACK__SQLITE_PATH"] = str(path)


def serve(bundles_dir: str | Path, host: str | None = None, port: int | None = None,
          config_path: str | Path | None = None, workers: int | str | None = None) -> None:
    """Serve ``bundles_dir`` over HTTP until interrupted. Arguments given win over env, env over the config file."""
    import uvicorn

    given = {k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v is not None}
    settings = load_settings(config_path, bundles_dir=Path(bundles_dir).resolve(), **given)
    _configure_logging(settings.log_level)
    common = {"host": settings.host, "port": settings.port, "log_level": settings.log_level, "access_log": False,
              "lifespan": "on", "timeout_graceful_shutdown": 10}
    if settings.workers > 1:
        os.environ["MTRANK_BUNDLES_DIR"] = str(settings.bundles_dir)
        os.environ["MTRANK_HOST"], os.environ["MTRANK_PORT"] = settings.host, str(settings.port)
        os.environ["MTRANK_WORKERS"] = str(settings.workers)  # the workers' onnx threads: cores per worker
        os.environ["MTRANK_ONNX__INTRA_OP_THREADS"] = str(settings.onnx.intra_op_threads)
        if config_path:
            os.environ["MTRANK_CONFIG"] = str(Path(config_path).resolve())
        _multiprocess_dir()
        _shared_feedback_file(settings)
        uvicorn.run("service.main:app_from_env", factory=True, workers=settings.workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)
