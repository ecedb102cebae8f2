"""Faults a group of workers survives, each on the real broker (``pytest -m faults`` runs them all).

- Workers join, die and come back while traffic flows: every accepted event is in the log once,
  every click joins its slate wherever the slate's partition went, no negative is logged twice.
- A worker killed after it wrote a flush's data files but before the commit leaves nothing
  visible, and its restart logs everything once.
- The log's storage refuses writes for a while: the worker retries, says so, commits no offset
  past what is durable, and recovers.
- The broker stops for 60 s mid-stream and comes back on the same port and data: the worker
  waits and carries on by itself (no crash, no restart), and nothing accepted is lost; serving,
  run beside it, stays up and keeps answering.

Storage that refuses writes is made with the immutable flag (``chattr +i``) on a table's
``_delta_log`` folder: data files can still be written, the commit cannot, which is exactly the
window between the two. Where the flag cannot be set (not root, a file system without it) those
tests skip.
"""
from __future__ import annotations

import os
import random
import urllib.request
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2
from kafka import KafkaConsumer, TopicPartition

from stream import events as ev
from stream.log.export import final_click_labels
from stream.log.table import EVENTS, EXAMPLES, DeltaLog
from stream.producer import EventProducer
from stream.tools import kafka_local
from stream.tools.processes import spawn, stop
from stream.tools.scrape import scrape, total
from stream.topics import Topics, ensure_topics
from tests.workerproc import WorkerProcess, end_offsets, log_caught_up, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

PARTITIONS = 4
WINDOW_S = 300.0  # attribution window: longer than the test, so only event time closes slates


def _partition_of(user: str) -> int:
    return (murmur2(user.encode()) & 0x7FFFFFFF) % PARTITIONS  # the producer's default partitioner


