"""``streamrec learner``: trains ``OnlineMF`` on the ``examples`` topic and publishes the model.

The loop, one micro-batch at a time (closed at ``batch_size`` examples or ``batch_timeout_s``):

1. poll ``examples`` (``stream.examples.Example``); drop examples flagged ``anomalous`` (counted)
   and malformed ones (logged);
2. predict-then-train per kind (``learn_batch`` returns the scores made before the update), which
   gives the prequential RMSE exported as ``streamrec_prequential_rmse{kind}``;
3. every ``publish_interval_s``: the rows touched since the last publish go out as a delta on
   ``model.updates``; every ``snapshot_interval_s``: a checksummed snapshot goes to the model
   store and its manifest onto ``model.updates`` (format: ``learner/PUBLISHING.md``);
4. every ``checkpoint_interval_s`` (and on a clean stop): weights, id maps, optimiser state, the
   consumed offsets and the publisher's sequence are written together, atomically.

The learner owns its offsets: they live in the checkpoint, not in a consumer group, so a restart
resumes exactly after the last checkpointed example — nothing is lost, and only what came after
the last checkpoint is learned again.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from collections import deque
from pathlib import Path

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import start_http_server

from learner.metrics import BATCH_SECONDS, EXAMPLES_SEEN, PUBLISH_TS, RMSE, SKIPPED
from learner.online_mf import OnlineMF
from learner.settings import LearnerSettings
from learner.updates import delta_messages, write_snapshot
from stream.examples import CLICK, EXAMPLE_KINDS, Example
from stream.topics import Topics

log = logging.getLogger(__name__)


class SlidingRMSE:
    """Root mean squared error over the last ``window`` errors."""

    def __init__(self, window: int) -> None:
        self._sq: deque[float] = deque(maxlen=window)

    def add(self, errors: np.ndarray) -> None:
        self._sq.extend((errors.astype(np.float64) ** 2).tolist())

    @property
    def value(self) -> float:
        return math.sqrt(sum(self._sq) / len(self._sq)) if self._sq else float("nan")


class Checkpointer:
    """Atomic checkpoints: ``ckpt-<n>/`` written whole, then ``LATEST`` switched by rename."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def latest(self) -> Path | None:
        pointer = self.folder / "LATEST"
        if not pointer.is_file():
            return None
        path = self.folder / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, model: OnlineMF, state: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        previous = self.latest()
        n = int(previous.name.split("-")[1]) + 1 if previous else 1
        target = self.folder / f"ckpt-{n:08d}"
        tmp = self.folder / f".ckpt-{n:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(tmp / "model")
        (tmp / "learner.json").write_text(json.dumps(state))
        os.replace(tmp, target)
        pointer_tmp = self.folder / "LATEST.tmp"
        pointer_tmp.write_text(target.name)
        os.replace(pointer_tmp, self.folder / "LATEST")
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return target

    def load(self) -> tuple[OnlineMF, dict] | None:
        path = self.latest()
        if path is None:
            return None
        return OnlineMF.load(path / "model"), json.loads((path / "learner.json").read_text())


