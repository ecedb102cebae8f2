"""Per-user and per-item window features of the event stream, scored by Random Cut Forests.

Bots, click floods and broken clients poison online learning within minutes. This module keeps
cheap window features per entity as validated events arrive (DESIGN.md "Events"), scores each
active entity at most once per ``score_every_s`` of event time with one ``RandomCutForest`` per
entity kind, turns scores into grades with an ``AdaptiveThreshold``, and remembers which users
are currently flagged so that the stream can mark their examples ``anomalous=True``. Records it
returns follow the ``anomalies`` topic contract: ``{entity, kind, score, grade, features, ts}``.

Pure logic: no Faust or Kafka here; the Faust agent feeds ``AnomalyDetector.observe_batch``.

Restarts. A worker that restarts (crash or deploy) must not start blind: cold forests and
thresholds in warm-up raise no alarm for the first ``warmup`` scorings per kind. So the state
comes back from two sources:

* the windows from the Parquet log (``warm_windows``, fed by ``IngestPipeline.restore``): the
  events of the last ``idle_s`` seconds, observed again in time order but not scored. An entity
  whose history since it was last forgotten lies in that span gets its windows back exactly; one
  active for longer misses the older part of its decayed counts (at most exp(-idle_s / window_s)
  of them, 5% with the defaults, and the age correction of ``_rate`` makes up for most of that);
* the learned state from a checkpoint (``snapshot`` / ``DetectorSnapshot.save``, then
  ``load_checkpoint``): both forests (``RandomCutForest.save``, .npz without pickle), both
  thresholds, the flagged users and when each entity was last scored (so that a restored entity
  is scored on the schedule it would have kept). The worker saves one after a log flush, at most
  once per ``detector_checkpoint_interval_s``, and at a clean stop. The detector has then seen
  batches whose offsets are not committed yet; after a crash Kafka delivers them again and the
  forests and thresholds learn them a second time. That is a small drift of models that follow
  a long stream anyway, and the reason the windows come from the log instead.

A checkpoint is a folder: one file per part under a fresh name, each written to a temporary
file and renamed, then ``manifest.json`` (replaced atomically, so it is the commit point) naming
the files with their sha256 and the detector's settings. Loading verifies every hash and the
settings; anything missing, corrupt or written with other settings is logged and the detector
starts cold, without failing and without unpickling anything.

Features (event time; counts decay with time constant ``window_s``, distinct counts over the
last ``window_s`` seconds):

* user: ``event_rate`` (events per minute), ``ctr`` (clicks per impression), ``distinct_items``
  (items clicked or rated), ``inter_arrival_s`` (moving average of the gaps between events);
* item: ``click_rate`` (clicks per minute), ``click_spike`` (click rate over the last
  ``window_s / 10`` seconds relative to the rate over ``window_s``), ``ctr`` (clicks per
  impression showing the item), ``distinct_users`` (users who clicked it).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from stream.anomaly.forest import RandomCutForest
from stream.anomaly.thresholds import AdaptiveThreshold
from stream.files import atomic_write, sha256_file

USER_FEATURES = ("event_rate", "ctr", "distinct_items", "inter_arrival_s")
ITEM_FEATURES = ("click_rate", "click_spike", "ctr", "distinct_users")
SPIKE_FRACTION = 0.1  # the spike window is this fraction of the feature window
INTER_ARRIVAL_WEIGHT = 0.2  # weight of the newest gap in the inter-arrival moving average
SWEEP_FRACTION = 0.25  # idle entities are looked for every this fraction of idle_s (event time)
KINDS = ("user", "item")
CHECKPOINT_FORMAT = "streamrec.detector/1"
MANIFEST = "manifest.json"
# Files of a checkpoint folder that its manifest does not name are removed once they are this old:
# younger ones may belong to a save in progress (in another worker, when workers share the folder).
STALE_S = 300.0

log = logging.getLogger(__name__)


class _User:
    __slots__ = ("first_ts", "last_ts", "n_events", "events", "impressions", "clicks", "items",
                 "gap", "scored_ts")

    def __init__(self, ts: float) -> None:
        self.first_ts = ts
        self.last_ts = ts
        self.n_events = 0
        self.events = 0.0
        self.impressions = 0.0
        self.clicks = 0.0
        self.items: dict[str, float] = {}
        self.gap = math.nan
        self.scored_ts = -math.inf


class _Item:
    __slots__ = ("first_ts", "last_ts", "n_clicks", "clicks", "clicks_fast", "impressions",
                 "users", "scored_ts")

    def __init__(self, ts: float) -> None:
        self.first_ts = ts
        self.last_ts = ts
        self.n_clicks = 0
        self.clicks = 0.0
        self.clicks_fast = 0.0
        self.impressions = 0.0
        self.users: dict[str, float] = {}
        self.scored_ts = -math.inf


def _rate(count: float, age: float, time_constant: float) -> float:
    """Events per second from a count decaying with ``time_constant``, kept for ``age`` seconds.

    At a steady rate r the count tends to r * tau * (1 - exp(-age / tau)); dividing by that
    factor instead of tau removes the start-up bias, so a new entity's rate is right at once.
    """
    return count / (time_constant * -math.expm1(-max(age, 1.0) / time_constant))


def _distinct(last_seen: dict[str, float], since: float) -> int:
    """Drop the ids last seen before ``since`` and count the rest."""
    for key in [key for key, ts in last_seen.items() if ts < since]:
        del last_seen[key]
    return len(last_seen)


class EntityWindows:
    """Window features per user and per item, updated in O(1) per event (O(slate) per impression).

    Counters decay as c <- c * exp(-dt / window_s) + 1, so c / window_s estimates the recent
    rate (corrected for the entity's age, see ``_rate``). Events are taken in arrival order; one that is older than its entity's latest event
    counts at that latest time (clocks never run backwards).

    Parameters
    ----------
    window_s
        Time constant of the decaying counts and length of the distinct-count window (seconds).
    """

    def __init__(self, window_s: float = 600.0) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a finite number > 0, got {window_s!r}")
        self.window_s = float(window_s)
        self.users: dict[str, _User] = {}
        self.items: dict[str, _Item] = {}

    def observe(self, event: dict[str, Any]) -> None:
        """Update the windows of the event's user and items."""
        kind = event["type"]
        ts = float(event["ts"])
        user = self._user(event["user_id"], ts)
        user.n_events += 1
        user.events += 1.0
        if kind == "impression":
            user.impressions += 1.0
            for shown in event["items"]:
                self._item(shown["item_id"], ts).impressions += 1.0
        elif kind in ("click", "rating"):
            user.items[event["item_id"]] = user.last_ts
            if kind == "click":
                user.clicks += 1.0
                item = self._item(event["item_id"], ts)
                item.n_clicks += 1
                item.clicks += 1.0
                item.clicks_fast += 1.0
                item.users[event["user_id"]] = item.last_ts
        else:
            raise ValueError(f"unknown event type {kind!r}")

    def user_features(self, user_id: str) -> dict[str, float]:
        """The user's features at its latest event."""
        user = self.users[user_id]
        return {
            "event_rate": 60.0 * _rate(user.events, user.last_ts - user.first_ts, self.window_s),
            "ctr": user.clicks / max(user.impressions, 1.0),
            "distinct_items": float(_distinct(user.items, user.last_ts - self.window_s)),
            "inter_arrival_s": user.gap,
        }

    def item_features(self, item_id: str) -> dict[str, float]:
        """The item's features at its latest event."""
        item = self.items[item_id]
        age = item.last_ts - item.first_ts
        slow = _rate(item.clicks, age, self.window_s)
        fast = _rate(item.clicks_fast, age, SPIKE_FRACTION * self.window_s)
        return {
            "click_rate": 60.0 * slow,
            "click_spike": fast / slow if slow > 0 else 0.0,
            "ctr": item.clicks / max(item.impressions, 1.0),
            "distinct_users": float(_distinct(item.users, item.last_ts - self.window_s)),
        }

    def expire(self, now: float, idle_s: float) -> None:
        """Forget the entities without events since ``now - idle_s``."""
        for table in (self.users, self.items):
            for key in [key for key, state in table.items() if state.last_ts < now - idle_s]:
                del table[key]

    def _user(self, user_id: str, ts: float) -> _User:
        user = self.users.get(user_id)
        if user is None:
            user = self.users[user_id] = _User(ts)
            return user
        dt = ts - user.last_ts
        if dt > 0:
            decay = math.exp(-dt / self.window_s)
            user.events *= decay
            user.impressions *= decay
            user.clicks *= decay
            user.last_ts = ts
        gap = max(dt, 0.0)
        user.gap = gap if math.isnan(user.gap) else user.gap + INTER_ARRIVAL_WEIGHT * (gap - user.gap)
        return user

    def _item(self, item_id: str, ts: float) -> _Item:
        item = self.items.get(item_id)
        if item is None:
            item = self.items[item_id] = _Item(ts)
            return item
        dt = ts - item.last_ts
        if dt > 0:
            decay = math.exp(-dt / self.window_s)
            item.clicks *= decay
            item.impressions *= decay
            item.clicks_fast *= math.exp(-dt / (SPIKE_FRACTION * self.window_s))
            item.last_ts = ts
        return item


class AnomalyDetector:
    """Scores users and items from their window features; flags the anomalous ones.

    Per event it only updates the entity's windows. Then each entity touched by the batch (a
    user by any event, an item by a click) with at least ``min_events`` events (clicks for an
    item) and not scored in the last ``score_every_s`` seconds of its event time gets one
    feature vector x = log(1 + features). Per kind (user, item) a ``RandomCutForest`` scores
    the batch of vectors, an ``AdaptiveThreshold`` grades the scores, and only vectors graded 0
    are inserted into the forest, so anomalous traffic never becomes the forest's normal.
    A user is flagged from a score with grade > 0 until it is scored with grade 0 again or
    goes idle for ``idle_s`` seconds; idle entities' windows are dropped within 1.25 * idle_s.
    ``last_scores`` holds every score of the latest batch per kind (for the score histogram).

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
        Of the forests (one per kind; shingle size 1: each vector already summarises a window).
    z, horizon, warmup
        Of the thresholds (see ``AdaptiveThreshold``). z is 4 rather than the thresholder's 3
        because every entity is scored again and again: per-score false alarms add up per user
        (simulated, 200 normal users and a click bot: z = 4 flags ~0.4% of normal scorings and
        ~0.5% of normal users at a time, z = 3 ~1.6% and ~2%; the bot is caught either way).

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
    """

    def __init__(self, window_s: float = 600.0, score_every_s: float = 60.0, min_events: int = 5,
                 idle_s: float | None = None, num_trees: int = 50, sample_size: int = 256,
                 z: float = 4.0, horizon: int = 1000, warmup: int = 256, seed: int = 0) -> None:
        if not (math.isfinite(score_every_s) and score_every_s >= 0):
            raise ValueError(f"score_every_s must be a finite number >= 0, got {score_every_s!r}")
        if isinstance(min_events, bool) or not isinstance(min_events, int) or min_events < 1:
            raise ValueError(f"min_events must be an integer >= 1, got {min_events!r}")
        idle_s = 3.0 * window_s if idle_s is None else idle_s
        if not (math.isfinite(idle_s) and idle_s > 0):
            raise ValueError(f"idle_s must be a finite number > 0, got {idle_s!r}")
        self.windows = EntityWindows(window_s)
        self.score_every_s = float(score_every_s)
        self.min_events = min_events
        self.idle_s = float(idle_s)
        self.forests = {kind: RandomCutForest(num_trees, sample_size, 1, None, seed + k)
                        for k, kind in enumerate(KINDS)}
        self.thresholds = {kind: AdaptiveThreshold(z, horizon, warmup) for kind in KINDS}
        # The settings a checkpoint must match (as JSON gives them back).
        self.params: dict[str, Any] = {
            "window_s": self.windows.window_s, "score_every_s": self.score_every_s,
            "min_events": min_events, "idle_s": self.idle_s, "num_trees": int(num_trees),
            "sample_size": int(sample_size), "z": float(z), "horizon": int(horizon),
            "warmup": int(warmup), "seed": int(seed),
        }
        self.last_scores = {kind: np.empty(0) for kind in KINDS}
        self._flagged: set[str] = set()
        self._clock = -math.inf
        self._swept = -math.inf

    def observe_batch(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Update the windows with validated events, score the due entities, return anomalies."""
        touched_users: dict[str, None] = {}
        touched_items: dict[str, None] = {}
        for event in events:
            self.windows.observe(event)
            self._clock = max(self._clock, float(event["ts"]))
            touched_users[event["user_id"]] = None
            if event["type"] == "click":
                touched_items[event["item_id"]] = None
        records = self._score("user", touched_users, self.windows.users, USER_FEATURES,
                              self.windows.user_features)
        records += self._score("item", touched_items, self.windows.items, ITEM_FEATURES,
                               self.windows.item_features)
        idle_since = self._clock - self.idle_s
        self._flagged = {key for key in self._flagged if self.windows.users[key].last_ts >= idle_since}
        if self._clock - self._swept >= SWEEP_FRACTION * self.idle_s:
            self.windows.expire(self._clock, self.idle_s)
            self._swept = self._clock
        return records

    def is_flagged(self, user_id: str) -> bool:
        """Whether the user's latest score raised an alarm (its examples are anomalous)."""
        return user_id in self._flagged

    @property
    def flagged_users(self) -> frozenset[str]:
        """The users flagged now."""
        return frozenset(self._flagged)

    def warm_windows(self, events: Iterable[dict[str, Any]]) -> None:
        """Rebuild the windows from logged events after a restart: observe them in time order
        (ties in the given order), advance the clock, score nothing."""
        for event in sorted(events, key=itemgetter("ts")):
            self.windows.observe(event)
            self._clock = max(self._clock, float(event["ts"]))
        self._swept = self._clock

    def snapshot(self) -> DetectorSnapshot:
        """A copy of the learned state, consistent when taken between two batches; its ``save``
        may then run in another thread while the detector goes on."""
        return DetectorSnapshot(
            params=dict(self.params),
            forests={kind: copy.deepcopy(forest) for kind, forest in self.forests.items()},
            thresholds={kind: threshold.state() for kind, threshold in self.thresholds.items()},
            flagged=sorted(self._flagged),
            scored={"user": _scored(self.windows.users), "item": _scored(self.windows.items)},
        )

    def load_checkpoint(self, directory: str | os.PathLike) -> bool:
        """Take the learned state from the checkpoint in ``directory``; True when it was used.

        Call it after ``warm_windows``: scoring times and flags apply to the entities in the
        windows (the others are forgotten or were only seen in batches the log lacks, which
        Kafka delivers again). A missing, corrupt or mismatching checkpoint is logged and leaves
        the detector cold.
        """
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            level = logging.WARNING if directory.exists() else logging.INFO
            log.log(level, "no detector checkpoint in %s: starting cold", directory)
            return False
        try:
            forests, thresholds, flagged, scored = _read_checkpoint(directory, self.params)
        except Exception as err:  # noqa: BLE001 (whatever is wrong with it, the worker starts cold)
            log.warning("detector checkpoint in %s not used (%s: %s): starting cold", directory, type(err).__name__, err)
            return False
        self.forests, self.thresholds = forests, thresholds
        for kind, table in (("user", self.windows.users), ("item", self.windows.items)):
            for key, scored_ts in scored[kind].items():
                entity = table.get(key)
                if entity is not None:
                    entity.scored_ts = scored_ts
        self._flagged = {user for user in flagged if user in self.windows.users}
        return True

    def describe(self) -> str:
        """What the detector holds, for the start-up log."""
        def warm(threshold: AdaptiveThreshold) -> str:
            if threshold.n >= threshold.warmup:
                return "past warm-up"
            return f"in warm-up ({threshold.n}/{threshold.warmup})"

        return (f"{len(self.windows.users)} users / {len(self.windows.items)} items in windows, "
                f"forests with {self.forests['user'].n_points} / {self.forests['item'].n_points} points, "
                f"thresholds {warm(self.thresholds['user'])} / {warm(self.thresholds['item'])} (user / item), "
                f"{len(self._flagged)} users flagged")

    def _score(self, kind: str, touched: dict[str, None], states: dict[str, _User] | dict[str, _Item],
               names: tuple[str, ...], features_of: Callable[[str], dict[str, float]]
               ) -> list[dict[str, Any]]:
        due = []
        for key in touched:
            state = states[key]
            count = state.n_events if kind == "user" else state.n_clicks
            if count >= self.min_events and state.last_ts - state.scored_ts >= self.score_every_s:
                state.scored_ts = state.last_ts
                due.append(key)
        if not due:
            self.last_scores[kind] = np.empty(0)
            return []
        features = [features_of(key) for key in due]
        x = np.log1p(np.array([[f[name] for name in names] for f in features]))
        scores = self.last_scores[kind] = self.forests[kind].score(x)
        grades = self.thresholds[kind].update(scores)
        self.forests[kind].update(x[grades == 0])
        records = []
        for key, feats, score, grade in zip(due, features, scores.tolist(), grades.tolist()):
            if kind == "user":
                if grade > 0:
                    self._flagged.add(key)
                else:
                    self._flagged.discard(key)
            if grade > 0:
                records.append({"entity": key, "kind": kind, "score": score, "grade": grade,
                                "features": feats, "ts": states[key].last_ts})
        return records


@dataclass
class DetectorSnapshot:
    """The learned state of an ``AnomalyDetector`` at one moment (``AnomalyDetector.snapshot``)."""

    params: dict[str, Any]
    forests: dict[str, RandomCutForest]
    thresholds: dict[str, dict[str, Any]]
    flagged: list[str]
    scored: dict[str, dict[str, float]]  # kind -> entity -> event time of its latest score

    def save(self, directory: str | os.PathLike) -> None:
        """Write the checkpoint to ``directory``: the parts under fresh names, then the manifest
        (the commit point), then remove parts no manifest needs any more."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tag = f"{time.time_ns()}-{os.getpid()}"
        names = {}
        for kind, forest in self.forests.items():
            names[f"forest-{kind}"] = name = f"forest-{kind}-{tag}.npz"
            forest.save(directory / name)
        names["state"] = f"state-{tag}.json"
        state = {"thresholds": self.thresholds, "flagged": self.flagged, "scored": self.scored}
        _write_json(directory / names["state"], state)
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "created": time.time(),
            "params": self.params,
            "files": {role: {"name": name, "sha256": sha256_file(directory / name)} for role, name in names.items()},
        }
        _write_json(directory / MANIFEST, manifest, indent=1)
        stale_before = time.time() - STALE_S
        for path in directory.iterdir():
            if (path.name != MANIFEST and path.name not in names.values() and path.is_file()
                    and path.stat().st_mtime < stale_before):
                path.unlink(missing_ok=True)


def _scored(states: dict[str, _User] | dict[str, _Item]) -> dict[str, float]:
    return {key: state.scored_ts for key, state in states.items() if state.scored_ts > -math.inf}


def _write_json(path: Path, value: Any, indent: int | None = None) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=indent, allow_nan=False)))


def _read_checkpoint(directory: Path, params: dict[str, Any]) -> tuple[
        dict[str, RandomCutForest], dict[str, AdaptiveThreshold], list[str], dict[str, dict[str, float]]]:
    """A checkpoint's forests, thresholds, flagged users and scoring times, once its format,
    settings and hashes check out."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"format {manifest.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    saved = manifest["params"]
    differences = [f"{key} {saved.get(key)!r} there, {params.get(key)!r} here"
                   for key in sorted(saved.keys() | params.keys()) if saved.get(key) != params.get(key)]
    if differences:
        raise ValueError("written with other settings: " + ", ".join(differences))
    paths = {}
    for role in (*(f"forest-{kind}" for kind in KINDS), "state"):
        entry = manifest["files"][role]
        path = directory / entry["name"]
        if path.name != entry["name"]:
            raise ValueError(f"file name {entry['name']!r} is not a plain name")
        if sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path.name}: sha256 mismatch")
        paths[role] = path
    forests = {kind: RandomCutForest.load(paths[f"forest-{kind}"]) for kind in KINDS}
    state = json.loads(paths["state"].read_text())
    thresholds = {kind: AdaptiveThreshold.from_state(state["thresholds"][kind]) for kind in KINDS}
    flagged = [str(user) for user in state["flagged"]]
    scored = {kind: {str(key): float(ts) for key, ts in state["scored"][kind].items()} for kind in KINDS}
    return forests, thresholds, flagged, scored
