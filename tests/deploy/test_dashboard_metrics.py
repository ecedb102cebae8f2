"""Every metric the Grafana dashboard and the Prometheus rules query is one that something exports.

A dashboard panel on a misspelt or renamed metric shows "No data" and nobody notices; here it fails.
The exported names come from the code itself: the metrics of the stream worker and the learner (the
default ``prometheus_client`` registry) and of a serving replica (its own ``CollectorRegistry``,
built as serving builds it). Metrics of external exporters are accepted only from ``EXTERNAL``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = ROOT / "compose" / "grafana" / "dashboards"
PROMETHEUS = ROOT / "compose" / "prometheus" / "prometheus.yml"

# Metrics that do not come from streamrec, with where they come from.
EXTERNAL = {
    "kafka_consumergroup_lag": "danielqsj/kafka-exporter (compose service kafka-exporter)",
    "up": "Prometheus itself, one series per scrape target",
}

# Names a metric family exposes, by type (prometheus_client strips `_total` from a counter's
# family name: Counter("streamrec_events") is scraped as streamrec_events_total).
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "stateset": ("",),
    "unknown": ("",),
}

# -- PromQL ---------------------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "and", "or", "unless", "inf", "nan", "atan2", "start", "end"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:$])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and labels left out)."""
    expr = _STRINGS.sub('""', expr)                  # label values, humanize templates
    expr = re.sub(r"\{[^}]*\}", "", expr)            # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)           # range and subquery durations, $__rate_interval
    expr = _GROUPING.sub(" ", expr)                  # by (le, route), on (...), group_left (...)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)          # any other Grafana variable
    names = set()
    for match in _IDENT.finditer(expr):
        name = match.group()
        followed_by_call = re.match(r"\s*\(", expr[match.end():])
        if name.lower() not in _KEYWORDS and not followed_by_call:
            names.add(name)
    return names


def test_metric_names_parses_promql():
    """The extractor keeps metric names and drops functions, clauses, labels, numbers, durations."""
    assert metric_names('histogram_quantile(0.99, sum by (le, route) '
                        '(rate(streamrec_request_seconds_bucket{route!="metrics"}[$__rate_interval])))') \
        == {"streamrec_request_seconds_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / ignoring(x) group_left (y) b > bool 1e3 offset 5m") \
        == {"a_total", "b"}
    assert metric_names('time() - max without (instance) (c) and on() vector(1) or d{job=~"w|l"}') \
        == {"c", "d"}


# -- what the dashboards and rules query ------------------------------------------------------------

def dashboard_exprs(node) -> list[str]:
    """Every PromQL expression in a Grafana dashboard (panel targets, nested rows, variables)."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                out.append(value)
            elif key == "query" and isinstance(value, str) and node.get("type") == "query":
                out.append(re.sub(r"^(label_values|query_result)\((.*)\)$", r"\2", value.strip()))
            else:
                out.extend(dashboard_exprs(value))
    elif isinstance(node, list):
        for value in node:
            out.extend(dashboard_exprs(value))
    return out


def queried() -> dict[str, list[str]]:
    """{metric name: [where it is queried]} over the dashboards and Prometheus' rule files."""
    found: dict[str, list[str]] = {}
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        for expr in dashboard_exprs(json.loads(path.read_text())):
            for name in metric_names(expr):
                found.setdefault(name, []).append(path.name)
    config = yaml.safe_load(PROMETHEUS.read_text())
    for rule_file in config.get("rule_files", []):
        rules = yaml.safe_load((PROMETHEUS.parent / rule_file).read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                for name in metric_names(str(rule["expr"])):
                    found.setdefault(name, []).append(f"{rule_file}:{rule.get('alert') or rule.get('record')}")
    return found


# -- what streamrec exports ------------------------------------------------------------------------

def _exposed(registry: CollectorRegistry) -> set[str]:
    """Sample names a registry exposes, including families whose labelled children do not exist yet."""
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    import learner.service  # noqa: F401  (registers the learner's metrics; imports torch)
    import stream.worker.metrics  # noqa: F401  (the stream worker's metrics)
    from serving.metrics import ServingMetrics

    return _exposed(REGISTRY) | _exposed(ServingMetrics().registry)


def test_dashboard_queries_something():
    """The extraction found the dashboard's queries (an empty set would make the next test vacuous)."""
    names = queried()
    assert {"streamrec_events_total", "streamrec_request_seconds_bucket", "kafka_consumergroup_lag"} <= set(names)


@pytest.mark.parametrize("name", sorted(queried()))
def test_queried_metric_is_exported(name: str, exported: set[str]):
    """Each metric in a panel or rule is exported by streamrec, or by an allow-listed external exporter."""
    where = ", ".join(sorted(set(queried()[name])))
    if name in EXTERNAL:
        return
    assert name.startswith("streamrec_"), f"{name} (in {where}) is neither streamrec's nor in EXTERNAL"
    assert name in exported, f"{name} (in {where}) is exported by no streamrec component"


def test_dashboard_has_the_panels_of_the_loop():
    """The dashboard keeps a panel for each signal the loop is operated by."""
    exprs = " ".join(dashboard_exprs(json.loads((DASHBOARD_DIR / "streamrec.json").read_text())))
    for needle in ("rate(streamrec_events_total", "by (reason) (rate(streamrec_dlq_total", "kafka_consumergroup_lag",
                   "streamrec_prequential_rmse", "streamrec_served_rmse", "streamrec_drift_psi",
                   "streamrec_anomalies_total", "histogram_quantile(0.99, sum by (le, route) "
                   "(rate(streamrec_request_seconds_bucket", "streamrec_model_age_seconds",
                   "streamrec_freshness_seconds_bucket"):
        assert needle in exprs, f"no panel queries {needle!r}"
