"""The anomaly detector survives a worker restart: its windows come back from the Delta log, its
forests, likelihoods, flags and scoring times from a checkpoint; a bad checkpoint means a cold
start with a warning, never a crash. No Kafka here: pipelines and logs are driven directly."""
from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

from stream import events as ev
from stream.anomaly import AdaptiveThreshold, AnomalyDetector, AnomalyLikelihood
from stream.anomaly import checkpoint as checkpoint_mod
from stream.anomaly.checkpoint import MANIFEST
from stream.worker.app import create_worker
from stream.config import StreamSettings
from stream.examples import example_rows
from stream.log.table import EVENTS, EXAMPLES, DeltaLog
from stream.log.buffer import Pending
from stream.worker.pipeline import IngestPipeline, Record
from tests.traffic import BASE_TS, click_flood

T0 = BASE_TS
SPLIT = 1200.0  # stream A is [0, SPLIT) seconds, stream B the rest: A fits in the detector's idle_s
BATCH = 100


def traffic(duration_s: float = 2000.0, bot: tuple[float, float] = (1000.0, 1500.0), seed: int = 0) -> list[dict]:
    """60 users at one pace (a 5-item slate every ~60 s) over 100 items, and a bot during ``bot``:
    every user and item is active every few minutes, so no entity is idle long enough to be forgotten."""
    return click_flood(60, 100, duration_s, bot, seed, slate=5, pace_spread=0.0)


def batches(events: list[dict], start: int = 0) -> list[list[Record]]:
    return [[Record(json.dumps(e).encode(), 0, start + i + k) for k, e in enumerate(events[i:i + BATCH])]
            for i in range(0, len(events), BATCH)]


def new_pipeline(detector: AnomalyDetector) -> IngestPipeline:
    return IngestPipeline(dedupe_window_s=3600, attribution_window_s=60, detector=detector)


def run_logged(pipeline: IngestPipeline, log: DeltaLog, events: list[dict]) -> list[dict]:
    """Feed events batch by batch and write each batch's rows to the log, as the worker does;
    returns the anomaly records."""
    records = []
    for batch in batches(events):
        result = pipeline.process(batch)
        log.append(EVENTS, result.log_table)
        log.append(EXAMPLES, example_rows(result.examples))
        records += result.anomalies
    return records


@pytest.fixture(scope="module")
def stream() -> tuple[list[dict], list[dict]]:
    events = traffic()
    return [e for e in events if e["ts"] < T0 + SPLIT], [e for e in events if e["ts"] >= T0 + SPLIT]


@pytest.fixture
def first_run(stream, tmp_path) -> tuple[IngestPipeline, DeltaLog]:
    """A worker's pipeline that saw stream A; everything it accepted is in the log."""
    log = DeltaLog(tmp_path / "log")
    live = new_pipeline(AnomalyDetector(seed=0))
    run_logged(live, log, stream[0])
    return live, log


def restarted(log: DeltaLog, detector: AnomalyDetector | None = None) -> IngestPipeline:
    pipeline = new_pipeline(detector or AnomalyDetector(seed=0))
    pipeline.restore(log)
    return pipeline


def is_cold(detector: AnomalyDetector) -> bool:
    return (all(forest.n_points == 0 for forest in detector.forests.values())
            and all(likelihood.n_seen == 0 for likelihood in detector.likelihoods.values()))


# -- windows from the log -------------------------------------------------------------------------


def test_windows_rebuilt_from_the_log_equal_the_live_windows(first_run):
    """Every user and item has the same features (and event counts) after a restore from the log
    as in the detector that saw stream A live."""
    live, log = first_run
    before, after = live.detector.windows[0], restarted(log).detector.windows[0]
    assert before.users.keys() == after.users.keys() and len(before.users) == 61  # with the bot
    assert before.items.keys() == after.items.keys() and len(before.items) == 100
    for user in before.users:
        assert after.user_features(user) == before.user_features(user), user
        assert after.users[user].n_events == before.users[user].n_events
    for item in before.items:
        assert after.item_features(item) == before.item_features(item), item
        assert after.items[item].n_clicks == before.items[item].n_clicks


def test_restore_replays_the_detectors_horizon_even_past_dedupe_and_join(tmp_path):
    """With short dedupe and attribution windows the log is still read idle_s back for the
    detector; entities idle for longer than idle_s are not brought back."""
    log = DeltaLog(tmp_path)
    events = ([ev.rating("old", "x", 1.0, ts=T0)]
              + [ev.rating("a", f"x{k}", 1.0, ts=T0 + 1000 + k) for k in range(5)]
              + [ev.rating("b", "y", 1.0, ts=T0 + 2000)])
    first = IngestPipeline(dedupe_window_s=60, attribution_window_s=60)
    log.append(EVENTS, first.process(batches(events)[0]).log_table)
    detector = AnomalyDetector(window_s=600)  # idle_s 1800
    IngestPipeline(dedupe_window_s=60, attribution_window_s=60, detector=detector).restore(log)
    assert set(detector.windows[0].users) == {"a", "b"}
    assert detector.windows[0].users["a"].n_events == 5
    assert detector.windows[0].user_features("a")["distinct_items"] == 5.0
    assert is_cold(detector)  # rebuilding windows scores nothing