class Learner:
    """The learner's state and loop (see the module docstring)."""

    def __init__(self, settings: LearnerSettings) -> None:
        if not settings.bootstrap_servers:
            raise ValueError("no Kafka cluster: set KAFKA_BOOTSTRAP_SERVERS or pass --bootstrap-servers")
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.checkpointer = Checkpointer(settings.checkpoint_dir)
        restored = self.checkpointer.load()
        if restored is None:
            self.model = OnlineMF(n_factors=settings.n_factors, rating_range=settings.rating_range,
                                  device=settings.device, seed=0)
            state: dict = {}
        else:
            self.model, state = restored
            log.info("resumed from checkpoint %s (offsets %s)", self.checkpointer.latest(), state.get("offsets"))
        self.offsets: dict[int, int] = {int(p): o for p, o in state.get("offsets", {}).items()}
        self.seq: int = state.get("seq", 0)
        self.max_event_ts: float | None = state.get("max_event_ts")
        self.rmse = {kind: SlidingRMSE(settings.rmse_window) for kind in EXAMPLE_KINDS}
        self._touched_users: set[str] = set()
        self._touched_items: set[str] = set()
        self._stop = False

    # -- training ---------------------------------------------------------------------------

    def learn(self, examples: list[Example]) -> int:
        """Predict-then-train on one micro-batch; returns the number of examples trained on."""
        started = time.perf_counter()
        by_kind: dict[str, list[Example]] = {kind: [] for kind in EXAMPLE_KINDS}
        for example in examples:
            if example.get("anomalous"):
                SKIPPED.labels("anomalous").inc()
                continue
            kind = example.get("kind")
            if kind not in by_kind:
                SKIPPED.labels("unknown_kind").inc()
                continue
            by_kind[kind].append(example)
        trained = 0
        for kind, batch in by_kind.items():
            if not batch:
                continue
            users = [e["user_id"] for e in batch]
            items = [e["item_id"] for e in batch]
            labels = np.array([e["label"] for e in batch], dtype=np.float64)
            try:
                if kind == CLICK:
                    before = self.model.learn_batch(
                        users, items, labels, kind=CLICK,
                        positions=[e["position"] for e in batch],
                        propensities=[e["propensity"] for e in batch],
                    )
                else:
                    before = self.model.learn_batch(users, items, labels, kind="rating")
            except (ValueError, TypeError, KeyError) as err:
                log.warning("skipped a %s batch of %d examples: %s", kind, len(batch), err)
                SKIPPED.labels("invalid").inc(len(batch))
                continue
            self.rmse[kind].add(before - labels)
            RMSE.labels(kind).set(self.rmse[kind].value)
            EXAMPLES_SEEN.labels(kind).inc(len(batch))
            self._touched_users.update(users)
            self._touched_items.update(items)
            newest = max(e["ts"] for e in batch)
            self.max_event_ts = newest if self.max_event_ts is None else max(self.max_event_ts, newest)
            trained += len(batch)
        BATCH_SECONDS.observe(time.perf_counter() - started)
        return trained

    # -- publishing -------------------------------------------------------------------------

    def metrics(self) -> dict:
        return {f"prequential_rmse_{kind}": r.value for kind, r in self.rmse.items() if not math.isnan(r.value)}

    def publish_delta(self, producer: KafkaProducer) -> int:
        """Send the rows touched since the last publish; returns the number of rows sent."""
        if not self._touched_users and not self._touched_items:
            return 0
        users, items = self.model.export_rows(sorted(self._touched_users), sorted(self._touched_items))
        self.seq += 1
        for key, value in delta_messages(self.settings.model, self.seq, self.model.global_mean,
                                         self.model.click_intercept, users, items,
                                         rating_range=self.model.rating_range,
                                         max_event_ts=self.max_event_ts, metrics=self.metrics()):
            producer.send(self.topics.model_updates, key=key.encode(), value=orjson.dumps(value))
        producer.flush()
        self._touched_users.clear()
        self._touched_items.clear()
        PUBLISH_TS.set(time.time())
        return len(users) + len(items)

    def publish_snapshot(self, producer: KafkaProducer) -> dict:
        """Write a full snapshot to the store and announce it; includes every delta up to ``seq``."""
        users, items = self.model.export_rows(None, None)
        manifest = write_snapshot(self.settings.store_dir, self.settings.model, self.seq,
                                  self.model.global_mean, self.model.click_intercept, users, items,
                                  metrics=self.metrics(), rating_range=self.model.rating_range)
        producer.send(self.topics.model_updates, key=f"snapshot/{self.settings.model}".encode(),
                      value=orjson.dumps(manifest))
        producer.flush()
        log.info("snapshot %s: %d users, %d items", manifest["version"], len(users), len(items))
        return manifest

    def checkpoint(self) -> Path:
        return self.checkpointer.save(self.model, {
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "seq": self.seq, "max_event_ts": self.max_event_ts, "saved_ts": time.time(),
        })

    # -- the loop ---------------------------------------------------------------------------

    def _continue_after_restart(self) -> None:
        """After a restart, number deltas after the last one on the topic (a crash may have
        published some after the checkpoint) and republish every row once, so that serving
        converges on the restored model rather than on rows learned after the checkpoint."""
        tp = TopicPartition(self.topics.model_updates, 0)
        probe = KafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers, enable_auto_commit=False,
                              group_id=None, consumer_timeout_ms=2000)
        try:
            probe.assign([tp])
            end = probe.end_offsets([tp])[tp]
            probe.seek(tp, max(0, end - 500))
            key = f"delta/{self.settings.model}".encode()
            for record in probe:
                if record.key == key:
                    self.seq = max(self.seq, int(orjson.loads(record.value)["seq"]))
                if record.offset >= end - 1:
                    break
        finally:
            probe.close()
        if len(self.model.users) or len(self.model.items):
            self._touched_users.update(self.model.users.ids)
            self._touched_items.update(self.model.items.ids)

    def stop(self, *_: object) -> None:
        self._stop = True

    def run(self, max_idle_s: float | None = None) -> None:
        """Consume until stopped (SIGTERM/SIGINT), or until idle for ``max_idle_s`` if given."""
        s = self.settings
        consumer = KafkaConsumer(bootstrap_servers=s.bootstrap_servers, enable_auto_commit=False,
                                 group_id=None, max_poll_records=s.batch_size,
                                 fetch_max_bytes=16 * 1024 * 1024)
        producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", linger_ms=5,
                                 max_request_size=8 * 1024 * 1024)
        partitions = sorted(consumer.partitions_for_topic(self.topics.examples) or [])
        if not partitions:
            raise RuntimeError(f"topic {self.topics.examples} does not exist (start the worker or create topics)")
        tps = [TopicPartition(self.topics.examples, p) for p in partitions]
        consumer.assign(tps)
        for tp in tps:
            if tp.partition in self.offsets:
                consumer.seek(tp, self.offsets[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        self._continue_after_restart()
        if s.web_port:
            start_http_server(s.web_port, addr=s.web_host)
        now = time.monotonic()
        last_publish = last_checkpoint = now
        last_snapshot = now if self.seq else now - s.snapshot_interval_s
        last_data = now
        log.info("learning from %s (%d partitions) on %s", self.topics.examples, len(tps), self.model.device)
        try:
            while not self._stop:
                polled = consumer.poll(timeout_ms=int(s.batch_timeout_s * 1000), max_records=s.batch_size)
                examples = []
                for tp, records in polled.items():
                    for record in records:
                        try:
                            examples.append(orjson.loads(record.value))
                        except orjson.JSONDecodeError:
                            SKIPPED.labels("not_json").inc()
                    self.offsets[tp.partition] = records[-1].offset + 1
                now = time.monotonic()
                if examples:
                    self.learn(examples)
                    last_data = now
                elif max_idle_s is not None and now - last_data > max_idle_s:
                    break
                if now - last_publish >= s.publish_interval_s:
                    self.publish_delta(producer)
                    last_publish = now
                if now - last_snapshot >= s.snapshot_interval_s and self.seq:
                    self.publish_snapshot(producer)
                    last_snapshot = now
                if now - last_checkpoint >= s.checkpoint_interval_s:
                    self.checkpoint()
                    last_checkpoint = now
            self.publish_delta(producer)
            self.checkpoint()
        finally:
            consumer.close()
            producer.close()


def run_learner(settings: LearnerSettings) -> None:
    """``streamrec learner``: run until SIGINT/SIGTERM, then checkpoint and exit."""
    learner = Learner(settings)
    signal.signal(signal.SIGTERM, learner.stop)
    signal.signal(signal.SIGINT, learner.stop)
    learner.run()
