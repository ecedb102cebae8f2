"""``streamrec ab``: compare the CTR of A/B variants from the event log, with the lift and its interval.

The impressions that name a ``variant`` and the clicks joined to them by ``request_id`` give each
variant's CTR per shown item; each variant is compared with the control, with intervals
clustered by user (``serving.ab``, ``serving.ab_log``). Output: a table, or JSON with ``--json``.
"""
from __future__ import annotations

import argparse
import json

from stream.config import StreamSettings


def cmd_ab(args: argparse.Namespace) -> int:
    from serving.ab import CONFIDENCE
    from serving.ab_log import compare_variants, format_table, slates_from_log

    log_dir = args.log_dir or StreamSettings().log_dir
    window = args.attribution_window_s if args.attribution_window_s is not None \
        else StreamSettings().attribution_window_s
    slates, outside = slates_from_log(log_dir, window)
    if slates.empty:
        raise SystemExit(f"streamrec ab: no impression in {log_dir} names a variant (is serving run with --variant, "
                         "and do clients log the response's variant?)")
    try:
        result = compare_variants(slates, args.control, CONFIDENCE if args.confidence is None else args.confidence)
    except ValueError as err:
        raise SystemExit(f"streamrec ab: {err}") from None
    result["outside_test"] = outside
    print(json.dumps(result, allow_nan=False) if args.json else format_table(result))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ab`` to ``streamrec``'s subcommands."""
    p = subparsers.add_parser(
        "ab", help="compare the CTR of A/B variants from the log, with the lift and its confidence interval",
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--log-dir", default=None, help="the event log's root, a folder or an object-store URL (default: the worker's, "
                        "$STREAMREC_LOG_DIR)")
    p.add_argument("--control", default="control", help="the variant the others are compared with (default control)")
    p.add_argument("--attribution-window-s", type=float, default=None,
                   help="a click counts when it comes at most this long after its impression (default: the "
                        "worker's attribution window)")
    p.add_argument("--confidence", type=float, default=None,
                   help="level of the intervals, in (0, 1) (default: serving.ab.CONFIDENCE, 0.95)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=cmd_ab)
    return p
