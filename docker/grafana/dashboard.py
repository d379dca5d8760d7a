"""The mtrank Grafana dashboard, generated from code with grafana-foundation-sdk.

    python docker/grafana/dashboard.py            # writes docker/grafana/dashboards/mtrank.json
    python docker/grafana/dashboard.py --check    # exits 1 when the committed JSON differs from build()

Contracts (checked by tests/test_alerting.py; the Prometheus integration test runs every query):

* ``build() -> dict`` is the dashboard JSON model, deterministic: uid ``mtrank-overview``, title
  ``mtrank``, panel ids 1..n in layout order. The committed ``dashboards/mtrank.json`` is exactly
  ``build()``; edit this file and regenerate, never the JSON.
* Every panel, row, template variable and query uses the datasource ``{type: prometheus, uid:
  mtrank-prometheus}``, the uid provisioned in ``provisioning/datasources/prometheus.yml``.
* Template variables ``task`` and ``level`` are multi-value with "All" = ``.*`` and are only used as
  regex matchers (``task=~"$task"``). The Gates row repeats per selected level and its weight panels
  per selected task, so each stacked chart is one gate (its expert weights add up to 1).
* Queries use only metrics of ``service/metrics.py`` and only the Grafana built-ins ``$__rate_interval``
  and ``$__interval``. ``dashboard_exprs(dashboard)`` returns every query with those and the template
  variables replaced (``1m``, ``15s``, ``.*``), ready to send to Prometheus.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import heatmap as heatmap_models
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DASHBOARD_UID = "mtrank-overview"
DATASOURCE_UID = "mtrank-prometheus"
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
OUTPUT = Path(__file__).resolve().parent / "dashboards" / "mtrank.json"

# Grafana built-ins and what dashboard_exprs() puts in their place (the scrape interval is 15s).
BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s"}
TEMPLATE_VARIABLES = ("task", "level")  # multi-value, All = ".*", used only inside =~"..."

RI = "$__rate_interval"
TASK = '{task=~"$task"}'
GATE = '{task=~"$task", level=~"$level"}'

# Alert thresholds drawn on panels (docker/prometheus/alerts.yml).
ECE_THRESHOLD = 0.05
PSI_THRESHOLD = 0.2
ERROR_RATIO_THRESHOLD = 0.01

PanelBuilder = TypeVar("PanelBuilder", timeseries.Panel, stat.Panel, statetimeline.Panel, heatmap.Panel, table.Panel)


@dataclass(frozen=True)
class Query:
    """One Prometheus target: range query as time series unless ``instant`` / ``fmt`` say otherwise."""

    expr: str
    legend: str = ""
    instant: bool = False
    fmt: PromQueryFormat = PromQueryFormat.TIME_SERIES


# ------------------------------------------------------------------------------------ PromQL helpers


def rate(metric: str, by: str = "", selector: str = "") -> str:
    """``sum by (by) (rate(metric{selector}[$__rate_interval]))`` (``sum(...)`` without ``by``)."""
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({metric}{selector}[{RI}]))"


def quantile(q: float, histogram: str, by: str = "", selector: str = "") -> str:
    """``histogram_quantile`` of a histogram's ``_bucket`` series, summed over everything but ``le, by``."""
    by_le = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, {rate(f'{histogram}_bucket', by_le, selector)})"


def histogram_mean(histogram: str, by: str = "", selector: str = "") -> str:
    """Mean observation per interval: rate of ``_sum`` over rate of ``_count``."""
    return f"{rate(f'{histogram}_sum', by, selector)} / {rate(f'{histogram}_count', by, selector)}"


def thresholds(*steps: tuple[float | None, str]) -> dashboard_builders.ThresholdsConfig:
    return (dashboard_builders.ThresholdsConfig().mode(dashboard_models.ThresholdsMode.ABSOLUTE)
            .steps([dashboard_models.Threshold(value=value, color=color) for value, color in steps]))


# ------------------------------------------------------------------------------------ panel helpers


def targets(queries: Sequence[Query]) -> list[Builder[Any]]:
    built: list[Builder[Any]] = []
    for i, q in enumerate(queries):
        target = (prometheus.Dataquery().ref_id(chr(ord("A") + i)).datasource(DATASOURCE).expr(q.expr)
                  .legend_format(q.legend or "__auto").format(q.fmt))
        built.append(target.instant() if q.instant else target.range())
    return built


