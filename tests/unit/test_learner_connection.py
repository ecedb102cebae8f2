"""The learner's connection to the broker: it waits for an unreachable broker instead of exiting,
and replaces its consumer only when the same backlog is seen at two stall checks in a row."""
from __future__ import annotations

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaConnectionError, KafkaTimeoutError

import learner.service as service
from learner.service import Learner
from learner.settings import LearnerSettings


def _learner(root) -> Learner:
    return Learner(LearnerSettings(bootstrap_servers="unused:9092", n_factors=4, device="cpu",
                                   checkpoint_dir=root / "ckpt", store_dir=root / "store"))


class _Ends:
    """A consumer whose end offsets are set by the test, or raise while the broker is away."""

    def __init__(self) -> None:
        self.ends: dict[TopicPartition, int] | Exception = {}

    def end_offsets(self, tps):
        if isinstance(self.ends, Exception):
            raise self.ends
        return self.ends


def test_a_learner_connecting_during_an_outage_retries_until_the_broker_answers(tmp_path, monkeypatch):
    learner = _learner(tmp_path)
    attempts, sleeps = [], []
    connected = (object(), [TopicPartition("examples", 0)])

    def consumer():
        attempts.append(1)
        if len(attempts) < 4:
            raise KafkaConnectionError("111 ECONNREFUSED")
        return connected

    monkeypatch.setattr(learner, "_consumer", consumer)
    monkeypatch.setattr(service.time, "sleep", sleeps.append)
    assert learner._connect() is connected
    assert len(attempts) == 4
    assert sleeps == [0.5, 1.0, 2.0]  # backing off


def test_a_missing_topic_is_still_an_error_not_a_wait(tmp_path, monkeypatch):
    learner = _learner(tmp_path)

    def consumer():
        raise RuntimeError("topic examples does not exist")

    monkeypatch.setattr(learner, "_consumer", consumer)
    with pytest.raises(RuntimeError, match="does not exist"):
        learner._connect()


def _watching(tmp_path, offset: int, end: int) -> tuple[Learner, _Ends, TopicPartition]:
    """A learner at ``offset`` of partition 0 and a consumer whose end offset there is ``end``."""
    learner, consumer, tp = _learner(tmp_path), _Ends(), TopicPartition("examples", 0)
    learner.offsets = {0: offset}
    consumer.ends = {tp: end}
    return learner, consumer, tp


def test_a_backlog_is_a_stall_only_when_seen_twice_at_the_same_offsets(tmp_path):
    learner, consumer, tp = _watching(tmp_path, offset=10, end=10)
    assert not learner._stalled(consumer, [tp])  # nothing waiting
    consumer.ends = {tp: 25}
    assert not learner._stalled(consumer, [tp])  # examples that have just arrived are not a stall
    learner.offsets = {0: 20}
    assert not learner._stalled(consumer, [tp])  # the learner read some since: still not a stall
    assert learner._stalled(consumer, [tp])  # same backlog, nothing read since the last check
    assert not learner._stalled(consumer, [tp])  # a new consumer gets a fresh pair of checks


def test_an_unreachable_broker_is_no_stall_and_forgets_the_sighting(tmp_path):
    learner, consumer, tp = _watching(tmp_path, offset=0, end=5)
    assert not learner._stalled(consumer, [tp])
    consumer.ends = KafkaTimeoutError("no broker")
    assert not learner._stalled(consumer, [tp])
    consumer.ends = {tp: 5}
    assert learner._stalled(consumer, [tp])  # the sighting before the outage still counts


def test_a_learner_started_during_an_outage_waits_for_the_last_seq_too(tmp_path, monkeypatch):
    """Reading the last published seq at start-up is retried like the connection."""
    learner = _learner(tmp_path)
    attempts, sleeps = [], []

    def probe():
        attempts.append(1)
        if len(attempts) < 3:
            raise KafkaTimeoutError("Failed to get offsets by timestamps in 30000 ms")

    monkeypatch.setattr(service.time, "sleep", sleeps.append)
    service._until_reachable(probe, "reading the last seq")
    assert len(attempts) == 3 and sleeps == [0.5, 1.0]


class _Producer:
    """A producer whose sends fail while ``down`` (as kafka-python's do after max_block_ms)."""

    def __init__(self) -> None:
        self.down, self.sent = True, []

    def send(self, topic, key, value):
        if self.down:
            raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        self.sent.append(key)

    def flush(self, timeout=None):
        pass


def test_a_delta_that_cannot_be_sent_is_counted_and_its_rows_go_out_with_the_next(tmp_path):
    from learner.metrics import PUBLISH_FAILURES
    from stream.events import to_event
    from stream.examples import example_batch, rating_example

    learner = _learner(tmp_path)
    learner.learn(example_batch([rating_example(to_event({"type": "rating", "schema_version": 1, "user_id": "u",
                                                          "item_id": "i", "value": 4.0, "ts": 1.0, "event_id": "e1"}))]))
    producer, failures = _Producer(), PUBLISH_FAILURES.labels("delta")._value.get()
    assert not service._published(learner.publish_delta, producer, "delta")
    assert PUBLISH_FAILURES.labels("delta")._value.get() == failures + 1
    assert learner._touched_users == {"u"}  # kept for the next publish
    producer.down = False
    assert service._published(learner.publish_delta, producer, "delta")
    assert producer.sent and learner.seq == 2 and not learner._touched_users
