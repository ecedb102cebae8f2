r"""Closed-loop user simulator: hidden preferences, position-biased clicks, traffic in phases.

Pure simulation logic: no Kafka, no HTTP. Two drivers use it. ``streamrec simulate`` asks serving
for a slate for every simulated request and logs the impression and the clicks through the
producer SDK; ``bench.bias`` runs it in process against a logging policy of its own. Either way
the simulator needs only what serving returns: each shown item's ``item_id`` and ``position``.

**World** (:class:`Preferences`). Users and items have hidden latent vectors; a user's score of
an item is $s_{ui} = o + b_u + b_i + \langle \mathbf{x}_u, \mathbf{y}_i \rangle$, and its
relevance $r_{ui} \in [0, 1]$ follows one rule: ``logistic`` ($\sigma(s_{ui})$, a click
probability), ``threshold`` ($[s_{ui} \ge t]$) or ``top_fraction`` (1 for the user's best
fraction of the catalogue, 0 otherwise). :meth:`Preferences.planted` draws a low-rank world from a
seed; :meth:`Preferences.from_movielens` fits biased ALS to MovieLens ``u.data`` and calls an
item relevant when its predicted rating is at least 4, with the file's own user and item ids (so
the simulated users are the users a replay of the ratings trained the model on).

**Clicks** follow the position-based model: position $p$ is examined with probability
$\theta_p = p^{-\eta}$, and a shown item is clicked iff its position was examined and the user
found it attractive (probability $r_{ui}$; with a 0/1 rule an irrelevant item is never clicked).
Users never see propensities: logging them is the serving side's job.

**Phases** (:class:`Schedule`, in steps of ``step_s`` seconds of event time): ``warmup`` (the
model is cold), ``steady``, ``attack`` (a few bot accounts request a slate every ~1.5 s and click
almost every item shown, one click every ~0.2 s, so they touch many distinct items fast) and ``shift``
(every user's latent vector is rotated by ``shift_angle_deg`` towards a random orthogonal
direction: tastes change; with ``shift_items`` the item biases are also mirrored: yesterday's
hits become today's flops and the least appealing items the most).

**Determinism.** Everything is a function of ``seed``: the world, the traffic of step ``t``
(:meth:`Simulation.requests`) and the response to a request (:meth:`Simulation.respond` draws
from a generator keyed by the request's step and index), so a run is reproducible even when a
driver answers requests out of order or concurrently, and two policies shown the same request
face the same examination and attraction draws (common random numbers).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

PHASES = ("warmup", "steady", "attack", "shift")
RULES = ("logistic", "threshold", "top_fraction")
# Stream keys of the seeded generators: each purpose draws from its own stream.
_WORLD, _TRAFFIC, _REQUESTS, _RESPOND, _SHIFT = range(5)


@dataclass(frozen=True)
class Schedule:
    """Phase lengths in steps, in the order of ``PHASES``; a step is ``step_s`` seconds of event
    time from ``start_ts`` (epoch seconds). A phase of length 0 is skipped."""

    warmup: int = 10
    steady: int = 30
    attack: int = 10
    shift: int = 20
    step_s: float = 60.0
    start_ts: float = 1_700_000_000.0

    def __post_init__(self) -> None:
        for name in PHASES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number of steps >= 0, got {value!r}")
        if not (math.isfinite(self.step_s) and self.step_s > 0):
            raise ValueError(f"step_s must be a finite number > 0, got {self.step_s!r}")

    @property
    def n_steps(self) -> int:
        """Steps in the whole schedule."""
        return sum(getattr(self, name) for name in PHASES)

    def start(self, phase: str) -> int:
        """First step of ``phase`` (where it would start if it has length 0)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        return sum(getattr(self, name) for name in PHASES[: PHASES.index(phase)])

    def phase(self, step: int) -> str:
        """The phase that step ``step`` (0-based) belongs to."""
        if not 0 <= step < self.n_steps:
            raise ValueError(f"step must be in 0..{self.n_steps - 1}, got {step!r}")
        end = 0
        for name in PHASES:
            end += getattr(self, name)
            if step < end:
                return name
        raise AssertionError("unreachable: step < n_steps")

    def step_ts(self, step: int) -> float:
        """Event time at which step ``step`` begins."""
        return self.start_ts + step * self.step_s


