"""The stack's Prometheus alerting rules (compose/prometheus/alerts.yml) pass their unit tests
(compose/prometheus/alerts.test.yml) under ``promtool test rules``, and every alert there is tested."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "compose" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "compose" / "prometheus" / "alerts.test.yml"


def test_every_alert_has_a_promtool_test():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    assert alerts <= tested, f"alerts without a promtool test: {sorted(alerts - tested)}"
    expected = {"StreamrecModelWorseThanBaseline", "StreamrecDrift", "StreamrecFreshnessSlow", "StreamrecModelStale",
                "StreamrecDeadLettersHigh", "StreamrecIngestLagGrowing", "StreamrecTargetDown"}
    assert expected <= alerts


def test_alert_rules_pass_promtool_test_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("the `promtool` binary is not installed (Debian: apt-get install --no-install-recommends prometheus)")
    run = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
