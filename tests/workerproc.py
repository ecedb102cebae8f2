"""Runs ``streamrec worker`` as a real subprocess for integration tests (so it can be SIGKILLed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

from kafka import KafkaConsumer, TopicPartition

from stream.log.table import EVENTS, EXAMPLES, DeltaLog
from stream.topics import Topics, end_offsets


class WorkerProcess:
    """One ``streamrec worker`` process on its own topic prefix and state folder; its log folder is
    ``root/log`` unless ``log_dir`` names one that several workers of a group share."""

    def __init__(self, bootstrap: str, prefix: str, root: Path, *extra: str, anomaly: bool = False,
                 log_dir: Path | None = None) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir or root / "log"
        self.extra = extra if anomaly else (*extra, "--no-anomaly")
        self.proc: subprocess.Popen | None = None
        self.log = DeltaLog(self.log_dir)
        self.runs = 0

    def start(self) -> "WorkerProcess":
        self.runs += 1
        out = open(self.root / f"worker-{self.runs}.log", "wb")
        env = dict(os.environ, STREAMREC_HOME=str(self.root / "home"), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker", "--bootstrap-servers", self.bootstrap,
             "--topic-prefix", self.prefix, "--log-dir", str(self.log_dir), "--web-port", "0",
             "--partitions", "2", "--batch-timeout-s", "0.2", *self.extra],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            self.proc.wait(timeout)

    def output(self) -> str:
        return "\n".join((self.root / f"worker-{i}.log").read_text(errors="replace")
                         for i in range(1, self.runs + 1))

    def logged_events(self):
        return self.log.read(EVENTS)

    def logged_examples(self):
        return self.log.read(EXAMPLES)

    def caught_up(self) -> bool:
        """Whether the worker has committed every message on its ``events`` topic.

        It commits a batch's offsets only once the batch's output is acknowledged and its rows
        are in the log, so this says that everything sent so far has been processed and logged:
        nothing more is on its way.
        """
        group = self.prefix + "streamrec-ingest"  # the worker's consumer group (stream.worker.app)
        return committed_all(self.bootstrap, Topics(self.prefix).events, group)


T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, worker: WorkerProcess | None = None) -> T:
    """Poll ``predicate`` until it returns a true value, and return that value; fail with the
    worker's output when it does not come true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if worker is not None and worker.proc is not None and not worker.alive():
            raise AssertionError(f"the worker exited while waiting for {what}:\n{worker.output()[-5000:]}")
        time.sleep(0.3)
    tail = worker.output()[-5000:] if worker is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def committed_all(bootstrap: str, topic: str, group: str) -> bool:
    """Whether ``group`` has committed the end offset of every partition of ``topic``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(partitions)
        return bool(partitions) and all((consumer.committed(tp) or 0) == ends[tp] for tp in partitions)
    finally:
        consumer.close()


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 60) -> list[dict]:
    """Read JSON messages from the start of ``topic`` until ``expected`` arrived (or the timeout).

    Every partition is assigned explicitly and read from its beginning: a group-less
    ``subscribe`` once read nothing for 90 s in CI from a topic that held the messages.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic)
        consumer.assign([TopicPartition(topic, p) for p in partitions or ()])
        consumer.seek_to_beginning()
        while len(out) < expected and time.monotonic() < deadline:
            # poll, not the iterator: re-entering kafka-python's iterator after its idle timeout
            # can hand out records it had yielded already (every dead letter read twice, once)
            for records in consumer.poll(timeout_ms=1000).values():
                out.extend(json.loads(record.value) for record in records)
    finally:
        consumer.close()
    return out


def log_caught_up(bootstrap: str, prefix: str, log: DeltaLog) -> bool:
    """Whether the log records, for the worker group of ``prefix``, every message of its
    ``events`` topic: nothing more is on its way into the log."""
    topic = Topics(prefix).events
    ends = end_offsets(bootstrap, topic)
    resume = log.resume_offsets(prefix + "streamrec-ingest", topic, ends)
    return bool(ends) and all((resume[p] or 0) >= end for p, end in ends.items())
