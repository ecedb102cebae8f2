"""Users of two tastes and their slates: the smallest traffic where a click model must tell tastes
apart (the learner's tests and ``bench.feedback``)."""
from __future__ import annotations

import random

from stream import events as ev

TASTE_A = [f"a{i}" for i in range(10)]
TASTE_B = [f"b{i}" for i in range(10)]


def taste_fans(per_taste: int) -> list[tuple[str, list[str]]]:
    """``per_taste`` fans of ``TASTE_A`` (``fan-a0``, ...), then as many of ``TASTE_B``, as
    (user, liked items) pairs for :func:`taste_slates`."""
    return [(f"fan-{taste}{u}", liked) for taste, liked in (("a", TASTE_A), ("b", TASTE_B)) for u in range(per_taste)]


def taste_slates(users: list[tuple[str, list[str]]], rounds: int, rng: random.Random, t0: float,
                 every_s: float) -> list[dict]:
    """``rounds`` rounds of one slate per user, a slate every ``every_s`` s of event time from
    ``t0``, sorted by time. A slate shows 3 ``TASTE_A`` and 3 ``TASTE_B`` items in random order;
    its user clicks the items of its liked list shown in the top 4, half a second later."""
    out = []
    slates = ((r, user, liked) for r in range(rounds) for user, liked in users)
    for k, (r, user, liked) in enumerate(slates):
        shown = rng.sample(TASTE_A, 3) + rng.sample(TASTE_B, 3)
        rng.shuffle(shown)
        request = f"{user}-{r}-{rng.random():.6f}"
        ts = t0 + k * every_s
        out.append(ev.impression(user, request, "m0", "uniform",
                                 [{"item_id": it, "position": p + 1, "propensity": 1 / 20}
                                  for p, it in enumerate(shown)], ts=ts))
        out += [ev.click(user, request, it, ts=ts + 0.5) for it in shown[:4] if it in liked]
    return sorted(out, key=lambda e: e["ts"])