# -- checkpoint round trip ------------------------------------------------------------------------


def test_checkpoint_and_log_restore_continue_exactly_like_an_uninterrupted_detector(stream, first_run, tmp_path):
    """Checkpoint after stream A, restart (windows from the log, models from the checkpoint), feed
    stream B to both: the same anomaly records (scores, grades, features) and anomalous flags as
    the detector that never stopped. A restart without the checkpoint gives other records. The
    bot is active across the restart: flagged in the checkpoint and alarmed again in stream B."""
    live, log = first_run
    live.detector.snapshot().save(tmp_path / "ckpt")
    warm = restarted(log)
    assert warm.detector.load_checkpoint(tmp_path / "ckpt")
    cold = restarted(log)
    assert "bot" in live.detector.flagged_users
    assert warm.detector.flagged_users == live.detector.flagged_users

    records = {"live": [], "warm": [], "cold": []}
    for batch in batches(stream[1], start=len(stream[0])):
        for name, pipeline in (("live", live), ("warm", warm), ("cold", cold)):
            result = pipeline.process(batch)
            records[name].append((result.anomalies, [(e.user_id, e.anomalous) for e in result.examples]))
    assert records["warm"] == records["live"]
    alarms = [a for anomalies, _ in records["live"] for a in anomalies]
    assert any(a["entity"] == "bot" and a["kind"] == "user" for a in alarms)
    assert records["live"][0][1].count(("bot", True)) > 0  # its examples at once after the restart
    assert records["cold"] != records["live"]
    for kind in ("user", "item"):
        assert warm.detector.likelihoods[kind].state() == live.detector.likelihoods[kind].state()
        assert warm.detector.forests[kind].n_points == live.detector.forests[kind].n_points


def test_threshold_state_round_trips_through_json():
    """A threshold rebuilt from its JSON state grades the next scores exactly like the original."""
    scores = np.random.default_rng(1).gamma(4.0, 0.5, 600)
    original = AdaptiveThreshold(z=3.0, horizon=200, warmup=50, min_threshold=0.1)
    original.update(scores[:300])
    copy = AdaptiveThreshold.from_state(json.loads(json.dumps(original.state())))
    assert np.array_equal(copy.update(scores[300:]), original.update(scores[300:]))
    assert copy.state() == original.state()


@pytest.mark.parametrize("change", [{"n": -1}, {"n": True}, {"var": -1.0}, {"mean": float("nan")}, {"z": 0.0}])
def test_threshold_from_state_rejects_bad_values(change):
    state = dict(AdaptiveThreshold().state(), **change)
    with pytest.raises(ValueError):
        AdaptiveThreshold.from_state(state)


@pytest.mark.parametrize("red_zone", [0.99999, None])
def test_likelihood_state_round_trips_through_json(red_zone):
    """A likelihood rebuilt from its JSON state scores the next scores exactly like the original
    (mid-way through its long window, between two refits)."""
    scores = np.random.default_rng(2).gamma(4.0, 0.5, 1500)
    scores[1200:1203] = 60.0
    original = AnomalyLikelihood(1, 500, 50, 40, red_zone=red_zone)
    original.update(scores[:1150])
    copy = AnomalyLikelihood.from_state(json.loads(json.dumps(original.state())))
    np.testing.assert_array_equal(copy.update(scores[1150:]), original.update(scores[1150:]))
    assert copy.state() == original.state()


@pytest.mark.parametrize("change", [{"long": [0.0]}, {"counters": [-1, 0, 0, 0, 0, 0, 0]},
                                    {"stats": [0.0, float("nan"), 0.0]}])
def test_likelihood_from_state_rejects_bad_values(change):
    state = dict(AnomalyLikelihood().state(), **change)
    with pytest.raises(ValueError):
        AnomalyLikelihood.from_state(state)


