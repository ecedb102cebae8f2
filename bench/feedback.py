"""The two feedback protocols of the worker on the traffic that tells a click model's tastes apart.

Each run joins users of two tastes (``sim.tastes``: 30 fans of "a" items, 30 of "b" items, 15
slates each) through the worker's own pipeline under one protocol (``wait`` or ``immediate``,
``stream.worker.join``) and trains the learner service's ``Learner.learn`` on the examples in
polls of 64 messages. A run *learns* when the fans of "a" get at most 20% "b"
items in their top 5 and the fans of "b" at least 80%. Two arrival patterns:

- ``steady``: a slate every 20 ms of event time;
- ``burst``: the README's known limitation, 900 slates within 150 ms of event time, so that under
  ``wait`` all positives arrive before any negative, and under ``immediate`` all provisional
  negatives before any click.

Result fields: ``<protocol>_<pattern>_learned`` (runs that learned, of ``runs``), and the mean top-5
shares ``<protocol>_<pattern>_share_b_fans_a`` / ``..._fans_b``. Measurements and the choice of
the default: docs/learner.md, "Feedback protocols".

    python -m bench.feedback [--quick] [--runs 10]
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.common import emit
from learner.service import Learner
from learner.settings import LearnerSettings
from sim.tastes import TASTE_A, TASTE_B, taste_fans, taste_slates
from stream.events import encode
from stream.examples import FEEDBACK_PROTOCOLS, example_batch
from stream.worker.pipeline import IngestPipeline, Record

PATTERNS = {"steady": 0.02, "burst": 0.15 / 900}
WINDOW_S = 2.0


def learns(feedback: str, every_s: float, seed: int, batch: int = 64) -> tuple[bool, float, float]:
    """One run (module docstring): whether it learned, and the two fan groups' shares of "b" items."""
    rng = random.Random(seed)
    pipeline = IngestPipeline(attribution_window_s=WINDOW_S, feedback=feedback)
    fans = taste_fans(30)
    events = taste_slates(fans, 15, rng, 0.0, every_s=every_s)
    examples = []
    for offset, event in enumerate(events):
        examples += pipeline.process([Record(encode(event), partition=0, offset=offset)]).examples
    examples += pipeline.partition(0).joiner.advance(events[-1]["ts"] + 10 * WINDOW_S)
    with tempfile.TemporaryDirectory() as root:
        learner = Learner(LearnerSettings(bootstrap_servers="unused:9092", n_factors=8, device="cpu",
                                          store_dir=Path(root) / "store", checkpoint_dir=Path(root) / "ckpt",
                                          attribution_window_s=WINDOW_S))
        for start in range(0, len(examples), batch):
            learner.learn(example_batch(examples[start:start + batch]))
    model, ids = learner.model, learner.model.items.ids

    def share_b(user: str) -> float:
        scores = model.predict([user] * len(ids), ids, kind="click")
        return float(np.mean([ids[j].startswith("b") for j in np.argsort(-scores, kind="stable")[:5]]))

    fans_a = float(np.mean([share_b(user) for user, liked in fans if liked is TASTE_A]))
    fans_b = float(np.mean([share_b(user) for user, liked in fans if liked is TASTE_B]))
    return fans_a <= 0.2 and fans_b >= 0.8, fans_a, fans_b


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.feedback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="seeds per protocol and pattern (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 runs each")
    args = parser.parse_args(argv)
    runs = 3 if args.quick else args.runs
    result: dict = {"runs": runs, "window_s": WINDOW_S, "batch": 64}
    cases = [(f, p) for f in FEEDBACK_PROTOCOLS for p in PATTERNS]
    with tqdm(total=len(cases) * runs, desc="feedback", unit="run") as bar:
        for feedback, pattern in cases:
            outcomes = []
            for seed in range(runs):
                outcomes.append(learns(feedback, PATTERNS[pattern], seed))
                bar.update()
            key = f"{feedback}_{pattern}"
            result[f"{key}_learned"] = sum(o[0] for o in outcomes)
            result[f"{key}_share_b_fans_a"] = round(float(np.mean([o[1] for o in outcomes])), 3)
            result[f"{key}_share_b_fans_b"] = round(float(np.mean([o[2] for o in outcomes])), 3)
    emit("feedback", result)
    return result


if __name__ == "__main__":
    main()
