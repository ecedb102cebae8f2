r"""Benchmark of display-bias correction (the experiment is ``sim.bias``): one simulated log,
learned naively and with IPS, on seeds 0, 1, 2 (``--quick``: seed 0), with its targets.

Result fields (the last stdout line, also ``bench/results/bias.json``; means over the seeds,
``per_seed`` lists the main ones per seed):

- ``ndcg_naive``, ``ndcg_ips``, ``ndcg_position_only``: mean NDCG@10 over users; ``gain`` =
  ndcg_ips / ndcg_naive - 1 (target >= 0.10); ``ndcg_logging`` of the logging policy's slates.
- ``ctr_naive``, ``ctr_ips``, ``ctr_position_only``, ``ctr_logging``, ``ctr_oracle``: expected
  clicks per shown item of each model's greedy top-10 (of sampled logging slates; of the true
  best slates).
- ``examination_fitted``: the IPS learner's position-bias estimate at the end, next to
  ``examination_true``.
- ``ndcg_wait``, ``ndcg_immediate``, ``ctr_wait``, ``ctr_immediate``: the same figures of the
  learner service (``Learner.learn``, IPS-corrected) trained on the same traffic through the
  worker (``IngestPipeline``, ``attribution_window_s``) under each feedback protocol, in polls of
  ``protocol_poll`` messages; compare them with ``ndcg_ips``. ``clicks_sent_wait``,
  ``clicks_sent_immediate``: the clicks each worker sent its learner, of the ``clicks_logged``
  the models above learned (the difference: clicks later than the window). 20-50 s a seed.
- ``attack_flagged_share``: share of bot accounts flagged, averaged over the ends of the attack
  steps (target >= 0.9); ``normal_flagged_share``: the same for the normal users who made a
  request in that step (target <= 0.01). ``normal_ever_flagged_share``: normal users flagged at
  any moment of the attack phase, over those active in it; ``attack_detection_delay_s``: median
  time from a bot's first request to its first alarm; ``bots_never_flagged``.
- OBD (``../shared/data/obd``; ``obd_note`` says why when it is skipped):
  ``obd_position_ctr_random`` (CTR per position on ``random/men.csv`` relative to position 1:
  relative examination, since that policy places items at random) with its 95% interval
  ``obd_position_ctr_random_ci95`` and the ``obd_random_clicks`` behind it,
  ``obd_examination_bts`` (the ``PositionBiasEstimator`` fitted on ``bts/men.csv``, relative to
  position 1) and ``obd_max_abs_diff`` between the two curves.

    python -m bench.bias [--quick] [--seeds 0 1 2] [--eta 1.0] [--protocol-poll 64] [--obd ../shared/data/obd]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import emit
from sim.bias import BiasConfig, obd_position_curves, run, summarize

NAME = "bias"
TARGET_GAIN = 0.10
TARGET_ATTACK_FLAGGED = 0.9
TARGET_NORMAL_FLAGGED = 0.01
FULL_SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)  # --quick: the same simulation, one seed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.bias", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"run seeds {list(QUICK_SEEDS)} only instead of {list(FULL_SEEDS)} (about a minute)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of the simulations and models, overriding the two above")
    parser.add_argument("--users", type=int, default=BiasConfig.n_users, help="normal users (default: %(default)s)")
    parser.add_argument("--items", type=int, default=BiasConfig.n_items, help="catalogue size (default: %(default)s)")
    parser.add_argument("--eta", type=float, default=BiasConfig.eta,
                        help="examination decay: position p is examined with probability p**-eta "
                             "(default: %(default)s)")
    parser.add_argument("--popularity-alpha", type=float, default=BiasConfig.popularity_alpha,
                        help="logging policy: popularity weight of the item of rank r is r**-alpha "
                             "(default: %(default)s)")
    parser.add_argument("--protocol-poll", type=int, default=BiasConfig.protocol_poll,
                        help="messages per Learner.learn call of the feedback-protocol learners "
                             "(default: %(default)s)")
    parser.add_argument("--obd", type=Path, default=Path("../shared/data/obd"),
                        help="Open Bandit sample with random/ and bts/ (default: %(default)s)")
    parser.add_argument("--device", default=BiasConfig.device,
                        help="torch device of the learners (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=BiasConfig.threads,
                        help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = parser.parse_args(argv)
    seeds = args.seeds or list(QUICK_SEEDS if args.quick else FULL_SEEDS)
    configs = [BiasConfig(n_users=args.users, n_items=args.items, eta=args.eta, popularity_alpha=args.popularity_alpha,
                          protocol_poll=args.protocol_poll, seed=seed, device=args.device, threads=args.threads)
               for seed in seeds]

    start = time.perf_counter()
    runs = [run(config, progress=not args.no_progress) for config in configs]
    result = {"quick": args.quick, **{k: v for k, v in asdict(configs[0]).items() if k != "seed"},
              "seeds": seeds, **summarize(runs), **obd_position_curves(args.obd)}
    result["targets"] = {"gain": TARGET_GAIN, "attack_flagged_share": TARGET_ATTACK_FLAGGED,
                         "normal_flagged_share": TARGET_NORMAL_FLAGGED}
    result["targets_met"] = {
        "gain": result["gain"] >= TARGET_GAIN,
        "attack_flagged_share": result["attack_flagged_share"] >= TARGET_ATTACK_FLAGGED,
        "normal_flagged_share": result["normal_flagged_share"] <= TARGET_NORMAL_FLAGGED,
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    emit(NAME, result)
    return result


if __name__ == "__main__":
    main()
