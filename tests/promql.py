"""PromQL helpers for the monitoring files, shared by tests/test_alerting.py and the Prometheus
integration test.

* ``alert_rules(path)``: every alerting rule of a Prometheus rule file, as dicts with ``name``,
  ``expr``, ``for``, ``labels``, ``annotations`` (group order, then rule order).
* ``alert_lhs(expr)``: the LHS of an alert expr written ``<LHS> <op> <number>`` (docker/prometheus/
  alerts.yml's convention): the expression without its trailing comparison. Raises ``ValueError`` for an
  expr that does not end in such a comparison, or that compares with ``bool``.
* ``dashboard_targets(dashboard)``: every query target (dict) of a dashboard JSON model, rows' nested
  panels included, as written (Grafana variables not substituted).
* ``dashboard_exprs(path)``: every target expr of a dashboard JSON file with Grafana's built-ins and
  template variables substituted (``$__rate_interval`` -> ``1m``, ``$task`` -> ``.*``, ...), ready to send
  to Prometheus. Delegates to ``docker/grafana/dashboard.py`` (loaded with importlib; it imports
  grafana-foundation-sdk, a dev dependency: ``ImportError`` without it).
* ``metric_names(expr)`` / ``exposed_metrics(source, histograms_without_sum)``: the ``mtrank_*`` names a
  PromQL expr uses, and the sample names the ``prometheus_client`` declarations in a source text
  (service/metrics.py) expose (counters ``*_total``, histograms ``*_bucket`` / ``*_sum`` / ``*_count``,
  gauges as named). prometheus_client drops ``*_sum`` of a histogram whose lowest bucket is negative:
  ``histograms_without_sum()`` finds those in ``service.metrics.Metrics``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "tests" / "prometheus" / "alerts_test.yml"
DASHBOARD_GENERATOR = REPO / "docker" / "grafana" / "dashboard.py"
DASHBOARD_JSON = REPO / "docker" / "grafana" / "dashboards" / "mtrank.json"
GRAFANA_DATASOURCES = REPO / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = REPO / "docker" / "grafana" / "provisioning" / "dashboards" / "mtrank.yml"
SERVICE_METRICS = REPO / "service" / "metrics.py"

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_COMPARISON = re.compile(rf"^(?P<lhs>.*?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<number>{_NUMBER})\s*$", re.DOTALL)
_METRIC = re.compile(r"\bmtrank_[a-z0-9_]+")
_DECLARATION = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*[\"'](mtrank_[a-z0-9_]+)[\"']")


def alert_rules(path: Path | str = ALERTS) -> list[dict[str, Any]]:
    doc = yaml.safe_load(Path(path).read_text())
    return [{"name": rule["alert"], "expr": str(rule["expr"]).strip(), "for": rule.get("for"),
             "labels": rule.get("labels") or {}, "annotations": rule.get("annotations") or {}}
            for group in doc.get("groups") or [] for rule in group.get("rules") or [] if "alert" in rule]


def alert_lhs(expr: str) -> str:
    match = _COMPARISON.match(expr.strip())
    if match is None or not match["lhs"].strip():
        raise ValueError(f"alert expr is not '<LHS> <op> <number>': {expr!r}")
    lhs = match["lhs"].strip()
    if re.search(r"\bbool$", lhs):
        raise ValueError(f"alert expr compares with 'bool' (always returns series): {expr!r}")
    return lhs


def dashboard_targets(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            found.extend(inner.get("targets", []))
    return found


@functools.cache
def dashboard_module() -> ModuleType:
    """docker/grafana/dashboard.py as a module (docker/ is not a package)."""
    name = "mtrank_grafana_dashboard"
    spec = importlib.util.spec_from_file_location(name, DASHBOARD_GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def dashboard_exprs(path: Path | str = DASHBOARD_JSON) -> list[str]:
    return list(dashboard_module().dashboard_exprs(json.loads(Path(path).read_text())))


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def exposed_metrics(source: str, histograms_without_sum: frozenset[str] = frozenset()) -> dict[str, str]:
    """Sample name -> declaring type (``Counter``, ...) for every declaration in ``source``."""
    suffixes = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count"),
                "Summary": ("", "_sum", "_count")}
    exposed: dict[str, str] = {}
    for kind, name in _DECLARATION.findall(source):
        base = name.removesuffix("_total") if kind == "Counter" else name
        for suffix in suffixes[kind]:
            if not (suffix == "_sum" and kind == "Histogram" and name in histograms_without_sum):
                exposed[base + suffix] = kind
    return exposed


def histograms_without_sum() -> frozenset[str]:
    """Histograms of ``service.metrics.Metrics`` whose lowest bucket is negative (no ``_sum`` sample)."""
    from prometheus_client import Histogram

    from service.metrics import Metrics

    histograms = [value for value in vars(Metrics()).values() if isinstance(value, Histogram)]
    return frozenset(h._name for h in histograms if h._upper_bounds[0] < 0)  # private: no public accessor
