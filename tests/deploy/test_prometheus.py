"""A real Prometheus scrapes streamrec's metrics, and accepts the stack's config and every dashboard query.

Needs the `prometheus` (and `promtool`) binaries, e.g. Debian's package (`apt-get install
--no-install-recommends prometheus`); without them these tests skip. The server runs on a free
127.0.0.1 port with a temporary data folder and a 1 s scrape interval, and is killed at the end.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, start_http_server

from tests.deploy.test_dashboard_metrics import DASHBOARD_DIR, dashboard_exprs

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "compose" / "prometheus" / "prometheus.yml"
MISSING = "the `{}` binary is not installed (Debian: apt-get install --no-install-recommends prometheus)"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(MISSING.format(name))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_queries() -> list[str]:
    """Every dashboard query, with Grafana's variables replaced as Grafana would."""
    exprs = []
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        exprs += dashboard_exprs(json.loads(path.read_text()))
    return [e.replace("$__rate_interval", "1m").replace("$__interval", "15s") for e in exprs]


def test_promtool_accepts_the_stack_config_and_rules(tmp_path: Path):
    """promtool checks compose/prometheus/prometheus.yml, its rule files, and the dashboard's PromQL."""
    promtool = _binary("promtool")
    run = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    # The dashboard's queries, as recording rules: promtool parses each with Prometheus' own parser.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(_dashboard_queries())]}]}
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    run = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def _query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # 400/422: a query Prometheus rejects; its body says why
        return json.load(error)


def _wait_for(base: str, expr: str, accept=bool, timeout_s: float = 30.0) -> list:
    """Poll ``expr`` until ``accept(result)``; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    result = None
    while time.monotonic() < deadline:
        try:
            result = _query(base, expr)["data"]["result"]
            if accept(result):
                return result
        except OSError:  # not listening yet
            pass
        time.sleep(0.3)
    pytest.fail(f"Prometheus did not answer {expr} as expected within {timeout_s:.0f} s (last: {result})")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory):
    """A Prometheus scraping this process's streamrec metrics every second; yields its base URL."""
    binary = _binary("prometheus")
    tmp_path = tmp_path_factory.mktemp("prometheus")
    from serving.metrics import ServingMetrics

    stream_server, _ = start_http_server(0, addr="127.0.0.1")  # the default registry: worker + learner
    serving_metrics = ServingMetrics()
    serving_server, _ = start_http_server(0, addr="127.0.0.1", registry=serving_metrics.registry)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "worker", "static_configs": [{"targets": [f"127.0.0.1:{stream_server.server_port}"]}]},
            {"job_name": "serving", "static_configs": [{"targets": [f"127.0.0.1:{serving_server.server_port}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", serving_metrics
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()
        stream_server.shutdown()
        serving_server.shutdown()
        stream_server.server_close()
        serving_server.server_close()


def test_prometheus_scrapes_streamrec_metrics(prometheus):
    """A counter incremented here comes back through Prometheus' query API, as do serving's histograms."""
    from stream.worker import metrics

    base, serving_metrics = prometheus
    metrics.EVENTS.labels(type="rating").inc(7)
    serving_metrics.request_seconds.labels("recommendations").observe(0.003)
    expected = REGISTRY.get_sample_value("streamrec_events_total", {"type": "rating"})

    def has(value: float):
        return lambda result: bool(result) and float(result[0]["value"][1]) == value

    (sample,) = _wait_for(base, 'streamrec_events_total{type="rating"}', has(expected))
    assert sample["metric"]["job"] == "worker"
    _wait_for(base, 'streamrec_request_seconds_count{route="recommendations"}', has(1.0))


def test_every_dashboard_query_evaluates(prometheus):
    """Each dashboard query runs without error on a live Prometheus holding streamrec's series."""
    base, _ = prometheus
    _wait_for(base, "up == 1", lambda result: len(result) == 2)  # both targets scraped once
    for expr in _dashboard_queries():
        body = _query(base, expr)
        assert body["status"] == "success", (expr, body)