@dataclass(frozen=True, eq=False)
class Preferences:
    """A hidden world: latent vectors and biases of users and items, and the relevance rule.

    ``cutoff`` is the score threshold of the ``threshold`` rule and the relevant fraction of the
    catalogue of the ``top_fraction`` rule; ``logistic`` ignores it.
    """

    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    offset: float = 0.0
    rule: str = "logistic"
    cutoff: float = 0.0
    _item_rows: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n_users, n_items = len(self.user_ids), len(self.item_ids)
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.rule == "top_fraction" and not 0 < self.cutoff <= 1:
            raise ValueError(f"top_fraction needs a cutoff in (0, 1], got {self.cutoff!r}")
        shapes = {"user_factors": (n_users, self.user_factors.shape[-1]), "user_bias": (n_users,),
                  "item_factors": (n_items, self.user_factors.shape[-1]), "item_bias": (n_items,)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {getattr(self, name).shape}")
        for name, ids in (("user_ids", self.user_ids), ("item_ids", self.item_ids)):
            if not ids or len(set(ids)) != len(ids):
                raise ValueError(f"{name} must be non-empty and unique")
        object.__setattr__(self, "_item_rows", {item: j for j, item in enumerate(self.item_ids)})

    @classmethod
    def planted(
        cls,
        n_users: int = 500,
        n_items: int = 200,
        n_factors: int = 8,
        seed: int = 0,
        *,
        scale: float = 2.0,
        quality_mean: float = -2.0,
        quality_std: float = 1.0,
        rule: str = "logistic",
        top_fraction: float = 0.1,
        id_prefix: str = "sim-",
    ) -> Preferences:
        """A random low-rank world: $\\langle \\mathbf{x}_u, \\mathbf{y}_i \\rangle$ has mean 0
        and standard deviation ``scale``, item quality $b_i \\sim N(\\text{quality\\_mean},
        \\text{quality\\_std}^2)$, no user bias. Under the ``logistic`` rule the defaults give a
        mean relevance of about 0.25; ``threshold`` marks the scores >= 0 relevant,
        ``top_fraction`` each user's best ``top_fraction`` of the items. Ids are
        ``<id_prefix>u<j>`` and ``<id_prefix>i<j>``."""
        if min(n_users, n_items, n_factors) < 1:
            raise ValueError(f"need n_users, n_items, n_factors >= 1, got {n_users}, {n_items}, {n_factors}")
        rng = np.random.default_rng((seed, _WORLD))
        return cls(
            user_ids=tuple(f"{id_prefix}u{j}" for j in range(n_users)),
            item_ids=tuple(f"{id_prefix}i{j}" for j in range(n_items)),
            user_factors=rng.normal(0.0, 1.0 / math.sqrt(n_factors), (n_users, n_factors)),
            item_factors=rng.normal(0.0, scale, (n_items, n_factors)),
            user_bias=np.zeros(n_users),
            item_bias=rng.normal(quality_mean, quality_std, n_items),
            rule=rule,
            cutoff=top_fraction if rule == "top_fraction" else 0.0,
        )

    @classmethod
    def from_movielens(
        cls,
        path: str | Path,
        n_factors: int = 16,
        seed: int = 0,
        *,
        threshold: float = 4.0,
        l2: float = 5.0,
        iterations: int = 8,
    ) -> Preferences:
        """Biased ALS on MovieLens ratings (``u.data`` or its folder): relevance is
        ``predicted rating >= threshold``; ids are the file's. About a second on ML-100K."""
        path = Path(path)
        raw = np.loadtxt(path / "u.data" if path.is_dir() else path, dtype=np.int64, ndmin=2)
        user_ids, users = np.unique(raw[:, 0], return_inverse=True)
        item_ids, items = np.unique(raw[:, 1], return_inverse=True)
        ratings = raw[:, 2].astype(np.float64)
        rng = np.random.default_rng((seed, _WORLD))
        x, bu, y, bi, mean = _biased_als(users, items, ratings, len(user_ids), len(item_ids),
                                         n_factors, l2, iterations, rng)
        return cls(tuple(map(str, user_ids)), tuple(map(str, item_ids)), x, y, bu, bi,
                   offset=mean, rule="threshold", cutoff=threshold)

    @property
    def n_factors(self) -> int:
        """Size of the latent vectors."""
        return self.user_factors.shape[1]

    def item_rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Catalogue rows of ``item_ids``; ``-1`` for an id not in the catalogue."""
        return np.fromiter((self._item_rows.get(item, -1) for item in item_ids), np.int64, len(item_ids))

    def scores(self, user_rows: np.ndarray) -> np.ndarray:
        """$s_{ui}$ for the given user rows against every item: shape (users, items)."""
        rows = np.asarray(user_rows)
        return (self.offset + self.user_bias[rows, None] + self.item_bias[None, :]
                + self.user_factors[rows] @ self.item_factors.T)

    def relevance(self, user_rows: np.ndarray) -> np.ndarray:
        """$r_{ui} \\in [0, 1]$ for the given user rows against every item: shape (users, items)."""
        s = self.scores(user_rows)
        if self.rule != "top_fraction":
            return self._pointwise(s)
        n_relevant = max(1, round(self.cutoff * s.shape[1]))
        kth = np.partition(s, s.shape[1] - n_relevant, axis=1)[:, s.shape[1] - n_relevant]
        return (s >= kth[:, None]).astype(np.float64)

    def relevance_of(self, user_row: int, item_rows: np.ndarray) -> np.ndarray:
        """Relevance of some items to one user; ``-1`` rows (not in the catalogue) get 0."""
        rows = np.asarray(item_rows)
        known = np.maximum(rows, 0)
        if self.rule == "top_fraction":  # needs the user's whole score row
            relevance = self.relevance(np.array([user_row]))[0, known]
        else:
            relevance = self._pointwise(self.offset + self.user_bias[user_row] + self.item_bias[known]
                                        + self.item_factors[known] @ self.user_factors[user_row])
        return np.where(rows >= 0, relevance, 0.0)

    def _pointwise(self, s: np.ndarray) -> np.ndarray:
        """The ``logistic`` and ``threshold`` rules, which look at one score at a time."""
        if self.rule == "logistic":
            return 0.5 * (1.0 + np.tanh(0.5 * s))  # the sigmoid, without overflow
        return (s >= self.cutoff).astype(np.float64)

    def rotated(self, angle_deg: float, seed: int) -> Preferences:
        """The same world with every user vector turned by ``angle_deg`` towards a random
        direction orthogonal to it (norm kept; at 90 degrees old and new tastes are unrelated)."""
        rng = np.random.default_rng((seed, _SHIFT))
        x = self.user_factors
        direction = rng.normal(size=x.shape)
        squared = np.einsum("ij,ij->i", x, x)
        along = np.divide(np.einsum("ij,ij->i", direction, x), squared, out=np.zeros(len(x)), where=squared > 0)
        direction -= along[:, None] * x
        length = np.linalg.norm(direction, axis=1)
        scale = np.divide(np.sqrt(squared), length, out=np.zeros(len(x)), where=length > 0)
        angle = math.radians(angle_deg)
        turned = math.cos(angle) * x + math.sin(angle) * scale[:, None] * direction
        turned[scale == 0] = x[scale == 0]  # a zero vector, or no orthogonal direction (1 factor)
        return replace(self, user_factors=turned)

    def items_reversed(self) -> Preferences:
        """The same world with every item bias mirrored about their mean: the most appealing items
        become the least appealing and the other way round."""
        return replace(self, item_bias=2.0 * self.item_bias.mean() - self.item_bias)


class Request(NamedTuple):
    """One simulated visit: ``user_id`` asks for a slate at event time ``ts`` during ``step``;
    ``index`` is its place in the step's list (it keys the response's random draws)."""

    user_id: str
    step: int
    index: int
    ts: float
    is_bot: bool


class Click(NamedTuple):
    """A click on the item shown at ``position``, at event time ``ts``."""

    item_id: str
    position: int
    ts: float


class Simulation:
    """Simulated users in a seeded world, with traffic in phases and position-biased clicks.

    Typical driver loop (the HTTP closed loop asks serving for the slate)::

        sim = Simulation.planted(n_users=500, n_items=200, seed=7)
        for step in range(sim.schedule.n_steps):
            for request in sim.requests(step):
                slate = serve(request.user_id)                 # [{item_id, position, ...}, ...]
                log_impression(request, slate)
                for click in sim.respond(request, slate):
                    log_click(request, click)

    Parameters
    ----------
    preferences
        The hidden world before the shift.
    seed
        Seeds the traffic, the responses and the shift.
    eta
        Examination decay: position $p$ is examined with probability $p^{-\\eta}$.
    schedule
        Phase lengths and event-time clock.
    requests_per_step
        Mean requests of a normal user per step; users differ in activity by a lognormal factor
        with log-standard deviation ``activity_sigma`` (mean 1).
    click_delay_s
        A normal user's click comes 1 s plus an exponential delay with this mean after the request.
    n_bots, bot_gap_s, bot_click_prob
        During the attack ``n_bots`` accounts request a slate every ``bot_gap_s`` seconds on
        average (exponential gaps) and click each shown item with probability
        ``bot_click_prob``, one click every ~0.2 s.
    bot_prefix
        Bot ids are ``<bot_prefix><j>``.
    shift_angle_deg
        Rotation of every user's latent vector when the shift phase begins.
    shift_items
        The shift also mirrors the item biases about their mean (item appeal reverses too).
    """

    def __init__(
        self,
        preferences: Preferences,
        seed: int = 0,
        *,
        eta: float = 1.0,
        schedule: Schedule = Schedule(),
        requests_per_step: float = 1.0,
        activity_sigma: float = 0.5,
        click_delay_s: float = 8.0,
        n_bots: int = 5,
        bot_gap_s: float = 1.5,
        bot_click_prob: float = 0.95,
        bot_prefix: str = "sim-bot",
        shift_angle_deg: float = 60.0,
        shift_items: bool = False,
    ) -> None:
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        for name, value in (("requests_per_step", requests_per_step), ("click_delay_s", click_delay_s),
                            ("bot_gap_s", bot_gap_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0 <= bot_click_prob <= 1:
            raise ValueError(f"bot_click_prob must be in [0, 1], got {bot_click_prob!r}")
        if n_bots < 0 or activity_sigma < 0:
            raise ValueError(f"n_bots and activity_sigma must be >= 0, got {n_bots}, {activity_sigma}")
        self.preferences = preferences
        self.shifted = preferences.rotated(shift_angle_deg, seed)
        if shift_items:
            self.shifted = self.shifted.items_reversed()
        self.seed = int(seed)
        self.eta = float(eta)
        self.schedule = schedule
        self.click_delay_s = float(click_delay_s)
        self.bot_gap_s = float(bot_gap_s)
        self.bot_click_prob = float(bot_click_prob)
        self.bot_ids = tuple(f"{bot_prefix}{j}" for j in range(n_bots))
        clash = set(self.bot_ids) & set(preferences.user_ids)
        if clash:
            raise ValueError(f"bot ids clash with user ids: {sorted(clash)[:3]}")
        self._user_rows = {user: j for j, user in enumerate(preferences.user_ids)}
        rng = np.random.default_rng((self.seed, _TRAFFIC))
        activity = rng.lognormal(-0.5 * activity_sigma**2, activity_sigma, len(preferences.user_ids))
        self.request_rate = requests_per_step * activity  # mean requests per step, per user

    @classmethod
    def planted(
        cls,
        n_users: int = 500,
        n_items: int = 200,
        n_factors: int = 8,
        seed: int = 0,
        *,
        scale: float = 2.0,
        quality_mean: float = -2.0,
        quality_std: float = 1.0,
        rule: str = "logistic",
        top_fraction: float = 0.1,
        id_prefix: str = "sim-",
        **options: Any,
    ) -> Simulation:
        """A simulation in a planted low-rank world (:meth:`Preferences.planted`); ``options``
        are the constructor's keyword parameters."""
        world = Preferences.planted(n_users, n_items, n_factors, seed, scale=scale, quality_mean=quality_mean,
                                    quality_std=quality_std, rule=rule, top_fraction=top_fraction,
                                    id_prefix=id_prefix)
        return cls(world, seed, **options)

    @classmethod
    def from_movielens(cls, path: str | Path, seed: int = 0, *, n_factors: int = 16,
                       threshold: float = 4.0, **options: Any) -> Simulation:
        """A simulation in a world fitted to MovieLens ratings (:meth:`Preferences.from_movielens`)."""
        return cls(Preferences.from_movielens(path, n_factors, seed, threshold=threshold), seed, **options)

    # ------------------------------------------------------------------ world

    @property
    def user_ids(self) -> tuple[str, ...]:
        """The normal (non-bot) users."""
        return self.preferences.user_ids

    @property
    def item_ids(self) -> tuple[str, ...]:
        """The catalogue; relevance vectors are aligned with it."""
        return self.preferences.item_ids

    def phase(self, step: int) -> str:
        """Phase of step ``step``."""
        return self.schedule.phase(step)

    def preferences_at(self, step: int) -> Preferences:
        """The world users live in at ``step``: rotated from the shift phase on."""
        return self.shifted if step >= self.schedule.start("shift") else self.preferences

    def user_row(self, user_id: str) -> int:
        """Row of a normal user (KeyError for bots and unknown ids)."""
        return self._user_rows[user_id]

    def ground_truth_relevance(self, user_id: str, step: int) -> np.ndarray:
        """Relevance in [0, 1] of every item (``item_ids`` order) to ``user_id`` at ``step``."""
        return self.preferences_at(step).relevance(np.array([self.user_row(user_id)]))[0]

    def examination(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Examination probability $p^{-\\eta}$ of 1-based ``positions``."""
        pos = np.asarray(positions, dtype=np.float64)
        if pos.size and (np.any(pos < 1) or np.any(pos != np.floor(pos))):
            raise ValueError(f"positions must be whole numbers >= 1, got {pos!r}")
        return pos ** -self.eta

    def ndcg_at_k(self, user_id: str, ranked_item_ids: Sequence[str], step: int, k: int = 10) -> float:
        """NDCG@k of a ranking against the user's ground-truth relevance at ``step`` (ids outside
        the catalogue count as irrelevant)."""
        world, row = self.preferences_at(step), self.user_row(user_id)
        gains = world.relevance_of(row, world.item_rows(list(ranked_item_ids)[:k]))
        return float(ndcg_at_k(gains[None, :], world.relevance(np.array([row])), k)[0])

    def expected_ctr(self, user_id: str, slate_item_ids: Sequence[str], step: int) -> float:
        """Expected clicks per shown item of a slate (first id at position 1) under the click model."""
        if not slate_item_ids:
            return 0.0
        world = self.preferences_at(step)
        gains = world.relevance_of(self.user_row(user_id), world.item_rows(list(slate_item_ids)))
        return float(np.mean(self.examination(np.arange(1, len(gains) + 1)) * gains))

    # ------------------------------------------------------------------ traffic

    def requests(self, step: int) -> list[Request]:
        """The visits of step ``step``, in time order: every normal user a Poisson number of times
        (mean ``request_rate``) at uniform times in the step, plus the bots during the attack."""
        phase = self.phase(step)
        rng = np.random.default_rng((self.seed, _REQUESTS, step))
        begin, length = self.schedule.step_ts(step), self.schedule.step_s
        counts = rng.poisson(self.request_rate)
        users = np.repeat(np.arange(len(counts)), counts)
        times = begin + rng.uniform(0.0, length, len(users))
        visits = [(float(t), self.user_ids[u], False) for u, t in zip(users.tolist(), times.tolist())]
        if phase == "attack":
            for bot in self.bot_ids:
                t = begin + rng.exponential(self.bot_gap_s)
                while t < begin + length:
                    visits.append((t, bot, True))
                    t += rng.exponential(self.bot_gap_s)
        visits.sort()
        return [Request(user, step, j, ts, is_bot) for j, (ts, user, is_bot) in enumerate(visits)]

    def respond(self, request: Request, slate: Sequence[Mapping[str, Any]]) -> list[Click]:
        """The clicks of ``request``'s user on ``slate`` (``{item_id, position, ...}`` entries, as
        serving returns them), in time order. Items outside the catalogue are never relevant."""
        if not slate:
            return []
        items = [str(entry["item_id"]) for entry in slate]
        positions = np.array([entry["position"] for entry in slate])
        rng = np.random.default_rng((self.seed, _RESPOND, request.step, request.index))
        if request.is_bot:
            clicked = rng.random(len(items)) < self.bot_click_prob
            delays = np.cumsum(0.05 + rng.exponential(0.15, len(items)))
        else:
            world = self.preferences_at(request.step)
            attraction = world.relevance_of(self.user_row(request.user_id), world.item_rows(items))
            examined = rng.random(len(items)) < self.examination(positions)
            clicked = examined & (rng.random(len(items)) < attraction)
            delays = 1.0 + rng.exponential(self.click_delay_s, len(items))
        clicks = [Click(items[j], int(positions[j]), request.ts + float(delays[j])) for j in np.flatnonzero(clicked)]
        return sorted(clicks, key=lambda c: c.ts)


def ndcg_at_k(ranked_gains: np.ndarray, all_gains: np.ndarray, k: int = 10) -> np.ndarray:
    """NDCG@k per row: ``ranked_gains[u, j]`` is the gain of the item ranked j+1 for user u,
    ``all_gains[u]`` the gains of every item (for the ideal ranking). Linear gains, log2
    discounts; a user with no positive gain scores 0."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    ranked = np.asarray(ranked_gains, dtype=np.float64)[:, :k]
    ideal = -np.sort(-np.asarray(all_gains, dtype=np.float64), axis=1)[:, :k]
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = ranked @ discount[: ranked.shape[1]]
    idcg = ideal @ discount[: ideal.shape[1]]
    return np.divide(dcg, idcg, out=np.zeros(len(dcg)), where=idcg > 0)


