"""The learner trains each outcome once although a SIGKILLed worker re-sends examples (issue 19, item 7).

The worker sends a batch's examples before its log rows and offsets are durable, so a worker
killed in between replays the batch when it restarts and sends the same outcomes again: the
``examples`` topic is at least once. The learner recognises an outcome message by its key
(``stream.examples.outcome_key``) and trains its items once, also across its own restart from a
checkpoint. The worker here runs with a long log flush interval, so that nothing is durable when
it is killed and every kill makes duplicates.
"""
from __future__ import annotations

import signal
import time
from collections import Counter

import msgspec
import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from learner.service import Learner
from learner.settings import LearnerSettings
from stream import events as ev
from stream.examples import EXAMPLE_KINDS, Example, example_rows
from stream.producer import EventProducer
from stream.topics import Topics, ensure_topics
from tests.traffic import BASE_TS, click_flood
from tests.workerproc import WorkerProcess, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.hardening]

SLATE = 10


def _traffic() -> list[dict]:
    """Slates of SLATE items, a click on 10% of them within seconds, and ratings, over 40 minutes:
    every shown item ends as exactly one outcome (clicked, or unclicked when its 60 s window closes)."""
    sessions = click_flood(n_users=60, n_items=300, duration_s=2400.0, bot=(0.0, 0.0), seed=3, slate=SLATE)
    ratings = [ev.rating(f"u{i % 60}", f"i{i % 300}", float(1 + i % 5), ts=BASE_TS + 6 * i) for i in range(400)]
    return sorted(sessions + ratings, key=lambda e: e["ts"])


def _examples_on_topic(bootstrap: str, topic: str) -> list[dict]:
    """The labelled items (``example_rows``) of every message on ``topic`` up to its end offsets at
    the call (the worker may still send)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    out: list[Example] = []
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(partitions)
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            assert time.monotonic() < deadline, f"read {len(out)} of the {sum(ends.values())} messages on {topic}"
            for tp, records in consumer.poll(timeout_ms=500).items():
                out += [msgspec.json.decode(r.value, type=Example) for r in records if r.offset < ends[tp]]
    finally:
        consumer.close()
    return example_rows(out).to_pylist()


def _keys(rows: list[dict]) -> Counter:
    """Each labelled item of an outcome, by its outcome's header and its item."""
    return Counter((r["kind"], r["stage"], r["event_id"], r["item_id"]) for r in rows)


def _trained() -> float:
    return sum(REGISTRY.get_sample_value("streamrec_learner_examples_total", {"kind": k}) or 0.0
               for k in EXAMPLE_KINDS)


def _duplicates() -> float:
    return REGISTRY.get_sample_value("streamrec_learner_duplicates_total") or 0.0


def _learn_until_idle(bootstrap: str, prefix: str, root) -> None:
    """One run of the learner (a fresh process would do the same): resume from the checkpoint
    in ``root`` if any, read ``examples`` until idle, stop cleanly (checkpoint)."""
    settings = LearnerSettings(bootstrap_servers=bootstrap, topic_prefix=prefix, n_factors=4, device="cpu",
                               store_dir=root / "store", checkpoint_dir=root / "ckpt", web_port=0,
                               batch_size=500, batch_timeout_s=0.2, snapshot_interval_s=3600.0)
    Learner(settings).run(max_idle_s=3.0)


def test_the_learner_trains_each_outcome_once_across_worker_kills(kafka_bootstrap, unique_name, tmp_path):
    prefix = f"t{unique_name}."
    topics = Topics(prefix)
    ensure_topics(kafka_bootstrap, 2, topics)
    traffic = _traffic()
    expected = sum(len(e["items"]) for e in traffic if e["type"] == "impression") + sum(
        e["type"] == "rating" for e in traffic)

    def send(events: list[dict]) -> None:
        with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
            producer.send_many(events)

    def worker(flush_interval_s: float) -> WorkerProcess:
        # wait: every shown item is one outcome message's item (immediate adds a clicked item's
        # correction, and its learner holds shown items, which the counts below do not model)
        return WorkerProcess(kafka_bootstrap, prefix, tmp_path, "--worker-id", f"w-{unique_name}", "--feedback", "wait",
                             "--attribution-window-s", "60", "--log-flush-interval-s", str(flush_interval_s))

    def sent() -> int:
        return len(_examples_on_topic(kafka_bootstrap, topics.examples))

    trained_before, duplicates_before = _trained(), _duplicates()
    # Two runs killed mid-stream: their rows wait 120 s for the log, so at the kill nothing they
    # sent is durable and their restart sends it again. The first sees only the first half of the
    # traffic; the second half comes while it is down.
    half = len(traffic) // 2
    send(traffic[:half])
    slow = worker(120.0)
    try:
        slow.start()
        wait_for(lambda: sent() >= 1500, 120, "the first run to send 1,500 examples", slow)
        slow.stop(signal.SIGKILL)
        send(traffic[half:])
        # The learner learns what the first run sent, stops and resumes later from its checkpoint.
        _learn_until_idle(kafka_bootstrap, prefix, tmp_path / "learner")
        killed_once = sent()
        slow.start()
        wait_for(lambda: sent() >= killed_once + 3000, 120, "the second run to send 3,000 examples", slow)
        slow.stop(signal.SIGKILL)
    finally:
        slow.stop(signal.SIGKILL)

    last = worker(1.0)
    last.runs = slow.runs  # one log file per run in the same folder
    try:
        last.start()
        wait_for(last.caught_up, 180, "the last run to log and commit every event", last)
        wait_for(lambda: len(_keys(_examples_on_topic(kafka_bootstrap, topics.examples))) >= expected, 120,
                 f"all {expected} outcomes on the examples topic", last)
    finally:
        last.stop(signal.SIGKILL)

    on_topic = _examples_on_topic(kafka_bootstrap, topics.examples)
    keys = _keys(on_topic)
    assert len(keys) == expected, "every shown item and rating is one outcome"
    duplicated = len(on_topic) - len(keys)
    assert duplicated >= 1500, f"the killed runs must have left duplicates on the topic (found {duplicated})"

    _learn_until_idle(kafka_bootstrap, prefix, tmp_path / "learner")
    print(f"{len(on_topic)} examples on the topic, {len(keys)} outcomes, {duplicated} duplicates; "
          f"trained {_trained() - trained_before:.0f}, skipped {_duplicates() - duplicates_before:.0f}")
    assert _trained() - trained_before == len(keys), "each outcome trained exactly once"
    assert _duplicates() - duplicates_before == duplicated
