"""The monitor: how good the served model is, and whether the world is drifting away from it.

It reads the outcomes on ``examples`` (``stream.examples.Example``), one row per labelled item
(``decode_examples``), and keeps:

* **served quality** per kind over the last ``rmse_window`` outcomes, a slate's click outcomes
  scored together when its negatives arrive (``learner.slate_order``), each figure beside its
  running-mean baseline (``learner.quality``): the prediction is the one made by the model
  version that was live at the time (ratings: the predicted rating, clipped to the version's
  rating range as the learner's prequential scores are, so that both RMSEs of one model on the
  same outcomes agree; clicks: the click probability *at the position where the item was shown*,
  with the version's click calibration, against the 0/1 label). The version is, in this order,
  the one named by the outcome's ``model_version`` (the version that served the impression) if it
  is still held, else the one live at the outcome's event time ``ts`` if that is within the held
  history, else the one live when the outcome (for a click, its whole slate) had arrived on
  ``examples``. The last case covers
  ratings replayed with historical timestamps and old impressions; the learner consumes the same
  topic in parallel, so that version has not learned from the outcome yet. Anomalous outcomes are
  not scored (the learner skips them too); every outcome is counted by how its version was found
  in ``streamrec_serving_examples_total{result}``.
* **drift** (``serving.drift``), in three groups (docs/monitoring.md says which answers what):
  what the model cannot change, which may alarm (``user_activity``: which users come, a slate
  shown or a rating each, not who clicks, which depends on what the model showed them;
  ``new_users``, ``new_items``: the share of scored outcomes whose user or item the serving
  version does not know); what the model changes itself, statistics that never alarm
  (``score``, ``item_popularity``, ``label_rate``: the feedback loop moves them whenever the
  model learns); and quality, Page-Hinkley (``serving.concept_drift``) on the served model's
  errors (``loss_click``: the calibration error p - y of each click outcome, two-sided;
  ``loss_rating``: the squared error in excess of the running mean rating's), so that a change
  of the click rate that the model follows is not mistaken for a worse model. The share signals
  alarm only when they rise.
* the **seen items** of each user (for ``exclude_seen``) and the **popularity** counts (for the
  fallback); an interaction is a rating or a positive click.
* the **recent outcomes** that the shadow check scores candidate models on.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from serving.concept_drift import PageHinkley
from serving.drift import CategoricalDrift, NumericDrift
from serving.live import LiveModel
from serving.metrics import ENDOGENOUS_SIGNALS, ServingMetrics
from serving.model import ServingModel
from serving.popularity import Popularity
from learner.quality import ClickQuality, RatingQuality
from serving.seen import SeenItems
from learner.slate_order import SlateOrder
from serving.ab_monitor import VariantQuality
from serving.shadow import Outcome, outcome_of
from learner.feedback import FinalLabels
from stream.events import MAX_ID_CHARS
from stream.examples import CLICK, CLICKED, EXAMPLE_KINDS, RATING, SHOWN, decode_examples

# Page-Hinkley per kind: clicks on the calibration error p - y (two-sided: predictions drifting
# away from outcomes either way), ratings on the squared error in excess of the running mean's;
# the tolerated change of the mean and the evidence an alarm needs, with the false-alarm rates and
# detection delays they give, are in docs/monitoring.md.
CONCEPT_DRIFT = {CLICK: {"delta": 0.02, "threshold": 80.0, "two_sided": True},
                 RATING: {"delta": 0.1, "threshold": 120.0}}

log = logging.getLogger(__name__)


def _parse(example: object) -> tuple[str, str, float, str, float | None, str | None, bool, int] | None:
    """(user, item, label, kind, ts, model_version, anomalous, position) of a well-formed example,
    else None; a missing position reads as 1 (the top of the slate)."""
    if not isinstance(example, dict):
        return None
    user, item, label, kind = (example.get(f) for f in ("user_id", "item_id", "label", "kind"))
    ts, version, anomalous = example.get("ts"), example.get("model_version"), example.get("anomalous", False)
    if not (isinstance(user, str) and 0 < len(user) <= MAX_ID_CHARS
            and isinstance(item, str) and 0 < len(item) <= MAX_ID_CHARS
            and kind in EXAMPLE_KINDS and isinstance(label, (int, float)) and not isinstance(label, bool)
            and math.isfinite(label) and isinstance(anomalous, bool)
            and (version is None or isinstance(version, str))
            and (ts is None or (isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts)))):
        return None
    position = example.get("position")
    if position is None:
        position = 1
    elif not (isinstance(position, int) and not isinstance(position, bool) and position >= 1):
        return None
    return user, item, float(label), kind, ts, version, anomalous, position


class Monitor:
    """Served quality, drift, seen items, popularity and recent outcomes from the ``examples`` stream.

    Parameters:
        live: the live model and its recent versions.
        metrics: where the figures go.
        seen: the per-user seen sets to feed.
        popularity: the popularity counts to feed.
        rmse_window: outcomes per kind in the served quality figures.
        drift_window: observations in each of the reference and current windows.
        shadow_window: recent outcomes kept for the shadow check.
        slate_hold_s: event-time seconds a click waits for its slate's negatives before it is scored
            alone (``learner.slate_order``; twice the worker's attribution window). Under the
            worker's ``immediate`` feedback a shown item is scored once with its final label, half
            that long after its slate (``learner.feedback.FinalLabels``).
        drift_every_s: least seconds between two drift computations.
        variants: per-variant click figures of an A/B test (``serving.ab_monitor``), if one runs.
        pinned: the pinned store versions A/B variants serve, by version (an outcome they served is
            scored with its version).
    """

    def __init__(self, live: LiveModel, metrics: ServingMetrics, seen: SeenItems, popularity: Popularity,
                 rmse_window: int = 2000, drift_window: int = 1000, shadow_window: int = 2000,
                 drift_every_s: float = 1.0, variants: VariantQuality | None = None,
                 pinned: dict[str, ServingModel] | None = None, slate_hold_s: float = 2 * 1800.0) -> None:
        self.live = live
        self.slate_order: SlateOrder[tuple] = SlateOrder(slate_hold_s)
        self.final_labels: FinalLabels[tuple] = FinalLabels(slate_hold_s / 2)
        self.variants = variants
        self.pinned = {} if pinned is None else pinned
        self.metrics = metrics
        self.seen = seen
        self.popularity = popularity
        self.quality = {CLICK: ClickQuality(rmse_window), RATING: RatingQuality(rmse_window)}
        self.loss_drift = {CLICK: PageHinkley(**CONCEPT_DRIFT[CLICK]), RATING: PageHinkley(**CONCEPT_DRIFT[RATING])}
        self.drift = {
            "user_activity": CategoricalDrift(drift_window),
            "new_users": NumericDrift(drift_window, rising_only=True),
            "new_items": NumericDrift(drift_window, rising_only=True),
            "score": NumericDrift(drift_window),
            "item_popularity": CategoricalDrift(drift_window),
            "label_rate": NumericDrift(drift_window),
        }
        self._recent: deque[Outcome] = deque(maxlen=shadow_window)
        self._alarming: set[str] = set()  # exogenous signals alarming at the last refresh
        self.drift_every_s = drift_every_s
        self._drift_at = 0.0

    def recent_outcomes(self) -> list[Outcome]:
        """The last ``shadow_window`` outcomes that were not anomalous, each with its final label
        (under ``immediate`` feedback a shown item once its window has passed, clicked if a click
        corrected it: a provisional 0 would make the shadow check favour low predictions)."""
        return list(self._recent)

    def observe_served(self, scores: np.ndarray) -> None:
        """Record the scores of a slate this replica served."""
        self.drift["score"].add(scores)

    def observe(self, examples: Sequence[object], arrivals: Sequence[float] | None = None) -> int:
        """Take in a batch of decoded examples (``arrivals``: when each reached Kafka, wall time).

        Returns how many were scored for the served quality.
        """
        now = time.time()
        results: dict[str, int] = {}
        groups: dict[tuple[int, str], tuple[ServingModel, list[int]]] = {}
        scored: dict[str, list[tuple[str, str, float, int]]] = {kind: [] for kind in EXAMPLE_KINDS}
        items, users, labels, popular = [], [], [], []
        click_variants: list[object] = []  # the variant of each scored click outcome (None outside A/B tests)
        pending: list[tuple] = []  # (request_id, label, ts, what to score) in arrival order
        slates_seen: set[str] = set()  # request_ids of this batch counted in user_activity
        for example in examples:
            parsed = _parse(example)
            if parsed is None:
                results["invalid"] = results.get("invalid", 0) + 1
                continue
            user, item, label, kind, ts, version, anomalous, position = parsed
            labels.append(label)
            if kind == RATING or label > 0:
                self.seen.add(user, item)
                items.append(item)
                if not anomalous:
                    popular.append(item)
            request_id = example.get("request_id") if kind == CLICK else None
            request_id = request_id if isinstance(request_id, str) else None
            if kind == RATING or (label <= 0 and request_id not in slates_seen):  # who comes: a slate once
                users.append(user)
                if request_id is not None:
                    slates_seen.add(request_id)
            if anomalous:
                results["anomalous"] = results.get("anomalous", 0) + 1
                continue
            stage = example.get("stage")
            if request_id is not None and stage == CLICKED and self.final_labels.clicked(request_id, item):
                continue  # corrects a shown item, which is scored (and kept for the shadow check) with its final label
            what = (version, ts, kind, (user, item, label, position), example.get("variant"))
            recent = outcome_of(example, user, item, label, kind)
            if request_id is not None and stage == SHOWN and ts is not None:
                self.final_labels.shown(request_id, item, ts, (what, recent))
            else:
                self._recent.append(recent)
                pending.append((request_id, label, ts, what))
        # a slate's outcomes together, each scored by the version found when its slate is complete
        # (``immediate`` feedback: each shown item once its label is final)
        latest = max(arrivals) if arrivals else now
        final = []
        for ((version, ts, kind, (user, item, _, position), variant), recent), label in self.final_labels.release(
                max((p[2] for p in pending if p[2] is not None), default=None)):
            final.append((version, ts, kind, (user, item, label, position), variant))
            self._recent.append(recent._replace(label=label))
        for version, ts, kind, outcome, variant in self.slate_order.add(pending) + final:
            model, how = self._version_for(version, ts, latest)
            if model is None:
                results["no_model"] = results.get("no_model", 0) + 1
                continue
            results[how] = results.get(how, 0) + 1
            groups.setdefault((id(model), kind), (model, []))[1].append(len(scored[kind]))
            scored[kind].append(outcome)
            if kind == CLICK:
                click_variants.append(variant)
        for kind, outcomes in scored.items():
            if outcomes:
                predicted = self._score(kind, outcomes, [(m, idx) for (_, k), (m, idx) in groups.items() if k == kind])
                if kind == CLICK and self.variants is not None:
                    self.variants.add(click_variants, predicted, np.array([o[2] for o in outcomes]))
        for result, n in results.items():
            self.metrics.examples.labels(result).inc(n)
        self.popularity.add(popular, now)
        self.drift["item_popularity"].add(items)
        self.drift["user_activity"].add(users)
        self.drift["label_rate"].add(np.array(labels))
        self.maybe_refresh_drift()
        return sum(len(o) for o in scored.values())

    def _score(self, kind: str, outcomes: list[tuple[str, str, float, int]],
               groups: list[tuple[ServingModel, list[int]]]) -> np.ndarray:
        """Predict each outcome with its version, in arrival order, and feed quality, loss and drift;
        returns the predictions."""
        predicted, new_user, new_item = (np.empty(len(outcomes)) for _ in range(3))
        for model, idx in groups:
            user_rows = model.users.rows([outcomes[i][0] for i in idx])
            item_rows = model.items.rows([outcomes[i][1] for i in idx])
            if kind == CLICK:
                positions = np.array([outcomes[i][3] for i in idx])
                predicted[idx] = model.click_probability_at(user_rows, item_rows, positions)
            else:
                predicted[idx] = model.predict_rows(user_rows, item_rows, kind)
            new_user[idx], new_item[idx] = user_rows < 0, item_rows < 0
        labels = np.array([o[2] for o in outcomes])
        quality = self.quality[kind]
        baseline = quality.add(predicted, labels)
        self.metrics.served_rmse.labels(kind).set(quality.rmse())
        self.metrics.served_baseline_rmse.labels(kind).set(quality.baseline_rmse())
        if kind == CLICK:
            change = predicted - labels  # calibration error: mean 0 for a calibrated model at any CTR
            self.metrics.served_logloss.set(quality.logloss())
            self.metrics.served_baseline_logloss.set(quality.baseline_logloss())
            self.metrics.served_auc.set(quality.auc())
            self.metrics.served_calibration.set(quality.calibration())
        else:
            change = np.square(predicted - labels) - np.square(baseline - labels)
        detector = self.loss_drift[kind]
        raised = detector.alarms
        detector.update_many(change)
        self.metrics.drift_alarms.labels(f"loss_{kind}").inc(detector.alarms - raised)
        self.metrics.concept_drift.labels(f"loss_{kind}").set(detector.statistic)
        self.metrics.drift_alarm.labels(f"loss_{kind}").set(int(detector.alarm))
        slates = [o[0] for o in outcomes]  # a user's outcomes come in bursts: the design effect's clusters
        self.drift["new_users"].add(new_user, clusters=slates)
        self.drift["new_items"].add(new_item, clusters=slates)
        return predicted

    def _version_for(self, version: str | None, ts: float | None, arrival: float) -> tuple[ServingModel | None, str]:
        if version is not None:
            model = self.live.by_version(version)
            model = self.pinned.get(version) if model is None else model
            if model is not None:
                return model, "served_version"
        if ts is not None and ts >= self.live.oldest_live_from:
            return self.live.live_at(ts), "event_time"
        return self.live.live_at(arrival), "arrival"

    def maybe_refresh_drift(self) -> None:
        """Recompute the drift statistics unless that was done less than ``drift_every_s`` ago."""
        if time.monotonic() - self._drift_at >= self.drift_every_s:
            self.refresh_drift()

    def refresh_drift(self) -> None:
        """Recompute every drift statistic now."""
        self._drift_at = time.monotonic()
        for signal, window in self.drift.items():
            stats = window.stats()
            self.metrics.drift_psi.labels(signal).set(stats.psi)
            self.metrics.drift_ks.labels(signal).set(stats.ks)
            if signal not in ENDOGENOUS_SIGNALS:  # the feedback loop moves those: they never alarm
                self.metrics.drift_threshold.labels(signal).set(stats.threshold)
                self.metrics.drift_alarm.labels(signal).set(int(stats.alarm))
                if not stats.alarm:
                    self._alarming.discard(signal)
                elif signal not in self._alarming:  # a new alarm: counted once, however long it lasts
                    self._alarming.add(signal)
                    self.metrics.drift_alarms.labels(signal).inc()


async def follow_examples(monitor: Monitor, bootstrap_servers: str, topic: str, lookback_s: float,
                          max_records: int = 1000) -> None:
    """Feed ``monitor`` from ``topic`` until cancelled, starting ``lookback_s`` seconds back.

    Every replica reads every partition (no consumer group): each keeps its own monitor.
    """
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="latest", fetch_max_wait_ms=200)
    await consumer.start()
    try:
        while topic not in await consumer.topics():
            log.warning("topic %s does not exist yet; the monitor waits for it", topic)
            await asyncio.sleep(2.0)
        consumer.subscribe([topic])  # without a group: every partition is assigned to this consumer
        while not consumer.assignment():
            await asyncio.sleep(0.05)
        tps = sorted(consumer.assignment())
        # The ends first: where the lookback finds nothing, start at the end as it was *before* the
        # lookup, so that nothing produced meanwhile is skipped.
        ends = await consumer.end_offsets(tps)
        since_ms = int((time.time() - lookback_s) * 1000)
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            consumer.seek(tp, ends[tp] if found.get(tp) is None else found[tp].offset)
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=max_records)
            values, arrivals = [], []
            for records in batches.values():
                values += [record.value for record in records]
                arrivals += [record.timestamp / 1000.0 for record in records]
            if values:
                batch = decode_examples(values)
                monitor.observe(batch.rows.to_pylist() + [None] * batch.malformed, arrivals)
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