def test_saves_replace_the_checkpoint_and_drop_old_files(first_run, tmp_path, monkeypatch):
    """Each save leaves a manifest naming its three files; files no manifest names are removed
    once older than STALE_S (0 here); nothing temporary is left behind."""
    live, _ = first_run
    monkeypatch.setattr(checkpoint_mod, "STALE_S", 0.0)
    folder = tmp_path / "ckpt"
    live.detector.snapshot().save(folder)
    live.detector.snapshot().save(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    named = {entry["name"] for entry in manifest["files"].values()}
    assert len(named) == 3
    assert {p.name for p in folder.iterdir()} == named | {MANIFEST}


# -- bad checkpoints ------------------------------------------------------------------------------


def _flip_a_byte_in_the_user_forest(folder):
    path = next(folder.glob("forest-user-*.npz"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_the_manifest(folder):
    path = folder / MANIFEST
    path.write_bytes(path.read_bytes()[:40])


DAMAGE = {
    "corrupt forest": (_flip_a_byte_in_the_user_forest, "sha256 mismatch"),
    "missing manifest": (lambda folder: (folder / MANIFEST).unlink(), "no detector checkpoint"),
    "truncated manifest": (_truncate_the_manifest, "not used"),
    "missing state file": (lambda folder: next(folder.glob("state-*.json")).unlink(), "not used"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_means_a_cold_start_with_a_warning(first_run, tmp_path, caplog, damage):
    live, log = first_run
    folder = tmp_path / "ckpt"
    live.detector.snapshot().save(folder)
    spoil, message = DAMAGE[damage]
    spoil(folder)
    pipeline = restarted(log)
    with caplog.at_level(logging.INFO, logger="stream.anomaly"):
        assert pipeline.detector.load_checkpoint(folder) is False
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert message in caplog.records[0].getMessage() and "starting cold" in caplog.records[0].getMessage()
    assert is_cold(pipeline.detector) and not pipeline.detector.flagged_users
    pipeline.process(batches(traffic(200.0, bot=(0.0, 0.0), seed=5), start=10**6)[0])  # and it runs on


@pytest.mark.parametrize("setting", [{"num_trees": 20}, {"false_alarm_rate": 1e-4}, {"window_s": 300.0},
                                     {"warmup": 10}, {"long_window": 1000}])
def test_checkpoint_of_other_settings_means_a_cold_start_naming_the_difference(first_run, tmp_path, caplog, setting):
    live, log = first_run
    live.detector.snapshot().save(tmp_path / "ckpt")
    pipeline = restarted(log, AnomalyDetector(seed=0, **setting))
    with caplog.at_level(logging.INFO, logger="stream.anomaly"):
        assert pipeline.detector.load_checkpoint(tmp_path / "ckpt") is False
    (record,) = caplog.records
    name = next(iter(setting))
    assert record.levelno == logging.WARNING and "other settings" in record.getMessage()
    assert f"{name} " in record.getMessage()
    assert is_cold(pipeline.detector)


def test_no_checkpoint_folder_is_a_quiet_cold_start(tmp_path, caplog):
    """A first start has no checkpoint folder: an info line, not a warning."""
    with caplog.at_level(logging.INFO, logger="stream.anomaly"):
        assert AnomalyDetector().load_checkpoint(tmp_path / "nothing") is False
    assert [(r.levelno, r.getMessage().split(" in ")[0]) for r in caplog.records] == [
        (logging.INFO, "no detector checkpoint")]


# -- the worker -----------------------------------------------------------------------------------


def test_worker_checkpoints_on_flush_at_most_once_per_interval_and_restores_at_start(
        first_run, tmp_path, monkeypatch, caplog):
    """``Worker.flush`` checkpoints the detector in the worker's own folder next to the log: not
    within the interval since the start or the last checkpoint, always at the final flush; the
    next worker with the same id restores it from there when it is assigned its partitions."""
    live, log = first_run
    monkeypatch.setenv("STREAMREC_HOME", str(tmp_path / "home"))
    settings = StreamSettings(bootstrap_servers="127.0.0.1:9", log_dir=log.root, detector_checkpoint_interval_s=3600,
                              worker_id="w1")
    worker = create_worker(settings, detector=live.detector)  # the first run's worker: no checkpoint yet
    manifest = worker.detector_dir / MANIFEST
    assert not manifest.exists() and worker.detector_dir.name == "w1"

    async def commit(offsets):
        pass

    def created() -> float:
        return json.loads(manifest.read_text())["created"]

    asyncio.run(worker.flush(Pending(), commit))
    assert not manifest.exists()
    asyncio.run(worker.flush(Pending(), commit, final=True))
    first = created()
    settings.detector_checkpoint_interval_s = 0.0
    asyncio.run(worker.flush(Pending(), commit))
    assert created() > first
    settings.detector_checkpoint_interval_s = 3600.0
    second = created()
    asyncio.run(worker.flush(Pending(), commit))
    assert created() == second

    with caplog.at_level(logging.INFO, logger="stream.worker.app"):
        restarted_worker = create_worker(settings, detector=AnomalyDetector(seed=0))
        restarted_worker.restore_partitions([0])
    detector = restarted_worker.pipeline.detector
    assert any(r.getMessage().startswith("restored anomaly detector: 61 users / 100 items in windows")
               for r in caplog.records)
    assert detector.flagged_users == live.detector.flagged_users
    for kind in ("user", "item"):
        assert detector.likelihoods[kind].state() == live.detector.likelihoods[kind].state()