class Traffic:
    """Slates and clicks with known outcomes: what the log must hold in the end."""

    def __init__(self, base_ts: float, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.base_ts = base_ts
        self.slates: dict[str, tuple[str, float, list[str]]] = {}  # request_id -> (user, ts, items)
        self.clicked: set[tuple[str, str]] = set()
        self.sent: list[dict] = []

    def impressions(self, n: int, t: float) -> list[dict]:
        out = []
        for k in range(n):
            user = f"u{self.rng.randrange(400)}"
            request = f"{user}-{len(self.slates)}"
            items = self.rng.sample([f"i{i}" for i in range(200)], 4)
            ts = self.base_ts + t + k * 0.01
            self.slates[request] = (user, ts, items)
            out.append(ev.impression(user, request, "m0", "uniform",
                                     [{"item_id": it, "position": p + 1, "propensity": 0.25}
                                      for p, it in enumerate(items)], ts=ts))
        return self._sent(out)

    def clicks(self, requests: list[str], share: float = 0.3) -> list[dict]:
        out = []
        for request in requests:
            if self.rng.random() < share:
                user, ts, items = self.slates[request]
                item = items[self.rng.randrange(2)]
                self.clicked.add((request, item))
                out.append(ev.click(user, request, item, ts=ts + 5.0))
        return self._sent(out)

    def closing(self, t: float) -> list[dict]:
        """One rating per partition far ahead in event time: every slate's window closes."""
        users, k = {}, 0
        while len(users) < PARTITIONS:
            users.setdefault(_partition_of(f"closer{k}"), f"closer{k}")
            k += 1
        return self._sent([ev.rating(user, "z", 1.0, ts=self.base_ts + t) for user in users.values()])

    def _sent(self, events: list[dict]) -> list[dict]:
        self.sent += events
        return events

    def negatives(self) -> set[tuple[str, str]]:
        return {(r, item) for r, (_, _, items) in self.slates.items() for item in items} - self.clicked


def _send(bootstrap: str, topic: str, events: list[dict]) -> None:
    with EventProducer(bootstrap, topic=topic) as producer:
        producer.send_many(events)


def _check_log(log: DeltaLog, traffic: Traffic) -> None:
    """Every sent event once in ``events``; every outcome once in ``examples`` (a shown item's
    ``shown`` or ``closed``, a click's ``clicked``); the final labels: a positive for every click, a
    negative for every other shown item."""
    logged = log.read(EVENTS, columns=["event_id", "item_id", "position"])
    assert not logged.duplicated().any(), logged[logged.duplicated(keep=False)].head()
    assert set(logged["event_id"]) == {e["event_id"] for e in traffic.sent}
    examples = log.read(EXAMPLES, columns=["kind", "stage", "request_id", "item_id", "label", "ts"])
    clicks = examples[examples["kind"] == "click"]
    twice = clicks.duplicated(["stage", "request_id", "item_id"], keep=False)
    assert not twice.any(), f"an outcome logged twice: {clicks[twice].head()}"
    final = final_click_labels(clicks)
    positives, negatives = final[final["label"] > 0], final[final["label"] == 0]
    assert set(zip(positives["request_id"], positives["item_id"])) == traffic.clicked  # none orphaned
    assert set(zip(negatives["request_id"], negatives["item_id"])) == traffic.negatives()


@pytest.fixture
def group(kafka_bootstrap, unique_name, tmp_path):
    """A topic prefix with 4-partition topics, a shared log folder and a factory of workers."""
    prefix = f"t{unique_name}."
    ensure_topics(kafka_bootstrap, PARTITIONS, Topics(prefix))
    log_dir = tmp_path / "shared-log"
    workers: list[WorkerProcess] = []

    def make(name: str, *extra: str) -> WorkerProcess:
        worker = WorkerProcess(kafka_bootstrap, prefix, tmp_path / name, "--worker-id", f"{name}-{unique_name}",
                               "--attribution-window-s", str(WINDOW_S), "--log-flush-interval-s", "1",
                               *extra, log_dir=log_dir)
        workers.append(worker)
        return worker

    yield prefix, DeltaLog(log_dir), make
    for worker in workers:
        worker.stop(signal.SIGKILL)


def test_workers_join_die_and_return_without_losing_or_repeating_anything(kafka_bootstrap, group):
    """Two workers, a third joins, one is SIGKILLed and restarted, while slates and their clicks
    flow: the log holds every event once, every click joined its slate even when the slate's
    partition moved between the impression and the click, and no negative is logged twice."""
    prefix, log, make = group
    topic = Topics(prefix).events
    traffic = Traffic(time.time() - 1200)
    first = traffic.impressions(800, t=0)
    _send(kafka_bootstrap, topic, first)
    a, b = make("a").start(), make("b").start()
    wait_for(lambda: log_caught_up(kafka_bootstrap, prefix, log), 180, "a and b to log the first slates", a)

    c = make("c").start()  # the group rebalances: open slates move with their partitions
    wait_for(lambda: "assigned" in c.output(), 120, "c to be assigned partitions", c)
    _send(kafka_bootstrap, topic, traffic.clicks([e["request_id"] for e in first]))
    wait_for(lambda: log_caught_up(kafka_bootstrap, prefix, log), 180, "the clicks after c joined", c)
    assert "partition" in c.output() and "open slates restored from the log" in c.output()

    for round_ in range(6):  # more traffic; a is killed in the middle of it
        batch = traffic.impressions(150, t=20 + round_)
        _send(kafka_bootstrap, topic, batch + traffic.clicks([e["request_id"] for e in batch]))
        if round_ == 2:
            a.stop(signal.SIGKILL)
        time.sleep(0.5)
    time.sleep(12)  # past the killed static member's session: b and c take its partitions
    a.start()
    wait_for(lambda: "assigned" in (a.root / "worker-2.log").read_text(errors="replace"), 120, "a to rejoin", a)
    _send(kafka_bootstrap, topic, traffic.closing(t=2 * WINDOW_S))
    wait_for(lambda: log_caught_up(kafka_bootstrap, prefix, log), 240, "every event in the log", b)
    for worker in (a, b, c):
        assert worker.alive(), worker.output()[-3000:]
    _check_log(log, traffic)


def _chattr(flag: str, path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.fixture
def refusing(tmp_path):
    """Make a folder refuse new files (and give it back at the end, whatever happened)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if not _chattr("+i", probe):
        pytest.skip("cannot set the immutable flag here (needs root and ext4/xfs): no way to refuse writes")
    _chattr("-i", probe)
    held: list[Path] = []

    def refuse(path: Path) -> None:
        assert _chattr("+i", path)
        held.append(path)

    def allow() -> None:
        while held:
            _chattr("-i", held.pop())

    yield refuse, allow
    allow()


def _data_files(log_dir: Path, dataset: str) -> int:
    return sum(1 for p in (log_dir / dataset).rglob("*.parquet") if "_delta_log" not in p.parts)


def test_a_worker_killed_between_data_files_and_commit_leaves_nothing_visible(kafka_bootstrap, group, refusing):
    """The commit of ``events`` is refused, so the worker has written a flush's data files and
    waits to commit them; SIGKILL it there. Nothing of that flush is visible, and the restart
    logs every event exactly once."""
    prefix, log, make = group
    refuse, allow = refusing
    topic = Topics(prefix).events
    traffic = Traffic(time.time() - 1200)
    _send(kafka_bootstrap, topic, traffic.impressions(300, t=0))
    worker = make("w").start()
    wait_for(lambda: log_caught_up(kafka_bootstrap, prefix, log), 180, "the first slates in the log", worker)
    visible, files_before = len(log.read(EVENTS)), _data_files(Path(log.root), EVENTS)

    refuse(Path(log.root) / EVENTS / "_delta_log")
    batch = traffic.impressions(300, t=10)
    _send(kafka_bootstrap, topic, batch + traffic.clicks([e["request_id"] for e in batch]))
    wait_for(lambda: "log flush" in worker.output() and "failed" in worker.output(), 120,
             "a refused commit", worker)
    worker.stop(signal.SIGKILL)
    assert _data_files(Path(log.root), EVENTS) > files_before, "the flush's data files were written"
    allow()
    assert len(log.read(EVENTS)) == visible  # ... and none of them is visible

    worker.start()
    _send(kafka_bootstrap, topic, traffic.closing(t=2 * WINDOW_S))
    wait_for(lambda: log_caught_up(kafka_bootstrap, prefix, log), 180, "every event in the log", worker)
    _check_log(log, traffic)


def test_storage_refusing_writes_is_retried_and_offsets_wait(kafka_bootstrap, group, refusing):
    """For 20 s neither table accepts a commit: the worker keeps running, counts the failures in
    ``streamrec_log_write_errors_total`` and logs them, commits no Kafka offset past what the log
    holds, and logs everything once when storage is back."""
    prefix, log, make = group
    refuse, allow = refusing
    topic = Topics(prefix).events
    port = kafka_local.free_port()
    traffic = Traffic(time.time() - 1200)
    _send(kafka_bootstrap, topic, traffic.impressions(200, t=0))
    worker = make("w", "--web-port", str(port)).start()
    wait_for(lambda: log_caught_up(kafka_bootstrap, prefix, log), 180, "the first slates in the log", worker)

    refuse(Path(log.root) / EVENTS / "_delta_log")
    refuse(Path(log.root) / EXAMPLES / "_delta_log")
    durable = log.resume_offsets(prefix + "streamrec-ingest", topic, range(PARTITIONS))
    batch = traffic.impressions(300, t=10)
    _send(kafka_bootstrap, topic, batch + traffic.clicks([e["request_id"] for e in batch]))
    wait_for(lambda: total(scrape(f"http://127.0.0.1:{port}/metrics"), "streamrec_log_write_errors_total") >= 2,
             60, "retried flushes in the metrics", worker)
    time.sleep(20)
    assert worker.alive()
    committed = _committed(kafka_bootstrap, prefix)
    assert all(committed[p] <= (durable[p] or 0) for p in committed), (committed, durable)
    allow()
    _send(kafka_bootstrap, topic, traffic.closing(t=2 * WINDOW_S))
    wait_for(lambda: log_caught_up(kafka_bootstrap, prefix, log), 180, "every event in the log", worker)
    assert "retry" in worker.output() and "written after" in worker.output()
    _check_log(log, traffic)


def _committed(bootstrap: str, prefix: str) -> dict[int, int]:
    """The group's committed offset of every partition of its ``events`` topic (0: none)."""
    topic = Topics(prefix).events
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=prefix + "streamrec-ingest", enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in end_offsets(bootstrap, topic)}
    finally:
        consumer.close()


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, which it may stop and start again on the same port and data.
    Both ports lie below the kernel's ephemeral range (``kafka_local.port_below_ephemeral``)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("STREAMREC_TEST_BROKER") == "testcontainers":
        pytest.skip("needs a local broker it can stop and restart")
    home, port, controller = tmp_path / "kafka", kafka_local.port_below_ephemeral(), kafka_local.port_below_ephemeral()

    def start() -> str:
        return kafka_local.start(home=home, port=port, partitions=PARTITIONS, controller_port=controller).bootstrap_servers

    bootstrap = start()
    yield bootstrap, lambda: kafka_local.stop(home), start
    kafka_local.stop(home)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def _metrics_up(port: int) -> bool:
    """The learner serves its metrics once it is connected to ``examples`` (``scrape`` reads an
    unreachable page as no samples)."""
    return bool(scrape(f"http://127.0.0.1:{port}/metrics"))


def _learner_read(port: int) -> float:
    """Examples the learner has read: trained, skipped as duplicates, or skipped for a reason."""
    try:
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return 0.0
    return sum(total(samples, name) for name in ("streamrec_learner_examples_total",
                                                 "streamrec_learner_duplicates_total", "streamrec_learner_skipped_total"))


def test_a_broker_outage_of_60_s_is_waited_out(own_broker, unique_name, tmp_path):
    """Stop the broker for 60 s while the worker has a stream in hand, start it again on the same
    port and data: the worker (one process, never restarted) logs every event once afterwards;
    the learner reads every example of it; serving never exits and answers /healthz all along."""
    bootstrap, stop_broker, start_broker = own_broker
    prefix = f"t{unique_name}."
    ensure_topics(bootstrap, PARTITIONS, Topics(prefix))
    topic = Topics(prefix).events
    log = DeltaLog(tmp_path / "log")
    worker = WorkerProcess(bootstrap, prefix, tmp_path / "w", "--worker-id", f"w-{unique_name}",
                           "--attribution-window-s", str(WINDOW_S), "--log-flush-interval-s", "1", log_dir=Path(log.root))
    common = ["--bootstrap-servers", bootstrap, "--topic-prefix", prefix]
    serving_port, learner_port = kafka_local.free_port(), kafka_local.free_port()
    others = {
        "serving": spawn(tmp_path, "serving", "serve", *common, "--store-dir", str(tmp_path / "store"),
                         "--port", str(serving_port), "--kind", "click", "--seed", "0"),
        "learner": spawn(tmp_path, "learner", "learner", *common, "--store-dir", str(tmp_path / "store"),
                         "--checkpoint-dir", str(tmp_path / "ckpt"), "--web-port", str(learner_port)),
    }
    traffic = Traffic(time.time() - 1200)
    try:
        _send(bootstrap, topic, traffic.impressions(300, t=0))
        worker.start()
        wait_for(lambda: log_caught_up(bootstrap, prefix, log), 180, "the first slates in the log", worker)
        wait_for(lambda: _healthy(serving_port), 120, "serving to answer")
        wait_for(lambda: _metrics_up(learner_port), 120, "the learner to be connected")
        batch = traffic.impressions(1500, t=10)
        _send(bootstrap, topic, batch + traffic.clicks([e["request_id"] for e in batch]))
        stop_broker()  # mid-stream: the worker has just been handed the batch
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert worker.alive(), f"the worker exited during the outage:\n{worker.output()[-3000:]}"
            for name, proc in others.items():
                assert proc.poll() is None, f"{name} exited during the outage"
            assert _healthy(serving_port), "serving stopped answering during the outage"
            time.sleep(1)
        start_broker()
        _send(bootstrap, topic, traffic.closing(t=2 * WINDOW_S))
        wait_for(lambda: log_caught_up(bootstrap, prefix, log), 240, "every event in the log after the outage", worker)
        assert worker.alive() and worker.runs == 1
        _check_log(log, traffic)
        examples = Topics(prefix).examples
        wait_for(lambda: _learner_read(learner_port) >= sum(end_offsets(bootstrap, examples).values()), 240,
                 "the learner to read every example after the outage")
        assert _healthy(serving_port)
        for name, proc in others.items():
            assert proc.poll() is None, f"{name} exited after the outage"
    except AssertionError:
        for name in others:
            print(f"--- {name}.log (tail)\n" + (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        worker.stop(signal.SIGKILL)
        for proc in others.values():
            stop(proc)
