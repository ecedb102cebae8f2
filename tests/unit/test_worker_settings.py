"""The worker's settings: every tuning knob has a flag, and a flag wins over its environment variable."""
from __future__ import annotations

import pytest

from stream.cli import _stream_settings, build_parser


def _settings(*flags: str):
    return _stream_settings(build_parser().parse_args(["worker", "--bootstrap-servers", "127.0.0.1:9", *flags]))


def test_flags_set_the_worker_settings(tmp_path) -> None:
    s = _settings("--log-dir", str(tmp_path), "--batch-size", "100", "--attribution-window-s", "2",
                  "--idle-grace-s", "0.5", "--detector-checkpoint-interval-s", "7", "--web-port", "0")
    assert (s.log_dir, s.batch_size, s.attribution_window_s) == (tmp_path, 100, 2.0)
    assert (s.idle_grace_s, s.detector_checkpoint_interval_s, s.web_port) == (0.5, 7.0, 0)


def test_a_flag_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_IDLE_GRACE_S", "9")
    monkeypatch.setenv("STREAMREC_DETECTOR_CHECKPOINT_INTERVAL_S", "30")
    assert (_settings().idle_grace_s, _settings().detector_checkpoint_interval_s) == (9.0, 30.0)
    assert _settings("--idle-grace-s", "1").idle_grace_s == 1.0
    assert _settings("--detector-checkpoint-interval-s", "5").detector_checkpoint_interval_s == 5.0


@pytest.mark.hardening
def test_the_future_tolerance_is_a_setting_with_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """How far ahead of the worker's clock an event's ts may lie before it is dead-lettered (ts_in_future)."""
    assert _settings().max_future_s == 300.0
    monkeypatch.setenv("STREAMREC_MAX_FUTURE_S", "60")
    assert _settings().max_future_s == 60.0
    assert _settings("--max-future-s", "5").max_future_s == 5.0
