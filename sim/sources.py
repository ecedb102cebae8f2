"""Replay sources: datasets and a simulator as streams of contract-valid events, and ``replay``.

Each source is a generator that reads its input row by row, so a replay starts at once and holds
one row at a time. Event ids are deterministic (a replay sent twice is deduplicated downstream)
and every value is a plain Python type taken from the input unchanged (an OBD propensity is the
float the CSV text denotes, exactly what pandas reads).

- ``movielens_ratings``: MovieLens ``u.data`` as rating events.
- ``obd_events``: an Open Bandit Dataset CSV as one-item impressions (its logs record one
  position per row) plus a click event for each clicked row.
- ``synthetic_events``: a seeded simulator with slates, position-biased clicks and ratings.
- ``replay``: sends any of them through an ``EventProducer``, rate-limited, with progress.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stream.events import click, impression, rating
from stream.producer import EventProducer

# An OBD row has no click time; the click is placed this long after its impression.
OBD_CLICK_DELAY_S = 1.0
# Logging policy of each OBD folder: random/ is uniform-random, bts/ is Bernoulli Thompson
# Sampling, whose propensities come from outside this system.
OBD_POLICIES = {"random": "uniform", "bts": "external"}
_OBD_COLUMNS = ("", "timestamp", "item_id", "position", "click", "propensity_score")
_OBD_USER_COLUMNS = tuple(f"user_feature_{k}" for k in range(4))


def movielens_ratings(path: str | Path) -> Iterator[dict]:
    """Rating events from MovieLens ``u.data`` (``user\\titem\\trating\\tunix_ts``) or its folder.

    Event ids are ``ml-<line number>``; ids are the file's strings, ``value`` and ``ts`` floats.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "u.data"
    with path.open(encoding="latin-1") as lines:
        for line_no, line in enumerate(lines, start=1):
            fields = line.split("\t")
            if len(fields) != 4:
                if not line.strip():
                    continue
                raise ValueError(f"{path}:{line_no}: expected 4 tab-separated fields, got {len(fields)}")
            user_id, item_id, value, ts = fields
            yield rating(user_id, item_id, float(value), ts=float(ts), event_id=f"ml-{line_no}")


def obd_events(path: str | Path) -> Iterator[dict]:
    """Impression (and click) events from an Open Bandit Dataset CSV, e.g. ``obd/random/men.csv``.

    Row ``r`` of ``<policy dir>/<campaign>.csv`` becomes the impression ``obd-<policy dir>-r``
    (its request_id; model_version ``obd-<policy dir>``, surface ``<campaign>``) showing one item
    at the logged position with the logged propensity; a clicked row adds a click
    ``OBD_CLICK_DELAY_S`` later. OBD has no user ids, so user_id is a stable hash of the four
    user feature columns. Policy: ``uniform`` for ``random/``, ``external`` for other folders.
    """
    path = Path(path)
    source = path.parent.name
    policy = OBD_POLICIES.get(source, "external")
    model_version = f"obd-{source}"
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            raise ValueError(f"{path}: empty file")
        missing = [name or "(unnamed row index)" for name in _OBD_COLUMNS + _OBD_USER_COLUMNS if name not in header]
        if missing:
            raise ValueError(f"{path}: not an Open Bandit Dataset CSV, missing columns: {', '.join(missing)}")
        index, ts_col, item_col, position_col, click_col, propensity_col = (header.index(c) for c in _OBD_COLUMNS)
        user_cols = [header.index(c) for c in _OBD_USER_COLUMNS]
        for row in rows:
            request_id = f"obd-{source}-{row[index]}"
            user_id = _obd_user_id([row[c] for c in user_cols])
            item_id, position = row[item_col], int(row[position_col])
            ts = _epoch_seconds(row[ts_col])
            shown = [{"item_id": item_id, "position": position, "propensity": float(row[propensity_col])}]
            yield impression(
                user_id, request_id, model_version, policy, shown, surface=path.stem, ts=ts, event_id=f"{request_id}-imp"
            )
            if int(row[click_col]) == 1:
                yield click(
                    user_id, request_id, item_id, position=position, ts=ts + OBD_CLICK_DELAY_S, event_id=f"{request_id}-click"
                )


def _obd_user_id(features: list[str]) -> str:
    digest = hashlib.blake2b("\x1f".join(features).encode("utf-8"), digest_size=8).hexdigest()
    return f"obd-{digest}"


