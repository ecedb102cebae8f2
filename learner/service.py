"""``streamrec learner``: trains ``OnlineMF`` on the ``examples`` topic and publishes the model.

The loop, one poll at a time (at most ``batch_size`` messages, or what ``batch_timeout_s`` brings),
trained in micro-batches of at most ``batch_size`` labelled items per kind:

1. poll ``examples`` (``stream.examples.Example``, one message per outcome) and decode the batch in
   columns, one row per labelled item (``decode_examples``); drop outcomes already trained, re-sent by a
   worker that replayed a batch after a crash (``learner.outcomes``, ``streamrec_learner_duplicates_total``),
   examples flagged ``anomalous`` (counted) and malformed ones (logged);
2. predict-then-train per kind (``learn_batch`` returns the scores made before the update), which
   gives the prequential figures beside their running-mean baselines
   (``streamrec_prequential_rmse{kind}``, ``streamrec_prequential_baseline_rmse{kind}``, and the
   click log loss pair). For clicks the figure is of the probability at the shown position, from a
   ``PositionCalibration`` fitted (unweighted) on the same clicks, predict-then-train; its state
   goes out with every delta and snapshot and into the checkpoint (the fitted parameters are
   restored; its window of outcomes refills after a restart). Click outcomes reach the
   calibrations and figures slate by slate (``learner.slate_order``). Ranking keeps the
   position-free attractiveness. Under the worker's ``immediate`` feedback protocol a shown item
   waits for a click in a waiting window (checkpointed) and then trains with the window's
   importance weights, and it is scored once its label is final (``learner.feedback``; the
   scoring is not checkpointed: after a restart those clicks train as plain positives);
3. every ``publish_interval_s``: the rows touched since the last publish go out as a delta on
   ``model.updates``; every ``snapshot_interval_s``: a checksummed snapshot goes to the model
   store and its manifest onto ``model.updates`` (format: ``learner/PUBLISHING.md``);
4. every ``checkpoint_interval_s`` (and on a clean stop): weights, id maps, optimiser state, the
   consumed offsets, the remembered outcome keys and the publisher's sequence are written
   together, atomically.

The learner owns its offsets: they live in the checkpoint, not in a consumer group, so a restart
resumes exactly after the last checkpointed example — nothing is lost, and only what came after
the last checkpoint is learned again. The outcome keys are saved with the checkpoint rather than
rebuilt, so the restarted learner makes the same duplicate decisions on what it reads again.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import start_http_server

from learner.calibration import PositionCalibration, logit
from learner.checkpoint import Checkpointer
from learner.feedback import FinalLabels, WaitingWindow, fake_negative_weights
from learner.metrics import (BASELINE_LOGLOSS, BASELINE_RMSE, BATCH_SECONDS, DUPLICATES, EXAMPLES_SEEN, LOGLOSS,
                             OUTCOME_KEYS, OUTCOME_KEYS_EVICTED, PUBLISH_FAILURES, PUBLISH_TS, RECONNECTS, RMSE,
                             SKIPPED)
from learner.online_mf import OnlineMF
from learner.outcomes import OutcomeWindow
from learner.quality import ClickQuality, RatingQuality
from learner.slate_order import SlateOrder
from learner.settings import LearnerSettings
from learner.updates import delta_messages, write_snapshot
from stream.examples import CLICK, CLICKED, EXAMPLE_KINDS, RATING, SHOWN, ExampleBatch, decode_examples, outcome_key
from stream.topics import Topics

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds without examples between the learner's checks whether some are waiting (``_stalled``):
# a backlog seen at two checks in a row, with nothing read between them, is a stall.
STALL_CHECK_S = 15.0
# Backoff while the broker cannot be reached: doubles from the first to the max.
CONNECT_RETRY_FIRST_S, CONNECT_RETRY_MAX_S = 0.5, 15.0
# The longest a publish waits for the broker before it counts as failed (tried again later).
PUBLISH_BLOCK_S = 10.0
# Seconds without examples after which event time follows the wall clock for the waiting window
# (the worker's default idle grace), so that a quiet stream's last slates still train.
IDLE_GRACE_S = 2.0


class Learner:
    """The learner's state and loop (see the module docstring)."""

    def __init__(self, settings: LearnerSettings) -> None:
        if not settings.bootstrap_servers:
            raise ValueError("no Kafka cluster: set KAFKA_BOOTSTRAP_SERVERS or pass --bootstrap-servers")
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.checkpointer = Checkpointer(settings.checkpoint_dir)
        restored = self.checkpointer.load()
        self.outcomes = OutcomeWindow(settings.outcome_retention_s, settings.outcome_keys_max)
        if restored is None:
            self.model = OnlineMF(n_factors=settings.n_factors, rating_range=settings.rating_range,
                                  device=settings.device, seed=0)
            state: dict = {}
            waiting = None
        else:
            self.model, state, outcomes, waiting = restored
            if outcomes:
                self.outcomes.load_state(outcomes)
            log.info("resumed from checkpoint %s (offsets %s, %d outcome keys)", self.checkpointer.latest(),
                     state.get("offsets"), len(self.outcomes))
        self.offsets: dict[int, int] = {int(p): o for p, o in state.get("offsets", {}).items()}
        self.seq: int = state.get("seq", 0)
        self._backlog_at: dict[int, int] | None = None  # the offsets at which ``_stalled`` last saw a backlog
        self.max_event_ts: float | None = state.get("max_event_ts")
        self.quality = {CLICK: ClickQuality(settings.rmse_window), RATING: RatingQuality(settings.rmse_window)}
        # Two calibrations of click probabilities at a position: the published one, of serving's
        # scores of the items it showed (what serving applies it to), and the learner's own, of its
        # prequential scores (its figures and the fake-negative weights).
        self.calibration = PositionCalibration()
        self._served_scores = False  # whether the published calibration has learned serving's scores yet
        self.own_calibration = PositionCalibration()
        # The shown items of the ``immediate`` protocol, until their labels are final.
        self.final_labels: FinalLabels[list] = FinalLabels(settings.attribution_window_s)  # [logit, served logit, position]
        # Under ``immediate``: the shown items' rows until the waiting window has passed, labelled
        # by the clicks that arrived meanwhile (learner.feedback.WaitingWindow); checkpointed.
        self.waiting: WaitingWindow | None = (
            WaitingWindow(settings.feedback_wait_quantile, settings.attribution_window_s)
            if settings.feedback_wait_quantile > 0 else None)
        if self.waiting is not None:  # the rows it held at the checkpoint were read but not trained
            self.waiting.load_state(state.get("waiting", {}), waiting)
        self._read_watermark = self.waiting.watermark if self.waiting is not None else float("-inf")
        # Under ``wait``, each click outcome until its slate's negatives arrive (at most two windows).
        self.slate_order: SlateOrder[tuple] = SlateOrder(2 * settings.attribution_window_s)  # (logit, served, position, label)
        if state.get("click_calibration"):  # the fitted parameters survive; the windows refill
            self.calibration.load_state(state["click_calibration"])
            self.own_calibration.load_state(state.get("own_click_calibration", state["click_calibration"]))
        self._touched_users: set[str] = set()
        self._touched_items: set[str] = set()
        self._stop = False

    # -- training ---------------------------------------------------------------------------

    def learn(self, batch: ExampleBatch) -> int:
        """Predict-then-train on one micro-batch of examples in columns (``stream.examples``:
        ``decode_examples`` or ``example_batch``); returns the number of labelled items trained on."""
        started = time.perf_counter()
        rows = self._first_sent(batch)
        rows = _kept(rows, pc.and_(pc.is_valid(rows["user_id"]),
                                   pc.and_(pc.is_valid(rows["item_id"]), pc.is_valid(rows["label"]))), "invalid")
        rows = _kept(rows, pc.invert(pc.fill_null(rows["anomalous"], False)), "anomalous")
        rows = _kept(rows, pc.is_in(rows["kind"], pa.array(EXAMPLE_KINDS)), "unknown_kind")
        if self.waiting is not None:
            rows = self.waiting.admit(rows, self.final_labels)
            self._read_watermark = self.waiting.watermark
        trained = self._train(rows)
        BATCH_SECONDS.observe(time.perf_counter() - started)
        return trained

    def release_waiting(self, idle_s: float) -> int:
        """Train the rows of the waiting window whose window has passed once event time has moved
        on by ``idle_s`` since the newest example read, as the worker's event time follows the wall
        clock when its stream goes quiet; returns the rows trained. Without it the last slates of
        a quiet stream would wait for the next event."""
        if self.waiting is None or not len(self.waiting):
            return 0
        rows = self.waiting.expired(self._read_watermark + idle_s)
        return self._train(rows) if rows.num_rows else 0

    def _train(self, rows: pa.Table) -> int:
        trained, size = 0, self.settings.batch_size
        for kind in EXAMPLE_KINDS:
            of_kind = rows.filter(pc.equal(rows["kind"], kind))
            for start in range(0, of_kind.num_rows, size):  # micro-batches of at most batch_size labelled items
                trained += self._learn_part(kind, of_kind.slice(start, size))
        return trained

    def _learn_part(self, kind: str, batch: pa.Table) -> int:
        """Predict-then-train on one micro-batch of one kind; returns the rows trained on."""
        users, items = batch["user_id"].to_pylist(), batch["item_id"].to_pylist()
        labels = batch["label"].to_numpy()
        try:
            if kind == CLICK:
                positions = batch["position"].to_numpy(zero_copy_only=False)
                shown, corrections, slots = self._delayed_feedback(batch, positions)
                weights = self._fake_negative_weights(users, items, positions, labels, shown, corrections)
                before = self.model.learn_batch(users, items, labels, kind=CLICK, positions=positions,
                                                propensities=batch["propensity"].to_numpy(zero_copy_only=False),
                                                weights=weights)
            else:
                before = self.model.learn_batch(users, items, labels, kind="rating")
        except (ValueError, TypeError, KeyError) as err:
            log.warning("skipped a %s batch of %d examples: %s", kind, batch.num_rows, err)
            SKIPPED.labels("invalid").inc(batch.num_rows)
            return 0
        if kind == CLICK:
            before, labels = self._final_click_scores(batch, before, positions, labels, shown, corrections, slots)
        quality = self.quality[kind]
        if len(labels):  # a batch may hold no settled outcome yet
            quality.add(before, labels)
        RMSE.labels(kind).set(quality.rmse())
        BASELINE_RMSE.labels(kind).set(quality.baseline_rmse())
        if kind == CLICK:
            LOGLOSS.set(quality.logloss())
            BASELINE_LOGLOSS.set(quality.baseline_logloss())
        EXAMPLES_SEEN.labels(kind).inc(batch.num_rows)
        self._touched_users.update(users)
        self._touched_items.update(items)
        newest = pc.max(batch["ts"]).as_py()
        if newest is not None:
            self.max_event_ts = newest if self.max_event_ts is None else max(self.max_event_ts, newest)
        return batch.num_rows

    def _first_sent(self, batch: ExampleBatch) -> pa.Table:
        """The batch's rows less those of outcomes already trained (``learner.outcomes``): one key
        per outcome message, from its header (``stream.examples.outcome_key``). A message without
        the fields of its key (an older producer) cannot be recognised and is kept."""
        rows = batch.rows
        if not rows.num_rows:
            return rows
        firsts = batch.first_rows()
        headers = rows.select(["kind", "stage", "event_id"]).take(firsts).to_pydict()
        keyed, keys = [], []
        for n, (kind, stage, event_id) in enumerate(zip(headers["kind"], headers["stage"], headers["event_id"])):
            if isinstance(kind, str) and isinstance(stage, str) and isinstance(event_id, str):
                keyed.append(n)
                keys.append(outcome_key(kind, stage, event_id))
        evicted = self.outcomes.evicted
        fresh = self.outcomes.fresh(keys, pc.max(rows["ts"]).as_py())
        OUTCOME_KEYS.set(len(self.outcomes))
        OUTCOME_KEYS_EVICTED.inc(self.outcomes.evicted - evicted)
        if all(fresh):
            return rows
        ends = np.r_[firsts[1:], rows.num_rows]
        keep = np.ones(rows.num_rows, dtype=bool)
        for n, new in zip(keyed, fresh):
            if not new:
                keep[firsts[n]:ends[n]] = False
        DUPLICATES.inc(int((~keep).sum()))
        return rows.filter(pa.array(keep))

    def _delayed_feedback(self, clicks: pa.Table, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
        """Under ``immediate`` feedback: which click rows are provisional negatives (``shown``,
        now held in ``final_labels`` until their labels are final) and which are the clicks that
        correct one (a ``clicked`` row whose shown item is held, from this batch or before); and
        the held slots ([logit, served logit, position]) of the shown rows, whose logits training
        fills in."""
        stages = clicks["stage"].to_numpy(zero_copy_only=False)
        shown = stages == SHOWN
        corrections = np.zeros(len(stages), dtype=bool)
        slots: list = []
        if shown.any() or len(self.final_labels):
            requests, items, ts = (clicks[f].to_pylist() for f in ("request_id", "item_id", "ts"))
            labels = clicks["label"].to_numpy()
            for row in np.flatnonzero(shown):
                slots.append([np.nan, np.nan, positions[row]])
                self.final_labels.shown(requests[row], items[row], ts[row], slots[-1])
                if labels[row] > 0:  # clicked within the waiting window
                    self.final_labels.clicked(requests[row], items[row])
            for row in np.flatnonzero(stages == CLICKED):
                corrections[row] = self.final_labels.clicked(requests[row], items[row])
        return shown, corrections, slots

    def _fake_negative_weights(self, users: list[str], items: list[str], positions: np.ndarray, labels: np.ndarray,
                               shown: np.ndarray, corrections: np.ndarray) -> np.ndarray | None:
        """The fake-negative loss weights (``learner.feedback``) of the delayed-feedback rows, 1
        elsewhere; None when the batch has none. The click probability is the calibrated one at
        the shown position, by the model of before this batch."""
        delayed = shown | corrections
        if not delayed.any():
            return None
        rows = np.flatnonzero(delayed)
        p = self.model.predict([users[r] for r in rows], [items[r] for r in rows], kind=CLICK)
        p_hat = self.own_calibration.predict(logit(p), positions[rows])
        weights = np.ones(len(users))
        positive = corrections[rows] | (labels[rows] > 0)
        weights[rows] = fake_negative_weights(p_hat, positive, self.late_share())
        return weights

    def late_share(self) -> float:
        """The share of clicks that arrive after the waiting window (1 without one: every click
        corrects a negative already trained)."""
        return 1.0 if self.waiting is None else self.waiting.late_share()

    def _final_click_scores(self, clicks: pa.Table, probabilities: np.ndarray, positions: np.ndarray,
                            labels: np.ndarray, shown: np.ndarray, corrections: np.ndarray, slots: list
                            ) -> tuple[np.ndarray, np.ndarray]:
        """The learner's click probabilities at the shown positions, and their labels, of the
        outcomes whose slate is settled: the ``clicked`` and ``closed`` rows (``wait`` protocol),
        a click held in ``slate_order`` until its slate's negatives arrive (fitted in arrival
        order, the recent positives beside older negatives would over-predict: 1.7 times at the
        quick demo's start), and the shown items whose window passed (``immediate``: held
        meanwhile in ``final_labels``; a correction is not scored itself). The probabilities come from its own
        calibration of before those outcomes. Both calibrations then learn from them (unweighted:
        they must not see the IPS weights); the published one from serving's score of each item.
        Until impressions carry scores (no model served yet) it learns the learner's logits
        instead, and it forgets those outcomes at the first scored ones: slates chosen without a
        model tell nothing of how the model's scores map to clicks (kept, they made the first
        steady steps of the quick demo read 0.5-0.7)."""
        logits = logit(probabilities)
        served = logit(clicks["score"].to_numpy(zero_copy_only=False).astype(np.float64))  # NaN: no score
        for slot, own, serving in zip(slots, logits[shown], served[shown]):
            slot[0], slot[1] = own, serving
        final = np.flatnonzero(~(shown | corrections))
        requests, ts = clicks["request_id"].to_pylist(), clicks["ts"].to_pylist()
        settled = self.slate_order.add((requests[r], labels[r], ts[r], (logits[r], served[r], positions[r], labels[r]))
                                       for r in final)
        released = self.final_labels.release(pc.max(clicks["ts"]).as_py()) if len(self.final_labels) else []
        settled += [(*slot, label) for slot, label in released if np.isfinite(slot[0])]  # not of a skipped batch
        if not settled:
            return np.empty(0), np.empty(0)
        logits, served, positions, labels = (np.array(column, dtype=np.float64) for column in zip(*settled))
        positions = positions.astype(np.int64)
        calibrated = self.own_calibration.predict(logits, positions)
        self.own_calibration.update(logits, positions, labels)
        scored = np.isfinite(served)
        if scored.any() and not self._served_scores:
            self._served_scores = True
            self.calibration.forget()
        if self._served_scores:
            self.calibration.update(served[scored], positions[scored], labels[scored])
        else:
            self.calibration.update(logits, positions, labels)
        return calibrated, labels

    def click_calibration(self) -> tuple[tuple[float, ...], float]:
        return tuple(float(a) for a in self.calibration.intercepts), float(self.calibration.slope)

    # -- publishing -------------------------------------------------------------------------

    def metrics(self) -> dict:
        figures = {}
        for kind, q in self.quality.items():
            figures[f"prequential_rmse_{kind}"] = q.rmse()
            figures[f"prequential_baseline_rmse_{kind}"] = q.baseline_rmse()
        figures["prequential_logloss_click"] = self.quality[CLICK].logloss()
        figures["prequential_baseline_logloss_click"] = self.quality[CLICK].baseline_logloss()
        return {name: value for name, value in figures.items() if not math.isnan(value)}

    def publish_delta(self, producer: KafkaProducer) -> int:
        """Send the rows touched since the last publish; returns the number of rows sent."""
        if not self._touched_users and not self._touched_items:
            return 0
        users, items = self.model.export_rows(sorted(self._touched_users), sorted(self._touched_items))
        self.seq += 1
        for key, value in delta_messages(self.settings.model, self.seq, self.model.global_mean,
                                         self.model.click_intercept, users, items,
                                         rating_range=self.model.rating_range,
                                         click_calibration=self.click_calibration(),
                                         max_event_ts=self.max_event_ts, metrics=self.metrics()):
            producer.send(self.topics.model_updates, key=key.encode(), value=orjson.dumps(value))
        producer.flush(timeout=PUBLISH_BLOCK_S)
        self._touched_users.clear()
        self._touched_items.clear()
        PUBLISH_TS.set(time.time())
        return len(users) + len(items)

    def publish_snapshot(self, producer: KafkaProducer) -> dict:
        """Write a full snapshot to the store and announce it; includes every delta up to ``seq``."""
        users, items = self.model.export_rows(None, None)
        manifest = write_snapshot(self.settings.store_dir, self.settings.model, self.seq,
                                  self.model.global_mean, self.model.click_intercept, users, items,
                                  metrics=self.metrics(), rating_range=self.model.rating_range,
                                  click_calibration=self.click_calibration())
        producer.send(self.topics.model_updates, key=f"snapshot/{self.settings.model}".encode(),
                      value=orjson.dumps(manifest))
        producer.flush(timeout=PUBLISH_BLOCK_S)
        log.info("snapshot %s: %d users, %d items", manifest["version"], len(users), len(items))
        return manifest

    def checkpoint(self) -> Path:
        return self.checkpointer.save(self.model, {
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "seq": self.seq, "max_event_ts": self.max_event_ts, "saved_ts": time.time(),
            "click_calibration": self.calibration.state(),
            "own_click_calibration": self.own_calibration.state(),
            "waiting": self.waiting.state() if self.waiting is not None else {},
        }, self.outcomes.state(), self.waiting.table() if self.waiting is not None else None)

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
        # A send waits at most PUBLISH_BLOCK_S for the broker, so the loop stays responsive in an outage.
        producer = _until_reachable(lambda: KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", linger_ms=5,
                                                          max_request_size=8 * 1024 * 1024,
                                                          max_block_ms=int(PUBLISH_BLOCK_S * 1000)),
                                    "starting the producer")
        consumer, tps = self._connect()
        _until_reachable(self._continue_after_restart, f"reading the last seq on {self.topics.model_updates}")
        if s.web_port:
            start_http_server(s.web_port, addr=s.web_host)
        now = time.monotonic()
        last_publish = last_checkpoint = now
        last_snapshot = now if self.seq else now - s.snapshot_interval_s
        snapshot_seq = None  # seq of the last snapshot this run wrote
        last_data = last_stall_check = now
        log.info("learning from %s (%d partitions) on %s", self.topics.examples, len(tps), self.model.device)
        try:
            while not self._stop:
                if time.monotonic() - max(last_data, last_stall_check) >= STALL_CHECK_S:
                    last_stall_check = time.monotonic()
                    if self._stalled(consumer, tps):
                        consumer.close()
                        consumer, tps = self._connect()
                polled = consumer.poll(timeout_ms=int(s.batch_timeout_s * 1000), max_records=s.batch_size)
                values = []
                for tp, records in polled.items():
                    values += [record.value for record in records]
                    self.offsets[tp.partition] = records[-1].offset + 1
                now = time.monotonic()
                if values:
                    batch = decode_examples(values)
                    if batch.malformed:
                        SKIPPED.labels("malformed").inc(batch.malformed)
                    self.learn(batch)
                    last_data = now
                else:
                    if now - last_data >= IDLE_GRACE_S:
                        self.release_waiting(now - last_data)
                    if max_idle_s is not None and now - last_data > max_idle_s:
                        break
                if now - last_publish >= s.publish_interval_s:
                    _published(self.publish_delta, producer, "delta")
                    last_publish = now
                if now - last_snapshot >= s.snapshot_interval_s and self.seq and self.seq != snapshot_seq:
                    if _published(self.publish_snapshot, producer, "snapshot"):
                        last_snapshot, snapshot_seq = now, self.seq
                if now - last_checkpoint >= s.checkpoint_interval_s:
                    self.checkpoint()
                    last_checkpoint = now
            _published(self.publish_delta, producer, "delta")
            if self.seq and self.seq != snapshot_seq:  # a clean stop leaves a snapshot of everything learned
                _published(self.publish_snapshot, producer, "snapshot")
            self.checkpoint()
        finally:
            consumer.close()
            producer.close()

    def _connect(self) -> tuple[KafkaConsumer, list[TopicPartition]]:
        """``_consumer()``, retried while the broker cannot be reached (``_until_reachable``)."""
        return _until_reachable(self._consumer, f"connecting to {self.topics.examples}")

    def _consumer(self) -> tuple[KafkaConsumer, list[TopicPartition]]:
        """A consumer assigned every partition of ``examples``, at the learner's next offsets."""
        s = self.settings
        consumer = KafkaConsumer(bootstrap_servers=s.bootstrap_servers, enable_auto_commit=False,
                                 group_id=None, max_poll_records=s.batch_size,
                                 fetch_max_bytes=16 * 1024 * 1024)
        try:
            partitions = sorted(consumer.partitions_for_topic(self.topics.examples) or [])
        except KafkaError:
            consumer.close()
            raise
        if not partitions:
            consumer.close()
            raise RuntimeError(f"topic {self.topics.examples} does not exist (start the worker or create topics)")
        tps = [TopicPartition(self.topics.examples, p) for p in partitions]
        consumer.assign(tps)
        for tp in tps:
            if tp.partition in self.offsets:
                consumer.seek(tp, self.offsets[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        return consumer, tps

    def _stalled(self, consumer: KafkaConsumer, tps: list[TopicPartition]) -> bool:
        """True when ``examples`` held records past the learner's offsets at the last check and
        still does, with nothing read since: after a broker outage the consumer can stay connected
        to nothing (seen with kafka-python 3.0 after a 60 s outage), and only a new one reads again.
        One sighting is not enough: examples that have just arrived are waiting too."""
        try:
            ends = consumer.end_offsets(tps)
        except KafkaError as err:  # the broker is still away: nothing to decide yet
            log.info("examples' end offsets unavailable (%s); the learner keeps waiting", err)
            return False
        behind = {tp.partition: end - self.offsets.get(tp.partition, 0) for tp, end in ends.items()
                  if end > self.offsets.get(tp.partition, 0)}
        seen_before, self._backlog_at = self._backlog_at, (dict(self.offsets) if behind else None)
        if not behind or seen_before != self.offsets:
            return False
        log.warning("no examples for %.0f s although %d are waiting (%s); reconnecting the consumer",
                    2 * STALL_CHECK_S, sum(behind.values()), behind)
        RECONNECTS.inc()
        self._backlog_at = None
        return True


def _kept(rows: pa.Table, keep: pa.ChunkedArray, reason: str) -> pa.Table:
    """The rows where ``keep`` holds; the others are counted as skipped for ``reason``."""
    dropped = rows.num_rows - pc.sum(keep.cast(pa.int64())).as_py() if rows.num_rows else 0
    if not dropped:
        return rows
    SKIPPED.labels(reason).inc(dropped)
    return rows.filter(keep)


def _published(publish: Callable[[KafkaProducer], object], producer: KafkaProducer, what: str) -> bool:
    """``publish(producer)``; False, logged and counted, when Kafka is unreachable. A failed
    delta's rows stay touched and go out with the next one under a later ``seq`` (replicas drop
    an incomplete publish once a later one completes); a failed snapshot is tried again."""
    try:
        publish(producer)
    except KafkaError as err:
        PUBLISH_FAILURES.labels(what).inc()
        log.warning("publishing a %s failed (%s: %s); the next publish carries its rows", what,
                    type(err).__name__, err)
        return False
    return True


def _until_reachable(operation: Callable[[], T], what: str) -> T:
    """``operation()``, retried with backoff while the broker cannot be reached: a learner started
    or reconnecting during an outage waits for the broker instead of exiting."""
    delay, failures = CONNECT_RETRY_FIRST_S, 0
    while True:
        try:
            result = operation()
        except KafkaError as err:
            failures += 1
            log.warning("%s failed, the broker is unreachable (%s: %s); retry %d in %.1f s", what,
                        type(err).__name__, err, failures, delay)
            time.sleep(delay)
            delay = min(delay * 2, CONNECT_RETRY_MAX_S)
            continue
        if failures:
            log.info("%s succeeded after %d failed attempts", what, failures)
        return result


def run_learner(settings: LearnerSettings) -> None:
    """``streamrec learner``: run until SIGINT/SIGTERM, then checkpoint and exit."""
    learner = Learner(settings)
    signal.signal(signal.SIGTERM, learner.stop)
    signal.signal(signal.SIGINT, learner.stop)
    learner.run()
