"""The monitoring files: Prometheus config and alert rules, their promtool unit tests, Grafana
provisioning and the generated dashboard.

* promtool accepts the config and the rules, and the unit tests (tests/prometheus/alerts_test.yml) pass;
  promtool skips locally when absent and fails in CI (MTRANK_REQUIRE_BINARIES=1).
* Every alert follows alerts.yml's conventions (``<LHS> <op> <number>``, ``for``, severity, summary and
  description) and has a firing and a quiet unit-test case.
* docker/grafana/dashboards/mtrank.json is exactly what docker/grafana/dashboard.py builds, uses the
  provisioned datasource uid everywhere, and its template variables only as regex matchers.
* Every ``mtrank_*`` name in the alerts, their unit tests and the dashboard is exposed by a declaration in
  service/metrics.py, so renaming a metric in code without renaming it here fails at once. (That each
  query returns series from a live service is the Prometheus integration test's job.)
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_binary
from tests.promql import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARD_JSON,
    GRAFANA_DASHBOARDS,
    GRAFANA_DATASOURCES,
    PROMETHEUS_CONFIG,
    REPO,
    SERVICE_METRICS,
    alert_lhs,
    alert_rules,
    dashboard_exprs,
    dashboard_module,
    dashboard_targets,
    exposed_metrics,
    histograms_without_sum,
    metric_names,
)

SEVERITIES = {"warning", "critical"}
TEMPLATE_VARIABLES = ("task", "level")


def promtool(*args: str | Path) -> None:
    binary = require_binary("promtool")
    proc = subprocess.run([binary, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text())


def require_generator() -> Any:
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk (dev extra) is not installed")
    return dashboard_module()


# ------------------------------------------------------------------------------------ Prometheus


def test_promtool_accepts_the_config_and_its_rule_files() -> None:
    promtool("check", "config", PROMETHEUS_CONFIG.relative_to(REPO))


def test_promtool_accepts_the_alert_rules() -> None:
    promtool("check", "rules", ALERTS.relative_to(REPO))


def test_alert_unit_tests_pass() -> None:
    promtool("test", "rules", ALERTS_TEST.relative_to(REPO))


def test_prometheus_scrapes_the_service_and_loads_the_alerts() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "mtrank"]
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "15s"
    assert job["static_configs"] == [{"targets": ["mtrank-1:8000", "mtrank-2:8000"]}]  # the replicas of docker-compose.yml


def test_every_alert_follows_the_conventions() -> None:
    rules = alert_rules(ALERTS)
    names = [rule["name"] for rule in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    assert [group["name"] for group in load_yaml(ALERTS)["groups"]] == ["mtrank"]
    for rule in rules:
        lhs = alert_lhs(rule["expr"])  # raises unless the expr is `<LHS> <op> <number>`
        assert lhs and lhs != rule["expr"], rule["name"]
        assert rule["for"] is not None, f"{rule['name']}: no `for` (write `for: 0m` to fire at once)"
        assert rule["labels"].get("severity") in SEVERITIES, f"{rule['name']}: severity not in {SEVERITIES}"
        for key in ("summary", "description"):
            assert str(rule["annotations"].get(key, "")).strip(), f"{rule['name']}: no annotations.{key}"


@pytest.mark.parametrize(("expr", "lhs"), [
    ("min by (check) (mtrank_routing_check) == 0", "min by (check) (mtrank_routing_check)"),
    ('(sum(rate(x{status=~"5.."}[5m])) or vector(0)) / sum(rate(x[5m])) > 0.01',
     '(sum(rate(x{status=~"5.."}[5m])) or vector(0)) / sum(rate(x[5m]))'),
    ("histogram_quantile(0.99, sum by (le) (rate(b[5m])))\n  >= 2.5e-1\n", "histogram_quantile(0.99, sum by (le) (rate(b[5m])))"),
    ("a != -1", "a"),
    ("a<=.5", "a"),
])
def test_alert_lhs_strips_the_trailing_comparison(expr: str, lhs: str) -> None:
    assert alert_lhs(expr) == lhs


@pytest.mark.parametrize("expr", ["up", "a > b", "a > bool 1", "a > 1 and b", "> 1", "a > 1m"])
def test_alert_lhs_rejects_other_shapes(expr: str) -> None:
    with pytest.raises(ValueError):
        alert_lhs(expr)


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    tests = load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == ["../../docker/prometheus/alerts.yml"]
    for group in tests["tests"]:
        for case in group.get("alert_rule_test") or []:
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
            for alert in case.get("exp_alerts") or []:
                annotations = alert.get("exp_annotations") or {}
                assert {"summary", "description"} <= annotations.keys(), f"{group['name']}: check the annotations"
    names = {rule["name"] for rule in alert_rules(ALERTS)}
    assert names - firing == set(), "alerts without a unit test where they fire"
    assert names - quiet == set(), "alerts without a unit test where they stay quiet (exp_alerts: [])"
    assert (firing | quiet) - names == set(), "unit tests of alerts that do not exist"


# ------------------------------------------------------------------------------------ Grafana


def test_grafana_provisioning() -> None:
    [source] = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert {k: source[k] for k in ("name", "type", "uid", "url", "isDefault")} == {
        "name": "Prometheus", "type": "prometheus", "uid": "mtrank-prometheus", "url": "http://prometheus:9090",
        "isDefault": True}
    [provider] = load_yaml(GRAFANA_DASHBOARDS)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD_JSON.parent == REPO / "docker" / "grafana" / "dashboards"  # what compose mounts there


def test_dashboard_json_is_the_generator_output() -> None:
    generator = require_generator()
    assert dashboard() == generator.build(), "docker/grafana/dashboards/mtrank.json is stale: run python docker/grafana/dashboard.py"
    assert DASHBOARD_JSON.read_text() == generator.render()


def test_dashboard_uses_the_provisioned_datasource_everywhere() -> None:
    [source] = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    expected = {"type": "prometheus", "uid": source["uid"]}
    board = dashboard()
    assert (board["uid"], board["title"]) == ("mtrank-overview", "mtrank")
    panels = [inner for panel in board["panels"] for inner in [panel, *panel.get("panels", [])]]
    assert len(panels) > 20
    for panel in panels:
        assert panel.get("datasource") == expected, f"panel {panel.get('title')!r}: {panel.get('datasource')}"
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel.get('title')!r} has no query"
        for target in panel.get("targets", []):
            assert target.get("datasource") == expected, f"panel {panel.get('title')!r}, target {target.get('refId')}"
    for variable in board["templating"]["list"]:
        assert variable.get("datasource") == expected, f"variable {variable['name']}"


def test_dashboard_template_variables_are_regex_matchers() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert set(variables) == set(TEMPLATE_VARIABLES)
    for variable in variables.values():
        assert variable["type"] == "query" and variable["query"].startswith("label_values(")
        assert (variable["multi"], variable["includeAll"], variable["allValue"]) == (True, True, ".*")
    exprs = [target["expr"] for target in dashboard_targets(dashboard())]
    used = set()
    for expr in exprs:
        for name in TEMPLATE_VARIABLES:
            as_regex = f'=~"${name}"'
            used |= {name} if as_regex in expr else set()
            rest = expr.replace(as_regex, "")
            assert not re.search(rf"\$\{{?{name}\b", rest), f"${name} used other than as =~\"${name}\": {expr}"
    assert used == set(TEMPLATE_VARIABLES)


def test_dashboard_exprs_are_ready_for_prometheus() -> None:
    require_generator()
    raw = [target["expr"] for target in dashboard_targets(dashboard())]
    exprs = dashboard_exprs(DASHBOARD_JSON)
    assert len(exprs) == len(raw) > 30
    for expr in exprs:
        assert "$" not in expr, expr
        assert expr.count("(") == expr.count(")"), expr
    assert any("[1m]" in expr for expr in exprs) and any('=~".*"' in expr for expr in exprs)


def test_dashboard_exprs_parse(tmp_path: Path) -> None:
    """promtool parses each (substituted) query as a recording rule: a PromQL syntax check without a server."""
    require_generator()
    rules = [{"record": f"mtrank_dashboard:query{i}", "expr": expr} for i, expr in enumerate(dashboard_exprs(DASHBOARD_JSON))]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", path)


def test_queries_only_use_metrics_the_service_exposes() -> None:
    exposed = exposed_metrics(SERVICE_METRICS.read_text(), histograms_without_sum())
    assert "mtrank_http_requests_total" in exposed and "mtrank_http_request_duration_seconds_bucket" in exposed
    used: dict[str, set[str]] = {}
    for rule in alert_rules(ALERTS):
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['name']}")
    for group in load_yaml(ALERTS_TEST)["tests"]:
        for series in group.get("input_series") or []:
            for name in metric_names(series["series"].split("{")[0]):
                used.setdefault(name, set()).add(f"unit test {group['name']!r}")
    for target in dashboard_targets(dashboard()):
        for name in metric_names(target["expr"]):
            used.setdefault(name, set()).add("dashboard")
    unknown = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert not unknown, f"metrics not declared in service/metrics.py: {unknown}"


# ------------------------------------------------------------------------------ docs/metrics.md

METRICS_DOC = REPO / "docs" / "metrics.md"


def doc_promql() -> list[str]:
    """The PromQL of docs/metrics.md's tables: backticked spans holding a query (a call or a comparison)."""
    spans = re.findall(r"`([^`]+)`", METRICS_DOC.read_text())
    return [s for s in spans if "mtrank_" in s and ("(" in s or " == " in s or " > " in s)]


def test_every_metric_is_documented() -> None:
    declared = {name for _, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(mtrank_[a-z0-9_]+)\"",
                                               SERVICE_METRICS.read_text())}
    assert len(declared) > 30
    text = METRICS_DOC.read_text()
    missing = sorted(n for n in declared if f"`{n}`" not in text)
    assert not missing, f"metrics missing from docs/metrics.md: {missing}"


def test_documented_promql_parses_and_uses_exposed_metrics(tmp_path: Path) -> None:
    exprs = doc_promql()
    assert len(exprs) > 25
    exposed = exposed_metrics(SERVICE_METRICS.read_text(), histograms_without_sum())
    unknown = {n for e in exprs for n in metric_names(e) if n not in exposed}
    assert not unknown, f"docs/metrics.md queries metrics the service does not expose: {sorted(unknown)}"
    rules = [{"record": f"mtrank_doc:query{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "doc_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "docs", "rules": rules}]}))
    promtool("check", "rules", path)