def _epoch_seconds(text: str) -> float:
    """``2019-11-24 00:03:13.442536+00:00`` as epoch seconds; a time without offset is UTC."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def synthetic_events(
    n: int,
    n_users: int,
    n_items: int,
    seed: int,
    slate_size: int = 10,
    *,
    epsilon: float = 0.1,
    rating_prob: float = 0.3,
    start_ts: float = 1_700_000_000.0,
) -> Iterator[dict]:
    """``n`` events from a seeded simulator: requests, position-biased clicks and some ratings.

    Users and items have hidden 8-d tastes and items a popularity bias; user activity is skewed
    (Zipf-like). Each request shows ``slate_size`` items chosen per position by epsilon-greedy on
    a noisy model score; an item's ``propensity`` is the probability of choosing it at that
    position given the items above it. A shown item is clicked with probability
    examination(position) x relevance, examination = 1 / position^0.8; a click is followed by a
    1-5 rating with probability ``rating_prob``. Timestamps strictly increase from ``start_ts``.
    """
    if not 1 <= slate_size <= n_items:
        raise ValueError(f"slate_size must be in 1..n_items ({n_items}), got {slate_size}")
    if n < 0 or n_users < 1:
        raise ValueError(f"need n >= 0 and n_users >= 1, got n={n}, n_users={n_users}")
    if not 0.0 <= epsilon <= 1.0 or not 0.0 <= rating_prob <= 1.0:
        raise ValueError(f"epsilon and rating_prob are probabilities, got {epsilon} and {rating_prob}")
    rng = np.random.default_rng(seed)
    user_taste = rng.normal(0.0, 0.5, (n_users, 8))
    item_taste = rng.normal(0.0, 0.5, (n_items, 8))
    item_bias = rng.normal(-4.5, 0.7, n_items)  # relevance logit: ~12% click-through at position 1
    activity = np.cumsum(1.0 / np.arange(1, n_users + 1) ** 0.8)  # cumulative, for sampling
    examination = 1.0 / np.arange(1, slate_size + 1) ** 0.8
    events = _simulate(rng, seed, user_taste, item_taste, item_bias, activity, examination, epsilon, rating_prob, start_ts)
    return itertools.islice(events, n)


def _simulate(
    rng: np.random.Generator,
    seed: int,
    user_taste: np.ndarray,
    item_taste: np.ndarray,
    item_bias: np.ndarray,
    activity: np.ndarray,
    examination: np.ndarray,
    epsilon: float,
    rating_prob: float,
    ts: float,
) -> Iterator[dict]:
    n_items, slate_size = len(item_bias), len(examination)
    model_version = f"synthetic-{seed}"
    for request in itertools.count():
        user = min(int(np.searchsorted(activity, rng.random() * activity[-1], side="right")), len(activity) - 1)
        user_id, request_id = f"u{user}", f"syn-{seed}-r{request}"
        logit = item_taste @ user_taste[user] + item_bias
        score = logit + rng.normal(0.0, 1.0, n_items)  # the model's imperfect estimate
        slate = _epsilon_greedy(rng, np.argsort(-score), slate_size, epsilon)
        ts += rng.exponential(0.5) + 0.001
        items = [
            {"item_id": f"i{item}", "position": k + 1, "propensity": propensity, "score": round(float(score[item]), 6)}
            for k, (item, propensity) in enumerate(slate)
        ]
        yield impression(user_id, request_id, model_version, "epsilon_greedy", items, ts=ts, event_id=f"{request_id}-imp")
        relevance = 1.0 / (1.0 + np.exp(-logit[[item for item, _ in slate]]))
        clicked = rng.random(slate_size) < examination * relevance
        for k in np.flatnonzero(clicked):
            item_id = f"i{slate[k][0]}"
            ts += rng.exponential(2.0) + 0.001
            yield click(user_id, request_id, item_id, position=int(k) + 1, ts=ts, event_id=f"{request_id}-click-{k + 1}")
            if rng.random() < rating_prob:
                stars = float(np.clip(np.rint(1.0 + 4.0 * relevance[k] + rng.normal(0.0, 0.7)), 1.0, 5.0))
                ts += rng.exponential(5.0) + 0.001
                yield rating(user_id, item_id, stars, ts=ts, event_id=f"{request_id}-rating-{k + 1}")


def _epsilon_greedy(rng: np.random.Generator, ranking: np.ndarray, slate_size: int, epsilon: float) -> list[tuple[int, float]]:
    """Fill each position with the best remaining item, or with prob. ``epsilon`` a uniformly random
    remaining one; returns (item, P(item at this position | items above))."""
    n_items = len(ranking)
    chosen: list[tuple[int, float]] = []
    used: set[int] = set()
    best = 0  # index into ranking of the best item not yet used
    for position in range(slate_size):
        while int(ranking[best]) in used:
            best += 1
        top, remaining = int(ranking[best]), n_items - position
        item = top
        if rng.random() < epsilon:
            item = int(rng.integers(n_items))
            while item in used:  # uniform over the remaining items (slates are small)
                item = int(rng.integers(n_items))
        propensity = min(1.0, (1.0 - epsilon) * (item == top) + epsilon / remaining)
        chosen.append((item, propensity))
        used.add(item)
    return chosen


def replay(
    events_iter: Iterable[dict],
    producer: EventProducer,
    rate: float | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> int:
    """Send events through ``producer`` at most ``rate`` per second, stop after ``limit``; flushes
    at the end and returns how many were sent. The progress bar goes to stderr."""
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive events/s, got {rate}")
    events = itertools.islice(events_iter, limit) if limit is not None else events_iter
    start = time.monotonic()
    count = 0
    with tqdm(total=limit, unit="ev", file=sys.stderr, disable=not progress, mininterval=0.5) as bar:
        for event in events:
            if rate is not None:
                ahead = start + count / rate - time.monotonic()
                if ahead > 0.001:
                    time.sleep(ahead)
            producer.send(event)
            count += 1
            if count % 256 == 0:
                bar.update(256)
        bar.update(count % 256)
    producer.flush()
    return count