def configure(panel: PanelBuilder, title: str, description: str, queries: Sequence[Query], *, unit: str,
              width: int, height: int) -> PanelBuilder:
    """What every panel has: title, description, the datasource, its targets, unit and size."""
    return (panel.title(title).description(description).datasource(DATASOURCE).targets(targets(queries))
            .unit(unit).span(width).height(height))


def timeseries_panel(title: str, description: str, queries: Sequence[Query], *, unit: str = "short",
                     stacked: bool = False, ratio: bool = False, threshold: float | None = None,
                     repeat: str | None = None, width: int = 8, height: int = 8) -> timeseries.Panel:
    """A line chart. ``ratio``: axis 0..1 as percent; ``stacked``: areas adding up (a gate's weights);
    ``threshold``: a dashed red line (an alert threshold); ``repeat``: one copy per variable value."""
    panel = configure(timeseries.Panel(), title, description, queries, unit="percentunit" if ratio else unit,
                      width=width, height=height)
    panel = (panel.line_width(1).fill_opacity(10).show_points(common.VisibilityMode.NEVER)
             .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                      .sort(common.SortOrder.DESCENDING)))
    if ratio:
        panel = panel.min(0).max(1)
    if stacked:
        panel = panel.fill_opacity(60).stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    if threshold is not None:
        panel = panel.thresholds(thresholds((None, "green"), (threshold, "red"))).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
    if repeat is not None:
        panel = panel.repeat(repeat).repeat_direction("h").max_per_row(4)
    return panel


def info_panel(title: str, description: str, query: Query, *, width: int = 8, height: int = 5) -> stat.Panel:
    """A stat panel showing the legend (e.g. ``{{version}}``) of each series of an info gauge."""
    return (configure(stat.Panel(), title, description, [query], unit="none", width=width, height=height)
            .text_mode(common.BigValueTextMode.NAME).color_mode(common.BigValueColorMode.NONE)
            .graph_mode(common.BigValueGraphMode.NONE)
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))


def pass_fail_panel(title: str, description: str, query: Query, *, width: int = 24, height: int = 10
                    ) -> statetimeline.Panel:
    """A state timeline of 1 (PASS, green) / 0 (FAIL, red) series; NaN (not evaluated yet) is grey."""
    mappings: list[dashboard_models.ValueMapping] = [
        dashboard_models.ValueMap(options={
            "0": dashboard_models.ValueMappingResult(text="FAIL", color="red", index=0),
            "1": dashboard_models.ValueMappingResult(text="PASS", color="green", index=1),
        }),
        dashboard_models.SpecialValueMap(options=dashboard_models.DashboardSpecialValueMapOptions(
            match=dashboard_models.SpecialValueMatch.NA_N,
            result=dashboard_models.ValueMappingResult(text="not evaluated", color="text", index=2))),
    ]
    return (configure(statetimeline.Panel(), title, description, [query], unit="none", width=width, height=height)
            .mappings(mappings).thresholds(thresholds((None, "red"), (1, "green")))
            .color_scheme(dashboard_builders.FieldColor().mode(dashboard_models.FieldColorModeId.THRESHOLDS))
            .show_value(common.VisibilityMode.NEVER).merge_values(True)
            .legend(common_builders.VizLegendOptions().show_legend(False)))


def heatmap_panel(title: str, description: str, query: Query, *, unit: str = "none", width: int = 12,
                  height: int = 8) -> heatmap.Panel:
    """A heatmap of a histogram's pre-computed buckets (``format: heatmap``, ``le`` layout)."""
    return (configure(heatmap.Panel(), title, description, [query], unit="short", width=width, height=height)
            .calculate(False).rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
            .y_axis(heatmap.YAxisConfig().unit(unit))
            .color(heatmap.HeatmapColorOptions().mode(heatmap_models.HeatmapColorMode.SCHEME).scheme("Oranges")
                   .scale(heatmap_models.HeatmapColorScale.EXPONENTIAL)))


