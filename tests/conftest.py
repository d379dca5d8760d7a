"""Shared fixtures: a tiny trained run on synthetic data and a bundle factory.

Tests that need an external binary (redis-server, prometheus) call ``require_binary``: it skips
when the binary is absent, unless MTRANK_REQUIRE_BINARIES=1 (set by CI), where it fails instead.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest

from mtrank.config import Config, apply_overrides, parse_config

TINY_OVERRIDES = ["train.epochs=2", "train.threads=1", "train.batch_size=512", "train.progress=false", "model.expert_hidden=[16]",
                  "model.tower_hidden=[8]", "model.embedding_dim=4", "model.n_experts=3"]


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("MTRANK_REQUIRE_BINARIES") == "1":
            pytest.fail(f"{name} is required (MTRANK_REQUIRE_BINARIES=1) but not on PATH")
        pytest.skip(f"{name} not on PATH")
    return path


def demo_config(data_path: Path, overrides: list[str] | None = None) -> Config:
    from model.synthetic import DEMO_CONFIG

    raw = json.loads(json.dumps(DEMO_CONFIG))
    raw["data"]["train"] = [str(data_path)]
    return parse_config(apply_overrides(raw, [*TINY_OVERRIDES, *(overrides or [])]), base_dir=data_path.parent)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.synthetic import write

    path = tmp_path_factory.mktemp("data") / "demo.parquet"
    write(path, 6000, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """A trained MMoE run on 6k synthetic rows (session-scoped: trained once)."""
    from model.train import train

    run = tmp_path_factory.mktemp("tiny_run")
    train(demo_config(demo_data, ["model.arch=mmoe"]), run)
    return run


_versions = itertools.count(1)


@pytest.fixture
def make_bundle(tiny_run: Path):
    """make_bundle(bundles_dir, version=None, activate=True) -> bundle dir exported from ``tiny_run``."""
    from model.export import export_run

    def make(bundles_dir: Path, version: str | None = None, activate: bool = True) -> Path:
        return export_run(tiny_run, bundles_dir, version=version or f"v{next(_versions):03d}", activate=activate)

    return make
