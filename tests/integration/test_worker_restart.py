"""A worker killed with SIGKILL and restarted with the same identity consumes again quickly.

Issue 19, item 6: each restart used to sit at Faust's "Recovery: Starting" for about 94 s while
the killed member of a consumer group timed out. Measurements: docs/worker.md.
"""
from __future__ import annotations

import signal
import socket
import time
import urllib.request

import pytest

from stream import events as ev
from stream.producer import EventProducer
from stream.topics import Topics, ensure_topics
from tests.workerproc import WorkerProcess, wait_for

pytestmark = pytest.mark.kafka

RESTART_BOUND_S = 15.0  # the bound on the time from a restart to the first newly logged event


def _send(bootstrap: str, topic: str, events: list[dict]) -> None:
    with EventProducer(bootstrap, topic=topic) as producer:
        producer.send_many(events)


@pytest.mark.hardening
def test_a_killed_worker_restarted_with_its_identity_consumes_within_the_bound(
        kafka_bootstrap, unique_name, tmp_path):
    """SIGKILL a worker that has logged and committed everything, send more, restart it with the
    same worker id: its first new event is logged within RESTART_BOUND_S, and every event once."""
    prefix = f"t{unique_name}."
    topics = Topics(prefix)
    ensure_topics(kafka_bootstrap, 2, topics)
    # A one-second flush interval, so that the time measured is the worker's way back to
    # consuming rather than the log's write cadence (5 s by default).
    worker = WorkerProcess(kafka_bootstrap, prefix, tmp_path, "--worker-id", f"w-{unique_name}",
                           "--log-flush-interval-s", "1")
    try:
        first = [ev.rating(f"u{i % 5}", f"a{i}", 3.0) for i in range(40)]
        _send(kafka_bootstrap, topics.events, first)
        worker.start()
        wait_for(worker.caught_up, 120, "the first run to log and commit its 40 events", worker)
        worker.stop(signal.SIGKILL)

        second = [ev.rating(f"u{i % 5}", f"b{i}", 4.0) for i in range(40)]
        _send(kafka_bootstrap, topics.events, second)
        new_ids = {e["event_id"] for e in second}
        restarted = time.monotonic()
        worker.start()
        # Waits well past the bound, so that a slow restart is measured, not just refused.
        wait_for(lambda: new_ids & set(worker.logged_events()["event_id"]), 180,
                 "the first event sent after the kill in the log", worker)
        elapsed = time.monotonic() - restarted
        print(f"restart to first newly logged event: {elapsed:.1f} s")
        assert elapsed < RESTART_BOUND_S, (
            f"the restarted worker logged its first new event {elapsed:.1f} s after the restart "
            f"(bound {RESTART_BOUND_S:.0f} s)\n{worker.output()[-3000:]}")

        wait_for(worker.caught_up, 120, "the second run to log and commit every event", worker)
        logged = worker.logged_events()
        assert logged["event_id"].is_unique
        assert set(logged["event_id"]) == {e["event_id"] for e in first + second}
    finally:
        worker.stop(signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
            return response.read().decode()
    except OSError:
        return ""


def test_the_metrics_page_is_served_without_fausts_kafka_consumer(kafka_bootstrap, unique_name, tmp_path):
    """Faust runs no Kafka consumer of its own any more; it still serves /metrics, which counts
    the events the ingest service consumed."""
    prefix = f"t{unique_name}."
    topics = Topics(prefix)
    ensure_topics(kafka_bootstrap, 2, topics)
    port = _free_port()
    worker = WorkerProcess(kafka_bootstrap, prefix, tmp_path, "--web-port", str(port))
    try:
        _send(kafka_bootstrap, topics.events, [ev.rating("u1", f"m{i}", 2.0) for i in range(5)])
        worker.start()
        wait_for(lambda: 'streamrec_events_total{type="rating"} 5.0' in _metrics(port), 120,
                 "/metrics to count the 5 ratings", worker)
    finally:
        worker.stop(signal.SIGKILL)