def table_panel(title: str, description: str, queries: Sequence[Query], *, columns: Sequence[str],
                width: int = 12, height: int = 10) -> table.Panel:
    """Instant queries merged into one table on their common labels; ``columns`` names the value column
    of each query (Grafana's ``Value #<refId>``), the time column is hidden."""
    renames = {f"Value #{chr(ord('A') + i)}": name for i, name in enumerate(columns)}
    return (configure(table.Panel(), title, description, queries, unit="none", width=width, height=height)
            .decimals(3)
            .with_transformation(dashboard_models.DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(dashboard_models.DataTransformerConfig(id_val="organize", options={
                "excludeByName": {"Time": True}, "renameByName": renames})))


def row(title: str, repeat: str | None = None) -> dashboard_builders.Row:
    built = dashboard_builders.Row(title).datasource(DATASOURCE)
    return built.repeat(repeat) if repeat else built


Section = tuple[dashboard_builders.Row, list[Builder[dashboard_models.Panel]]]


# ------------------------------------------------------------------------------------ rows


def traffic() -> Section:
    latency = "mtrank_http_request_duration_seconds"
    errors = rate("mtrank_http_requests_total", selector='{status=~"5.."}')
    return row("Traffic & latency"), [
        timeseries_panel("Requests / s by route and status", "All HTTP requests (route template, status code).",
                         [Query(rate("mtrank_http_requests_total", "route, status"), "{{route}} {{status}}")],
                         unit="reqps"),
        timeseries_panel("/rank latency", "Quantiles of /rank latency over all instances.",
                         [Query(quantile(q, latency, selector='{route="/rank"}'), f"p{round(q * 100)}")
                          for q in (0.5, 0.95, 0.99)], unit="s"),
        timeseries_panel("/rank p99 by stage", "features: columns + encoding; inference: the ONNX run; "
                         "observe: gate/calibration/drift bookkeeping.",
                         [Query(quantile(0.99, "mtrank_rank_stage_seconds", "stage"), "{{stage}}")], unit="s"),
        timeseries_panel("Candidates per /rank", "Median (from the histogram buckets) and mean candidates.",
                         [Query(quantile(0.5, "mtrank_rank_candidates"), "p50"),
                          Query(histogram_mean("mtrank_rank_candidates"), "mean")]),
        timeseries_panel("5xx ratio", "Share of HTTP responses that are 5xx (alert MtrankHigh5xxRate above the line).",
                         [Query(f'({errors} or vector(0)) / {rate("mtrank_http_requests_total")}', "5xx")],
                         unit="percentunit", threshold=ERROR_RATIO_THRESHOLD),
    ]


def gates() -> Section:
    per_gate = "level, task"

    def share(counter: str) -> str:
        return (f"{rate(counter, 'level, task, expert', GATE)} / on ({per_gate}) group_left "
                f"{rate('mtrank_gate_candidates_total', per_gate, GATE)}")

    return row("Gates (level $level)", repeat="level"), [
        timeseries_panel("Mean gate weight: $task", "Mean weight this gate gives each expert (adds up to 1).",
                         [Query(share("mtrank_gate_weight_total"), "{{expert}}")],
                         ratio=True, stacked=True, repeat="task", width=24),
        timeseries_panel("Top-1 share: $task", "Share of candidates whose largest gate weight is this expert; "
                         "an expert at 0 is dead, one near 1 means the gate collapsed.",
                         [Query(share("mtrank_gate_top1_total"), "{{expert}}")],
                         ratio=True, stacked=True, repeat="task", width=24),
        timeseries_panel("Mean normalised gate entropy", "0 = every candidate routed to one expert, 1 = uniform.",
                         [Query(histogram_mean("mtrank_gate_entropy", per_gate, GATE), "L{{level}} {{task}}")],
                         ratio=True, width=12),
        heatmap_panel("Normalised gate entropy per candidate", "Distribution of the per-candidate entropy "
                      "of the selected gates.",
                      Query(rate("mtrank_gate_entropy_bucket", "le", GATE), "{{le}}", fmt=PromQueryFormat.HEATMAP)),
    ]


def routing() -> Section:
    return row("Routing"), [
        pass_fail_panel("Routing checks", "1 = pass, 0 = fail (alert MtrankRoutingCheckFailing after 10 minutes), "
                        "NaN = not evaluated yet; per check and gate, against the bundle's reference gate statistics.",
                        Query(f"min by (check, level, task) (mtrank_routing_check{GATE})",
                              "{{check}} L{{level}} {{task}}")),
        timeseries_panel("Routing divergence", "Jensen-Shannon divergence (bits) of live vs reference mean "
                         "expert weights over the monitoring window.",
                         [Query(f"max by (level, task) (mtrank_routing_divergence{GATE})", "L{{level}} {{task}}")]),
        timeseries_panel("Failed check evaluations / s", "How often each routing check fails its evaluation.",
                         [Query(rate("mtrank_routing_check_failures_total", "check, level, task", GATE),
                                "{{check}} L{{level}} {{task}}")]),
        timeseries_panel("Candidates in the monitoring window", "Candidates the routing, calibration and drift "
                         "checks are computed over, per instance.",
                         [Query("max by (instance) (mtrank_monitor_window_candidates)", "{{instance}}")]),
    ]


def calibration() -> Section:
    def per_bucket(counter: str) -> str:
        return f"sum by (task, bucket) (increase({counter}{TASK}[1h]))"

    labeled = per_bucket("mtrank_calibration_labeled_total")
    return row("Calibration"), [
        table_panel("Reliability, last hour", "Per served-score bucket: the observed positive rate of the joined "
                    "feedback vs the mean served probability (calibrated: the two agree).",
                    [Query(f"{per_bucket('mtrank_calibration_positives_total')} / {labeled}", instant=True,
                           fmt=PromQueryFormat.TABLE),
                     Query(f"{per_bucket('mtrank_calibration_labeled_probability_total')} / {labeled}", instant=True,
                           fmt=PromQueryFormat.TABLE),
                     Query(labeled, instant=True, fmt=PromQueryFormat.TABLE)],
                    columns=["observed rate", "mean predicted", "labels"]),
        timeseries_panel("Expected calibration error", "ECE of the joined feedback over the monitoring window "
                         "(alert MtrankCalibrationDrift above the line).",
                         [Query(f"max by (task) (mtrank_calibration_ece{TASK})", "{{task}}")],
                         threshold=ECE_THRESHOLD, width=12, height=10),
        timeseries_panel("Served scores per calibration bucket", "Share of served scores in each bucket, per task.",
                         [Query(f"{rate('mtrank_calibration_predictions_total', 'task, bucket', TASK)} / on (task) "
                                f"group_left {rate('mtrank_calibration_predictions_total', 'task', TASK)}",
                                "{{task}} {{bucket}}")], ratio=True, width=24),
    ]


def drift() -> Section:
    return row("Drift"), [
        timeseries_panel("Score PSI vs reference", "Population stability index of served scores against the "
                         "bundle's reference histogram (alert MtrankScoreDrift above the line).",
                         [Query(f"max by (task) (mtrank_score_psi{TASK})", "{{task}}")],
                         threshold=PSI_THRESHOLD, width=12),
        timeseries_panel("Served scores per reference bin", "Share of served scores in each bin of the reference "
                         "histogram, per task.",
                         [Query(f"{rate('mtrank_score_bucket_total', 'task, bucket', TASK)} / on (task) group_left "
                                f"{rate('mtrank_score_bucket_total', 'task', TASK)}", "{{task}} {{bucket}}")],
                         ratio=True, width=12),
    ]


def experiments() -> Section:
    served = "mtrank_experiment_served_total"
    return row("Experiments"), [
        timeseries_panel("Items served / s per arm", "Items returned by /rank per experiment arm.",
                         [Query(rate(served, "arm"), "{{arm}}")]),
        timeseries_panel("Positives per served item", "Joined positive labels per served item, per arm and task.",
                         [Query(f"{rate('mtrank_experiment_positives_total', 'arm, task', TASK)} / on (arm) "
                                f"group_left {rate(served, 'arm')}", "{{arm}} {{task}}")], unit="percentunit"),
        timeseries_panel("/rank requests / s by fusion profile and arm", "",
                         [Query(rate("mtrank_fusion_requests_total", "profile, arm"), "{{profile}} ({{arm}})")],
                         unit="reqps"),
    ]


def shadow() -> Section:
    return row("Shadow"), [
        info_panel("Shadow model", "The shadow version each instance scores with.",
                   Query("max by (version, arch) (mtrank_shadow_info) > 0", "{{version}} ({{arch}})"), height=8),
        timeseries_panel("Shadow requests / s by result", "scored, error or dropped.",
                         [Query(rate("mtrank_shadow_requests_total", "result"), "{{result}}")], unit="reqps"),
        timeseries_panel("Shadow p99 latency", "Shadow scoring time vs the primary model's inference stage.",
                         [Query(quantile(0.99, "mtrank_shadow_duration_seconds"), "shadow p99"),
                          Query(quantile(0.99, "mtrank_rank_stage_seconds", selector='{stage="inference"}'),
                                "primary inference p99")], unit="s"),
        # Quantiles, not the mean: prometheus_client exposes no _sum for a histogram with a negative bucket.
        timeseries_panel("Rank correlation", "Spearman correlation of primary and shadow fused scores per request: "
                         "median and the 10th percentile (the requests the two models rank most differently).",
                         [Query(quantile(q, "mtrank_shadow_rank_correlation"), f"p{round(q * 100)}")
                          for q in (0.5, 0.1)]),
        timeseries_panel("Top-k overlap (mean)", "Mean top-k overlap of the primary and shadow rankings.",
                         [Query(histogram_mean("mtrank_shadow_topk_overlap"), "overlap")], ratio=True),
        timeseries_panel("Mean |primary - shadow| score per task", "Calibrated score difference per candidate.",
                         [Query(f"{rate('mtrank_shadow_score_abs_diff_total', 'task', TASK)} / "
                                f"scalar({rate('mtrank_shadow_candidates_total')})", "{{task}}")]),
    ]


def model() -> Section:
    return row("Model & reloads"), [
        info_panel("Serving model", "The bundle version (and architecture) the instances serve; two during a "
                   "rollout.", Query("max by (version, arch) (mtrank_model_info) > 0", "{{version}} ({{arch}})")),
        timeseries_panel("Bundle loads, last hour", "By result and trigger (alert MtrankReloadFailed on failures).",
                         [Query("sum by (result, trigger) (increase(mtrank_model_reloads_total[1h]))",
                                "{{result}} {{trigger}}")], width=16, height=5),
    ]


def feature_store() -> Section:
    return row("Feature store & feedback"), [
        timeseries_panel("Feature-store rows / s by side", "Rows found, absent, and served by the local cache.",
                         [Query(rate("mtrank_feature_store_hits_total", "side"), "hits {{side}}"),
                          Query(rate("mtrank_feature_store_misses_total", "side"), "misses {{side}}"),
                          Query(rate("mtrank_feature_store_cache_hits_total", "side"), "cache hits {{side}}")],
                         width=12),
        timeseries_panel("Feature-store failures / s", "Failed lookups (requests served with degraded features; "
                         "alert MtrankFeatureStoreErrors) and timeouts.",
                         [Query(rate("mtrank_feature_store_errors_total", "backend, reason"), "{{backend}} {{reason}}"),
                          Query(rate("mtrank_feature_store_timeouts_total", "backend"), "{{backend}} timeouts")],
                         width=12),
        timeseries_panel("Feedback events / s by result", "accepted, duplicate, joined, unjoined.",
                         [Query(rate("mtrank_feedback_events_total", "result"), "{{result}}")], width=12),
        timeseries_panel("Join-store errors / s", "Prediction-log / feedback store operations that failed "
                         "(alert MtrankJoinStoreErrors).",
                         [Query(rate("mtrank_join_store_errors_total", "backend, op"), "{{backend}} {{op}}")],
                         width=12),
    ]


SECTIONS = (traffic, gates, routing, calibration, drift, experiments, shadow, model, feature_store)


# ------------------------------------------------------------------------------------ dashboard


def variable(name: str, query: str) -> dashboard_builders.QueryVariable:
    """A multi-value query variable, "All" (= ``.*``) selected by default."""
    return (dashboard_builders.QueryVariable(name).label(name).datasource(DATASOURCE).query(query)
            .multi(True).include_all(True).all_value(".*")
            .current(dashboard_models.VariableOption(selected=True, text=["All"], value=["$__all"]))
            .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC))


