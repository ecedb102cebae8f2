"""Simulated traffic as event dicts: normal users and a click-flood bot (anomaly tests). The users
of two tastes of the learning tests are in ``sim.tastes``."""
from __future__ import annotations

import numpy as np

from stream import events as ev

BASE_TS = 1_750_000_000.0


def click_flood(n_users: int = 120, n_items: int = 1000, duration_s: float = 5400.0,
                bot: tuple[float, float] = (2700.0, 4200.0), seed: int = 0, slate: int = 10,
                pace_spread: float = 0.5) -> list[dict]:
    """Normal users: a ``slate``-item slate every ~60 s (each user's pace is 60 s times a
    lognormal(0, ``pace_spread``) factor), a click on 10% of them. The bot: a slate and a click
    on it every ~1.2 s (50x a normal pace, CTR ~1) between ``bot`` seconds. Sorted by time."""
    rng = np.random.default_rng(seed)
    out = []

    def session(user: str, t: float, click_prob: float) -> None:
        shown = [f"i{i}" for i in rng.choice(n_items, slate, replace=False)]
        request = f"{user}-{t:.3f}"
        items = [{"item_id": it, "position": p + 1, "propensity": 1.0 / slate} for p, it in enumerate(shown)]
        out.append(ev.impression(user, request, "m0", "softmax", items, ts=BASE_TS + t))
        if rng.random() < click_prob:
            out.append(ev.click(user, request, shown[rng.integers(3)], ts=BASE_TS + t + rng.uniform(0.2, 5)))

    for u in range(n_users):
        gap = 60.0 * rng.lognormal(0.0, pace_spread)
        t = rng.uniform(0, gap)
        while t < duration_s:
            session(f"u{u}", t, 0.1)
            t += rng.exponential(gap)
    t = bot[0]
    while t < bot[1]:
        session("bot", t, 1.0)
        t += rng.exponential(1.2)
    return sorted(out, key=lambda e: e["ts"])
