"""``streamrec learner``: the command line of the online learner."""
from __future__ import annotations

import argparse
from pathlib import Path

from stream.tools.command import add_kafka_flags, resolve_bootstrap


def cmd_learner(args: argparse.Namespace) -> int:
    from learner.service import run_learner
    from learner.settings import LearnerSettings

    settings = LearnerSettings()
    settings.bootstrap_servers = resolve_bootstrap(args.bootstrap_servers)
    settings.topic_prefix = args.topic_prefix
    for name in ("model", "n_factors", "device", "batch_size", "batch_timeout_s", "publish_interval_s",
                 "snapshot_interval_s", "checkpoint_interval_s", "web_port", "web_host", "outcome_window_s",
                 "outcome_keys_max", "attribution_window_s", "feedback_wait_quantile"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if args.rating_range is not None:
        settings.rating_range = args.rating_range
    if args.store_dir:
        settings.store_dir = Path(args.store_dir)
    if args.checkpoint_dir:
        settings.checkpoint_dir = Path(args.checkpoint_dir)
    run_learner(settings)
    return 0


def _rating_range_arg(text: str) -> tuple[float, float] | None:
    from learner.settings import parse_rating_range

    try:
        return parse_rating_range(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _range_text(bounds: tuple[float, float] | None) -> str:
    return "none" if bounds is None else f"{bounds[0]:g},{bounds[1]:g}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from learner.settings import LearnerSettings

    d = LearnerSettings(bootstrap_servers="-")
    p = sub.add_parser("learner", help="train the online model on `examples` and publish it to serving")
    add_kafka_flags(p)
    p.add_argument("--model", default=None, help=f"model name in the store and on model.updates (default {d.model})")
    p.add_argument("--n-factors", type=int, default=None, help=f"embedding size of a new model (default {d.n_factors})")
    p.add_argument("--rating-range", type=_rating_range_arg, default=None, metavar="LOW,HIGH",
                   help="bounds of the ratings, e.g. 1,5: a new model's rating scores are clipped to them, "
                        f"in training and in serving (default {_range_text(d.rating_range)})")
    p.add_argument("--device", default=None, help=f"'auto' (CUDA when present), 'cpu' or 'cuda:N' (default {d.device})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"labelled items per micro-batch, and messages per poll (default {d.batch_size})")
    p.add_argument("--batch-timeout-s", type=float, default=None, help=f"seconds before a partial micro-batch trains (default {d.batch_timeout_s})")
    p.add_argument("--publish-interval-s", type=float, default=None, help=f"seconds between deltas (default {d.publish_interval_s})")
    p.add_argument("--snapshot-interval-s", type=float, default=None, help=f"seconds between snapshots (default {d.snapshot_interval_s})")
    p.add_argument("--checkpoint-interval-s", type=float, default=None, help=f"seconds between checkpoints (default {d.checkpoint_interval_s})")
    p.add_argument("--attribution-window-s", type=float, default=None,
                   help="the worker's click attribution window: under its 'immediate' feedback a shown item's "
                        f"label is final this long after its slate (default {d.attribution_window_s:.0f})")
    p.add_argument("--feedback-wait-quantile", type=float, default=None,
                   help="under 'immediate' feedback a shown item waits this quantile of the recent click delays "
                        "(at most the attribution window) before it trains, so that a click arriving meanwhile "
                        f"becomes its label; 0 trains it at once (default {d.feedback_wait_quantile})")
    p.add_argument("--outcome-window-s", type=float, default=None,
                   help="seconds of event time an outcome is remembered, so that a copy re-sent by a restarted "
                        f"worker is not trained twice (default: the attribution window + 600 = {d.outcome_retention_s:.0f})")
    p.add_argument("--outcome-keys-max", type=int, default=None,
                   help=f"the most outcomes remembered at once, about 45 bytes each (default {d.outcome_keys_max})")
    p.add_argument("--store-dir", default=None, help=f"model store (default {d.store_dir})")
    p.add_argument("--checkpoint-dir", default=None, help=f"checkpoints (default {d.checkpoint_dir})")
    p.add_argument("--web-host", default=None, help=f"address of /metrics (default {d.web_host})")
    p.add_argument("--web-port", type=int, default=None, help=f"port of /metrics, 0 to disable (default {d.web_port})")
    p.set_defaults(func=cmd_learner)
