"""The service's threads carry their names for the operating system (service.threads)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from service.threads import NAME_BYTES, NamedThread
from tests.service.conftest import clone_bundle, rank_body, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names are read from /proc (Linux)")


def os_name(t: threading.Thread) -> str:
    assert t.native_id is not None and t.is_alive(), t
    return Path(f"/proc/self/task/{t.native_id}/comm").read_text().rstrip("\n")


def test_a_named_thread_takes_its_name_cut_to_the_kernels_limit() -> None:
    release = threading.Event()
    running = [threading.Event(), threading.Event()]  # set by the target, which runs after the renaming

    def target(k: int) -> None:
        running[k].set()
        release.wait()

    long, short = (NamedThread(target=target, args=(k,), name=name, daemon=True)
                   for k, name in enumerate(("mtrank-a-very-long-name", "mtrank-x")))
    for t, started in zip((long, short), running):
        t.start()
        assert started.wait(10)
    try:
        assert os_name(long) == "mtrank-a-very-long-name"[:NAME_BYTES] and len(os_name(long)) == NAME_BYTES
        assert os_name(short) == "mtrank-x"
        assert os_name(threading.current_thread()) != "mtrank-x"  # only the thread itself is renamed
    finally:
        release.set()


def test_a_worker_names_its_threads_for_the_os(tmp_path: Path, base_bundle: Path, start_server: Any) -> None:
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    clone_bundle(base_bundle, bundles, "v1", activate=True)
    clone_bundle(base_bundle, bundles, "shad")
    srv = start_server(bundles, shadow={"sample": 1.0, "version": "shad"}, onnx={"executor_threads": 2})
    with srv.client() as c:
        for k in range(4):
            assert c.post("/rank", json=rank_body(6, request_id=f"t{k}")).status_code == 200
    svc = srv.services
    infer = sorted(svc.executor._threads, key=lambda t: t.name)  # the threads the executor started so far
    assert infer and all(os_name(t) == t.name and t.name.startswith("mtrank-infer_") for t in infer)
    named = {"mtrank-observe": svc.obs._thread, "mtrank-monitor": svc.monitor._thread,
             "mtrank-shadow": svc.shadow.worker._thread, "mtrank-reload": svc.registry._threads[0]}
    # each renames itself first thing in its own thread: by now (requests served) long since, but wait rather than race
    wait_until(lambda: {name: os_name(t) for name, t in named.items()} == {name: name for name in named},
               what="the service's threads named for the OS")
