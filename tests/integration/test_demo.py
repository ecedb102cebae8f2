"""`streamrec demo --quick` end to end on the real broker: exits 0 and writes a report that shows learning."""
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
