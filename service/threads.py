"""The service's threads named for the operating system too, so per-thread tools can tell them apart.

Python 3.11 keeps ``threading.Thread.name`` to itself: the kernel knows every thread of a worker by the
process's name (``python``), so ``top -H``, ``ps -L``, ``/proc/<pid>/task/<tid>/comm``, ``perf`` and ``gdb``
cannot tell the inference executor from the event loop or from a library's own threads (onnxruntime's pool,
numpy's BLAS). :class:`NamedThread` and :func:`name_native_thread` (a ``ThreadPoolExecutor`` initializer) give
the calling thread its Python name, cut to the kernel's 15 bytes (``mtrank-infer_0``, ``mtrank-observe``,
``mtrank-monitor``...: the names are chosen to fit). Any other thread of a worker keeps ``python``; the event loop
is the one whose thread id is the process id. ``docs/service.md`` ("Threads") lists them;
``benchmarks/serve_peers.py`` reads the split of a worker's CPU among them. A no-op where ``prctl`` is missing.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any

PR_SET_NAME = 15  # linux/prctl.h
NAME_BYTES = 15  # the kernel's limit (TASK_COMM_LEN 16, with the terminating zero)


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).prctl  # the C library the interpreter is linked with
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def name_native_thread(name: str | None = None) -> None:
    """The calling thread's OS name set to ``name`` (default: its ``threading`` name), UTF-8 cut to 15 bytes."""
    if _PRCTL is None:
        return
    raw = (name if name is not None else threading.current_thread().name).encode("utf-8", "replace")[:NAME_BYTES]
    _PRCTL(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)


class NamedThread(threading.Thread):
    """A ``threading.Thread`` that names itself for the OS (:func:`name_native_thread`) before its target runs."""

    def run(self) -> None:
        name_native_thread()
        super().run()