def _biased_als(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, n_users: int, n_items: int,
                n_factors: int, l2: float, iterations: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Alternating ridge regressions for $r \\approx \\mu + b_u + b_i + \\langle x_u, y_i \\rangle$:
    each side solves (factors, bias) jointly per row with the other side fixed."""
    mean = float(ratings.mean())
    x, bu = np.zeros((n_users, n_factors)), np.zeros(n_users)
    y, bi = rng.normal(0.0, 0.1, (n_items, n_factors)), np.zeros(n_items)
    by_user, by_item = _groups(users, n_users), _groups(items, n_items)
    for _ in range(iterations):
        _ridge_rows(by_user, items, ratings - mean, bi, y, x, bu, l2)
        _ridge_rows(by_item, users, ratings - mean, bu, x, y, bi, l2)
    return x, bu, y, bi, mean


def _groups(rows: np.ndarray, n: int) -> list[np.ndarray]:
    order = np.argsort(rows, kind="stable")
    return np.split(order, np.searchsorted(rows[order], np.arange(1, n)))


def _ridge_rows(groups: list[np.ndarray], other: np.ndarray, residual: np.ndarray, other_bias: np.ndarray,
                other_factors: np.ndarray, factors: np.ndarray, bias: np.ndarray, l2: float) -> None:
    """For every row: (factors, bias) = argmin sum (residual - other_bias - <f, y> - b)^2 + l2 |(f, b)|^2."""
    k = factors.shape[1]
    penalty = l2 * np.eye(k + 1)
    for row, sel in enumerate(groups):
        if len(sel) == 0:
            continue
        z = np.c_[other_factors[other[sel]], np.ones(len(sel))]
        solution = np.linalg.solve(z.T @ z + penalty, z.T @ (residual[sel] - other_bias[other[sel]]))
        factors[row], bias[row] = solution[:k], solution[k]
