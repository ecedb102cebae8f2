"""The anomaly detector the stream worker runs: it scores users and items and flags the bad ones.

Bots, click floods and broken clients poison online learning within minutes. The detector
keeps window features per entity as validated events arrive (``stream.anomaly.features``),
scores each active entity at most once per ``score_every_s`` of event time with one
``RandomCutForest`` per entity kind, turns scores into anomaly likelihoods with one
``AnomalyLikelihood`` per kind (the layer ``score_series`` puts after its forest), raises an alarm
where the likelihood passes a threshold stated as a false-alarm rate, and remembers which users
are currently flagged so that the stream can mark their examples ``anomalous=True``. Records it
returns follow the ``anomalies`` topic contract: ``{entity, kind, score, grade, features, ts}``
(``score`` the forest's raw score, ``grade`` the anomaly likelihood on NAB's log scale).

Pure logic: no Faust or Kafka here; the worker's pipeline feeds ``AnomalyDetector.observe_batch``.

Partitions. The windows belong to the Kafka partition the events came from (DESIGN.md "The
worker's state"): one ``PartitionWindows`` per source partition, each forgetting its idle
entities by its own event time, so an item seen in two partitions has a window in each, counting
that partition's events only. Events are keyed by user, so a user's window holds all of its
events, while an item's holds the clicks and impressions of that partition's users (about 1/P of
its traffic with P partitions; the forests learn that scale). ``warm_windows`` rebuilds one
partition's windows from its log rows when the partition is assigned; ``detach_windows`` and
``attach_windows`` let the worker park them with the rest of a revoked partition's state. The
learned models (forests, likelihoods) and the flagged users are the worker's: one set over all
its partitions, checkpointed per worker.

Restarts. A worker that restarts (crash or deploy) must not start blind: cold forests and
likelihoods in warm-up raise no alarm for the first ``warmup + estimation_samples`` scorings per
kind. So the state comes back from two sources:

* the windows from the log, per partition (``warm_windows``, fed by
  ``IngestPipeline.assign`` whenever a partition is assigned): the partition's events of its last
  ``idle_s`` seconds, observed again in time order but not scored. An entity whose history since
  it was last forgotten lies in that span gets its windows back exactly; one active for longer
  misses the older part of its decayed counts (at most exp(-idle_s / window_s) of them, 5% with
  the defaults, and the age correction of the rates makes up for most of that);
* the learned state from a checkpoint (``snapshot`` / ``DetectorSnapshot.save``, then
  ``load_checkpoint``; the folder format is in ``stream.anomaly.checkpoint``), with each
  entity's last scoring time per partition. The worker saves one after a log flush, at most once
  per ``detector_checkpoint_interval_s``, and at a clean stop. The detector has then seen batches whose offsets are not committed yet; after a crash
  Kafka delivers them again and the forests and likelihoods learn them a second time. That is a
  small drift of models that follow a long stream anyway, and the reason the windows come from
  the log instead. A missing, corrupt or mismatching checkpoint is logged and the detector
  starts cold, without failing.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterable
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from stream.anomaly.checkpoint import MANIFEST, DetectorSnapshot, read_checkpoint
from stream.anomaly.features import (
    ITEM_FEATURES, KINDS, USER_FEATURES, EntityWindows, ItemWindow, UserWindow,
)
from stream.anomaly.forest import RandomCutForest
from stream.anomaly.likelihood import AnomalyLikelihood, log_likelihood

FALSE_ALARM_RATE = 1e-6  # a tenth of Numenta's red zone: fewer normal users flagged, bots caught as fast (docs/anomaly.md)
SWEEP_FRACTION = 0.25  # idle entities are looked for every this fraction of idle_s (event time)

log = logging.getLogger(__name__)


class PartitionWindows(EntityWindows):
    """The entity windows of one source partition, with the partition's own event-time clock.

    Idle entities are forgotten by the partition's clock (the newest event time it observed),
    never by another partition's: a partition that lags, replaying a backlog, keeps its entities.
    """

    def __init__(self, window_s: float) -> None:
        super().__init__(window_s)
        self.clock = -math.inf  # the newest event time observed
        self.swept = -math.inf  # the clock when idle entities were last looked for

    def observe(self, event: dict[str, Any]) -> None:
        """Update the windows of the event's user and items; advance the clock."""
        super().observe(event)
        self.clock = max(self.clock, float(event["ts"]))

    def sweep(self, idle_s: float) -> None:
        """Forget the entities idle for ``idle_s`` when ``SWEEP_FRACTION * idle_s`` of event time
        has passed since the last sweep (a full scan each event would cost O(entities))."""
        if self.clock - self.swept >= SWEEP_FRACTION * idle_s:
            self.expire(self.clock, idle_s)
            self.swept = self.clock

    def is_active(self, user_id: str, idle_s: float) -> bool:
        """Whether the user has an event in the last ``idle_s`` seconds of the partition's clock."""
        user = self.users.get(user_id)
        return user is not None and user.last_ts >= self.clock - idle_s


