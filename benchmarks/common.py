"""What every benchmark script shares: progress lines, the working directory, another revision's tree, the docs
section writer, mean and sample std."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DOC_TITLE = "# Benchmarks"
ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def working_dir(path: str | None, prefix: str) -> Iterator[Path]:
    """A benchmark's working directory, absolute: ``path`` (``--workdir``: created if missing, kept, so a later run
    reuses what it holds), else a temporary directory removed on exit."""
    if path:
        work = Path(path).resolve()
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp).resolve()


@contextmanager
def revision_tree(rev: str | None, path: Path) -> Iterator[Path]:
    """The code of revision ``rev`` (an A/B's side): this checkout for None, else a detached git worktree of ``rev``
    at ``path`` with its C extensions built in place (the ``ext-modules`` of its pyproject.toml, if any), removed on
    exit."""
    if rev is None:
        yield ROOT
        return
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(path), rev], check=True)
    try:
        if "ext-modules" in (path / "pyproject.toml").read_text():
            subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_ext", "--inplace"],
                           cwd=path, check=True)
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def write_docs(path: Path, section: str, start: str, end: str) -> None:
    """Replace only the text between the markers ``start`` / ``end`` (re-read right before writing; the
    section includes them); append the section at the end when they are missing."""
    text = path.read_text() if path.exists() else f"{DOC_TITLE}\n"
    i, j = text.find(start), text.find(end)
    if 0 <= i < j:
        text = text[:i] + section + text[j + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return float(statistics.fmean(xs)), (float(statistics.stdev(xs)) if len(xs) > 1 else 0.0)