def build() -> dict[str, Any]:
    """The dashboard JSON model (see the module docstring)."""
    board = (dashboard_builders.Dashboard("mtrank").uid(DASHBOARD_UID).tags(["mtrank"])
             .description("mtrank ranking service: traffic, gates, routing checks, calibration, drift, "
                          "experiments, shadow scoring, reloads, feature store. Generated by "
                          "docker/grafana/dashboard.py; do not edit in Grafana.")
             .time("now-3h", "now").refresh("30s").timezone("browser")
             .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
             # the gates' tasks (and "shared"): the Gates row repeats per value; "All" still matches every task
             .with_variable(variable("task", "label_values(mtrank_gate_candidates_total, task)"))
             .with_variable(variable("level", "label_values(mtrank_gate_candidates_total, level)")))
    for section in SECTIONS:
        section_row, panels = section()
        board = board.with_row(section_row)
        for panel in panels:
            board = board.with_panel(panel)
    model_json: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    for i, panel_json in enumerate(model_json["panels"], 1):
        panel_json["id"] = i
    return model_json


def substitute(expr: str) -> str:
    """``expr`` with the Grafana built-ins and template variables replaced; raises on anything left."""
    for builtin, value in BUILTINS.items():
        expr = expr.replace(builtin, value)
    for name in TEMPLATE_VARIABLES:
        expr = re.sub(rf"\$(?:\{{{name}\}}|{name}\b)", ".*", expr)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable left in {expr!r}")
    return expr


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every target expr of the dashboard (rows' nested panels included), in panel order, substituted."""
    exprs: list[str] = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            exprs.extend(substitute(target["expr"]) for target in inner.get("targets", []) if target.get("expr"))
    return exprs


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