class AnomalyDetector:
    """Scores users and items from their window features; flags the anomalous ones.

    Per event it only updates the entity's windows in the event's source partition
    (``PartitionWindows``; an entity seen in two partitions has a window in each, scored on its
    own). Then each entity e touched by the batch (a user by any event, an item by a click), in
    each partition, with at least ``min_events`` events (clicks for an item) and not scored in the last ``score_every_s``
    seconds of its event time is scored, per kind k (user, item):

        x_e     = log(1 + features(e))                  (elementwise; ``USER_FEATURES`` or
                                                          ``ITEM_FEATURES``)
        score_e = mean_trees E[ CoDisp(x_e) ]           (``RandomCutForest`` of kind k)
        q_e     = Q((log(1 + score_e) - mu_k) / sd_k)   (``AnomalyLikelihood`` of kind k: mu_k,
                                                          sd_k of the kind's last ``long_window``
                                                          log-scores before e's, refitted every
                                                          100; likelihood 1 - q_e)
        alarm_e = q_e <= false_alarm_rate
        grade_e = log(q_e + 1e-10) / log(1e-10) if alarm_e, else 0   (NAB's log scale)

    The likelihood is the layer of ``score_series`` over the stream of scores of all entities
    of a kind, one per kind (per entity it would cost a long window per user), with two
    settings of its own: a short window of 1, because consecutive scores belong to different
    entities (a mean over them would blend a bot into its neighbours; each vector already
    summarises its entity's window), and no red-zone filter, for the same reason (a run of red
    scores is several entities, each to be flagged). ``false_alarm_rate`` is then the share of
    a kind's scorings flagged if its log-scores were Gaussian; forest log-scores have a heavier
    right tail, so the measured share is higher (docs/anomaly.md).

    A batch's vectors are scored together against the forest before any is learned, and only
    the vectors without alarm are then inserted, so anomalous traffic never becomes the forest's
    normal. A user is flagged from a score with an alarm until it is scored without one
    again, goes idle for ``idle_s`` seconds in every partition's windows, or its partition's
    windows leave the detector; idle entities' windows are dropped within 1.25 * idle_s of
    their partition's event time, which bounds memory per partition. Every alarm becomes an
    ``anomalies`` record: ``score`` the raw forest score, ``grade`` in (0, 1] the likelihood on
    NAB's log scale (0.5 for q = 1e-5, 0.6 for 1e-6, 1 for q <= 1e-10), at least
    ``log_likelihood(false_alarm_rate)``. An item alarmed in two partitions is two records.

    Parameters
    ----------
    window_s
        Feature window (seconds of event time).
    score_every_s
        Least event time between two scores of one entity.
    min_events
        Events a user (clicks an item) needs before it is scored.
    idle_s
        Entities without events for this long are forgotten (default: 3 windows).
    num_trees, sample_size, seed
        Of the forests (one per kind, seeded ``seed`` and ``seed + 1``; shingle size 1: each
        vector already summarises a window).
    false_alarm_rate
        The tail probability q at or below which a score raises an alarm (Gaussian share of
        scorings flagged; see above). Small because every entity is scored again and again,
        so per-score false alarms add up per user.
    long_window, warmup, estimation_samples
        Of the likelihoods (``AnomalyLikelihood``'s ``long_window``, ``learning_period`` and
        ``estimation_samples``): no alarm during a kind's first ``warmup + estimation_samples``
        scorings (``warmup`` defaults to one forest sample).

    Attributes
    ----------
    windows
        The ``PartitionWindows`` of each source partition (``windows[p].users``,
        ``windows[p].items``); a detector fed without partitions keeps everything in partition 0.
    forests, likelihoods
        The ``RandomCutForest`` and ``AnomalyLikelihood`` of each kind, keyed ``"user"``, ``"item"``:
        models of the worker, shared by all its partitions.
    alarm_level
        ``log_likelihood(false_alarm_rate)``: the least grade of an alarm.
    params
        The settings, as JSON gives them back; a checkpoint must match them.
    last_scores
        Every score of the latest batch per kind (for the score histogram).
    flagged_users
        The users flagged now (of the worker, whichever partition their alarm came from).

    Measurements behind the defaults: docs/anomaly.md.

    Examples
    --------
    >>> from stream.anomaly import AnomalyDetector
    >>> detector = AnomalyDetector(seed=0)
    >>> events = [{"type": "impression", "user_id": "u1", "ts": 10.0 * i,
    ...            "items": [{"item_id": "i1", "position": 1, "propensity": 1.0}]} for i in range(6)]
    >>> detector.observe_batch(events)  # too little history for alarms: warm-up
    []
    >>> detector.is_flagged("u1")
    False
    >>> detector.last_scores["user"].shape  # u1 had its 5 events: scored once
    (1,)

    References
    ----------
    Ahmad, S., Lavin, A., Purdy, S., Agha, Z. (2017). Unsupervised real-time anomaly detection
    for streaming data. Neurocomputing 262, 134-147.
    Guha, S., Mishra, N., Roy, G., Schrijvers, O. (2016). Robust Random Cut Forest Based Anomaly
    Detection on Streams. ICML 2016, PMLR 48:2712-2721.
    AWS, randomcutforest-by-aws: https://github.com/aws/random-cut-forest-by-aws
    """

    def __init__(self, window_s: float = 600.0, score_every_s: float = 60.0, min_events: int = 5,
                 idle_s: float | None = None, num_trees: int = 50, sample_size: int = 256,
                 false_alarm_rate: float = FALSE_ALARM_RATE, long_window: int = 8640, warmup: int = 256,
                 estimation_samples: int = 100, seed: int = 0) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a finite number > 0, got {window_s!r}")
        if not (math.isfinite(score_every_s) and score_every_s >= 0):
            raise ValueError(f"score_every_s must be a finite number >= 0, got {score_every_s!r}")
        if isinstance(min_events, bool) or not isinstance(min_events, int) or min_events < 1:
            raise ValueError(f"min_events must be an integer >= 1, got {min_events!r}")
        idle_s = 3.0 * window_s if idle_s is None else idle_s
        if not (math.isfinite(idle_s) and idle_s > 0):
            raise ValueError(f"idle_s must be a finite number > 0, got {idle_s!r}")
        if not 0.0 < false_alarm_rate < 0.5:  # q = 0.5 is the layer's warm-up value
            raise ValueError(f"false_alarm_rate must lie in (0, 0.5), got {false_alarm_rate!r}")
        self.window_s = float(window_s)
        self.windows: dict[int, PartitionWindows] = {}
        self.score_every_s = float(score_every_s)
        self.min_events = min_events
        self.idle_s = float(idle_s)
        self.forests = {kind: RandomCutForest(num_trees, sample_size, 1, None, seed + k)
                        for k, kind in enumerate(KINDS)}
        self.likelihoods = {kind: AnomalyLikelihood(1, long_window, warmup, estimation_samples, red_zone=None)
                            for kind in KINDS}
        self.alarm_level = float(log_likelihood(false_alarm_rate))
        # The settings a checkpoint must match (as JSON gives them back).
        self.params: dict[str, Any] = {
            "window_s": self.window_s, "score_every_s": self.score_every_s,
            "min_events": min_events, "idle_s": self.idle_s, "num_trees": int(num_trees),
            "sample_size": int(sample_size), "false_alarm_rate": float(false_alarm_rate),
            "long_window": int(long_window), "warmup": int(warmup),
            "estimation_samples": int(estimation_samples), "seed": int(seed),
        }
        self.last_scores = {kind: np.empty(0) for kind in KINDS}
        self._flagged: set[str] = set()

    def observe_batch(self, events: Iterable[dict[str, Any]],
                      partitions: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Update the windows with validated events, score the due entities, return anomalies.

        ``partitions`` gives each event's source partition, whose windows it updates (all 0
        when None: a single stream). The due entities of all partitions are scored together.
        """
        touched: dict[str, dict[tuple[int, str], None]] = {kind: {} for kind in KINDS}
        observed: dict[int, PartitionWindows] = {}
        for event, partition in zip(events, repeat(0) if partitions is None else partitions):
            windows = observed.get(partition)
            if windows is None:
                windows = observed[partition] = self._windows_of(partition)
            windows.observe(event)
            touched["user"][partition, event["user_id"]] = None
            if event["type"] == "click":
                touched["item"][partition, event["item_id"]] = None
        records = [record for kind in KINDS for record in self._score(kind, touched[kind])]
        self._flagged = {user for user in self._flagged
                         if any(windows.is_active(user, self.idle_s) for windows in self.windows.values())}
        for windows in observed.values():
            windows.sweep(self.idle_s)
        return records

    def is_flagged(self, user_id: str) -> bool:
        """Whether the user's latest score raised an alarm (its examples are anomalous)."""
        return user_id in self._flagged

    @property
    def flagged_users(self) -> frozenset[str]:
        """The users flagged now."""
        return frozenset(self._flagged)

    def warm_windows(self, events: Iterable[dict[str, Any]], partition: int = 0) -> None:
        """Rebuild one partition's windows from its logged events when it is assigned, replacing
        any the detector has for it: observe them in time order (ties in the given order),
        advance the partition's clock, score nothing."""
        windows = PartitionWindows(self.window_s)
        for event in sorted(events, key=itemgetter("ts")):
            windows.observe(event)
        windows.swept = windows.clock
        self.windows[partition] = windows

    def detach_windows(self, partition: int) -> PartitionWindows | None:
        """Take a revoked partition's windows out of the detector (None when it has none): the
        worker parks them with the partition's state until the next assignment."""
        return self.windows.pop(partition, None)

    def attach_windows(self, partition: int, windows: PartitionWindows) -> None:
        """Put back windows of ``detach_windows`` when their partition comes back untouched."""
        self.windows[partition] = windows

    def snapshot(self) -> DetectorSnapshot:
        """A copy of the learned state, consistent when taken between two batches; its ``save``
        may then run in another thread while the detector goes on."""
        return DetectorSnapshot(
            params=dict(self.params),
            forests={kind: copy.deepcopy(forest) for kind, forest in self.forests.items()},
            likelihoods={kind: likelihood.state() for kind, likelihood in self.likelihoods.items()},
            flagged=sorted(self._flagged),
            scored={kind: {partition: _scored(windows.entities(kind)) for partition, windows in self.windows.items()}
                    for kind in KINDS},
        )

    def load_checkpoint(self, directory: str | os.PathLike) -> bool:
        """Take the learned state from the checkpoint in ``directory``; True when it was used.

        Call it after ``warm_windows``: scoring times apply to the entities in the windows of
        their partition, flags to the users in any partition's windows (the others are
        forgotten, in partitions another worker owns, or were only seen in batches the log
        lacks, which Kafka delivers again). A missing, corrupt or mismatching checkpoint is
        logged and leaves the detector cold.
        """
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            level = logging.WARNING if directory.exists() else logging.INFO
            log.log(level, "no detector checkpoint in %s: starting cold", directory)
            return False
        try:
            forests, likelihoods, flagged, scored = read_checkpoint(directory, self.params)
        except Exception as err:  # noqa: BLE001 (whatever is wrong with it, the worker starts cold)
            log.warning("detector checkpoint in %s not used (%s: %s): starting cold", directory, type(err).__name__, err)
            return False
        self.forests, self.likelihoods = forests, likelihoods
        for partition, windows in self.windows.items():
            for kind in KINDS:
                table = windows.entities(kind)
                for key, scored_ts in scored[kind].get(partition, {}).items():
                    entity = table.get(key)
                    if entity is not None:
                        entity.scored_ts = scored_ts
        self._flagged = {user for user in flagged if any(user in windows.users for windows in self.windows.values())}
        return True

    def describe(self) -> str:
        """What the detector holds, for the start-up log."""
        def warm(likelihood: AnomalyLikelihood) -> str:
            needed = likelihood.learning_period + likelihood.estimation_samples
            if likelihood.n_seen >= needed:
                return "past warm-up"
            return f"in warm-up ({likelihood.n_seen}/{needed})"

        users = set().union(*(windows.users for windows in self.windows.values()))
        items = set().union(*(windows.items for windows in self.windows.values()))
        return (f"{len(users)} users / {len(items)} items in windows ({len(self.windows)} partitions), "
                f"forests with {self.forests['user'].n_points} / {self.forests['item'].n_points} points, "
                f"likelihoods {warm(self.likelihoods['user'])} / {warm(self.likelihoods['item'])} (user / item), "
                f"{len(self._flagged)} users flagged")

    def _windows_of(self, partition: int) -> PartitionWindows:
        """The partition's windows, new ones when it has none yet."""
        windows = self.windows.get(partition)
        if windows is None:
            windows = self.windows[partition] = PartitionWindows(self.window_s)
        return windows

    def _score(self, kind: str, touched: dict[tuple[int, str], None]) -> list[dict[str, Any]]:
        """Score the touched (partition, entity) pairs of one kind that are due, each from its
        partition's window, with the kind's forest and likelihood; return the alarms' records."""
        due = []
        for partition, key in touched:
            state = self.windows[partition].entities(kind)[key]
            count = state.n_events if kind == "user" else state.n_clicks
            if count >= self.min_events and state.last_ts - state.scored_ts >= self.score_every_s:
                state.scored_ts = state.last_ts
                due.append((partition, key, state))
        if not due:
            self.last_scores[kind] = np.empty(0)
            return []
        features = [self.windows[partition].features(kind, key) for partition, key, _ in due]
        names = USER_FEATURES if kind == "user" else ITEM_FEATURES
        x = np.log1p(np.array([[f[name] for name in names] for f in features]))
        scores = self.last_scores[kind] = self.forests[kind].score(x)
        likelihood = self.likelihoods[kind].update(scores)
        grades = np.where(likelihood >= self.alarm_level, likelihood, 0.0)
        self.forests[kind].update(x[grades == 0])
        records = []
        for (_, key, state), feats, score, grade in zip(due, features, scores.tolist(), grades.tolist()):
            if kind == "user":
                if grade > 0:
                    self._flagged.add(key)
                else:
                    self._flagged.discard(key)
            if grade > 0:
                records.append({"entity": key, "kind": kind, "score": score, "grade": grade,
                                "features": feats, "ts": state.last_ts})
        return records


def _scored(states: dict[str, UserWindow] | dict[str, ItemWindow]) -> dict[str, float]:
    return {key: state.scored_ts for key, state in states.items() if state.scored_ts > -math.inf}
