"""`streamrec demo --quick` end to end on the real broker: exits 0 and writes a report that shows learning,
and the steady phase's A/B test logs every impression with its variant."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kafka


def test_quick_demo_runs_the_whole_loop_and_reports(kafka_bootstrap, tmp_path):
    """Worker, learner and serving run; the report has every plot; CTR in steady state beats warm-up."""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "stream.cli", "demo", "--quick", "--run-dir", str(run)],
        env=dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (run / "report.md").read_text()
    for plot in ("ctr.png", "rmse.png", "drift.png", "anomalies.png"):
        assert (run / plot).stat().st_size > 1000 and f"]({plot})" in report
    summary = json.loads((run / "summary.json").read_text())["summary"]
    assert summary["ctr"]["steady"] > summary["ctr"]["warmup"]
    assert "dead letters:" in result.stdout and "not_json" in result.stdout
    assert int(summary["figures"]["examples flagged anomalous"]) > 0
    check_ab_test(run, json.loads((run / "summary.json").read_text())["checks"])


def check_ab_test(run, checks):
    """The steady phase's A/B test: every impression the A/B replica served (its request ids share
    the replica's prefix) carries the variant the hash assigns its user, both variants served, and
    the lift comes with an interval around it."""
    from serving.variants import Assignment, parse_variants
    from sim.demo import AB_VARIANTS
    from stream.log.table import EVENTS, DeltaLog

    rows = DeltaLog(run / "log").read(EVENTS, columns=["type", "user_id", "request_id", "variant"])
    impressions = rows[rows["type"] == "impression"].drop_duplicates("request_id")
    prefix = impressions["request_id"].str[:16]  # serving.recommend: a replica's random request-id prefix
    ab_prefixes = set(prefix[impressions["variant"].notna()])
    assert len(ab_prefixes) == 1
    served = impressions[prefix.isin(ab_prefixes)]
    assignment = Assignment(parse_variants(AB_VARIANTS))
    assert list(served["variant"]) == [assignment.assign(user).name for user in served["user_id"]]
    assert set(served["variant"]) == {"model", "control"}
    lo, hi = checks["ab_lift_ci"]
    assert lo < checks["ab_lift"] < hi
