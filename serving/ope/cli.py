"""``streamrec evaluate``: what clicks would a candidate get, estimated from the logged slates.

``add_parser`` adds the subcommand to ``streamrec`` (``stream.cli``). The log is the worker's
(``--log-dir``, read through ``stream.log.export``) or an OBP-layout CSV (``--obp-csv``); the
candidate is a snapshot of the model store with a serving policy, or a built-in baseline. The
estimators and their caveats are in ``serving.ope.estimators`` and docs/ope.md. Every figure is
shown beside the logged CTR, the logging policy's own result on the same slates.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from serving.settings import ServeSettings

log = logging.getLogger(__name__)

ESTIMATOR_NAMES = ("ips", "snips", "dr", "slate_ips")
DESCRIPTION = ("Estimate, from the logged impressions and clicks, the CTR per shown item and per position that a "
               "candidate policy would get: per-position IPS, self-normalised IPS and doubly robust (position-based "
               "click model), and whole-slate IPS, each with a 95% interval, effective sample size, largest "
               "importance weight and a warning when the log covers the candidate poorly. The candidate is a model "
               "store snapshot (--version) with a serving policy (--policy), or --baseline popularity|uniform.")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``evaluate`` to ``streamrec``'s subcommands; its handler is ``args.func``."""
    defaults = ServeSettings(bootstrap_servers="-")
    p = subparsers.add_parser("evaluate", help="off-policy evaluation of a candidate model or baseline from the log",
                              description=DESCRIPTION)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--log-dir", default=None, help="the worker's log root, as the worker takes it (default: the "
                        "worker's, $STREAMREC_LOG_DIR)")
    source.add_argument("--obp-csv", type=Path, default=None,
                        help="an Open Bandit Pipeline layout CSV instead (streamrec export obp, or an OBD file)")
    p.add_argument("--logging-policy", default=None, help="only slates logged by this policy (e.g. epsilon_greedy)")
    p.add_argument("--max-slates", type=int, default=200_000, help="evaluate on the newest N slates at most "
                   "(default %(default)s)")
    p.add_argument("--store-dir", type=Path, default=defaults.store_dir, help="model store (default %(default)s)")
    p.add_argument("--model", default=defaults.model, help="model name in the store (default %(default)s)")
    p.add_argument("--version", default=None,
                   help="the candidate snapshot's version (folder name), or 'latest'; with --baseline, the snapshot "
                        "whose click model serves as the doubly robust estimator's direct method (none: no dr)")
    p.add_argument("--baseline", choices=("popularity", "uniform"), default=None,
                   help="a built-in candidate instead of a snapshot: the items most clicked in the older half of "
                        "the log (evaluated on the newer half), or uniform random slates of the items in the log")
    p.add_argument("--policy", choices=("greedy", "epsilon_greedy", "softmax"), default="greedy",
                   help="the serving policy the candidate runs (default %(default)s)")
    p.add_argument("--kind", choices=("rating", "click"), default="click", help="which logits rank (default %(default)s)")
    p.add_argument("--epsilon", type=float, default=defaults.epsilon, help="epsilon_greedy's exploration (default %(default)s)")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="softmax's temperature (default %(default)s)")
    p.add_argument("--candidates", type=int, default=defaults.candidates,
                   help="softmax samples among this many best items (default %(default)s)")
    p.add_argument("--samples", type=int, default=200,
                   help="slates drawn per user to estimate a stochastic policy's position probabilities (default %(default)s)")
    p.add_argument("--estimators", nargs="+", choices=ESTIMATOR_NAMES, default=None, help="default: all available")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled slates (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=cmd_evaluate)
    return p


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run the evaluation and print it; 2 on a usage error."""
    try:
        report = evaluate(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"streamrec evaluate: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def evaluate(args: argparse.Namespace) -> dict:
    """The report of ``streamrec evaluate`` as a dict (what ``--json`` prints)."""
    from serving.ope.candidates import UniformCandidate, model_candidate, popularity_candidate
    from serving.ope.estimators import estimate
    from serving.ope.logdata import read_obp_csv, read_worker_log, slate_log

    import numpy as np

    if args.max_slates < 1 or args.samples < 1:
        raise ValueError("--max-slates and --samples must be at least 1")
    if args.baseline is None and args.version is None:
        raise ValueError("name a candidate: --version VERSION (or latest) of the model store, or --baseline")
    model = _snapshot(args.store_dir, args.model, args.version) if args.version else None
    if args.obp_csv is not None:
        frame = read_obp_csv(args.obp_csv, args.logging_policy)
    else:
        from stream.config import StreamSettings

        frame = read_worker_log(args.log_dir or StreamSettings().log_dir, args.logging_policy)
    frame = _newest(frame, args.max_slates)
    slates = slate_log(frame)
    if slates.n_slates == 0:
        raise ValueError("the log holds no closed slates" + (f" of policy {args.logging_policy!r}" if args.logging_policy else ""))
    log.info("evaluating on %d logged slates", slates.n_slates)
    params = {"policy": args.policy, "epsilon": args.epsilon, "temperature": args.temperature,
              "candidates": args.candidates, "samples": args.samples, "seed": args.seed}
    if args.baseline == "uniform":
        catalogue = sorted(set(slates.items[slates.shown].tolist()))
        candidate = UniformCandidate(catalogue, click_model=_click_model(model), seed=args.seed)
    elif args.baseline == "popularity":
        # Counted on the older half, evaluated on the newer: its own clicks would flatter it.
        older = np.arange(slates.n_slates) < slates.n_slates // 2
        candidate = popularity_candidate(slates.take(older), click_model=_click_model(model), **params)
        slates = slates.take(~older)
    else:
        candidate = model_candidate(model, kind=args.kind, **params)
    target = candidate.target(slates)
    estimates = estimate(slates, target, args.estimators)
    length = slates.shown.sum(axis=0)
    return {
        "candidate": candidate.name if args.baseline != "popularity" else f"popularity {args.policy}",
        "n_slates": slates.n_slates,
        "logged_ctr": slates.logged_value() / (slates.shown.sum() / slates.n_slates),
        "logged_ctr_by_position": [float(slates.clicks[slates.shown[:, k], k].mean()) for k in range(len(length))
                                   if length[k]],
        "notes": list(slates.notes),
        "estimates": {name: e.as_dict() for name, e in estimates.items()},
    }


def _newest(frame, max_slates: int):
    """The rows of the newest ``max_slates`` slates (rows are in time order)."""
    if "request_id" in frame.columns and frame["request_id"].notna().all():
        keep = frame["request_id"].drop_duplicates().iloc[-max_slates:]
        return frame[frame["request_id"].isin(set(keep))]
    return frame.iloc[-max_slates:]


def _snapshot(store: Path, model: str, version: str):
    """The verified snapshot as a ``ServingModel``; ValueError saying why it cannot be used."""
    from learner.updates import SnapshotError, latest_snapshot
    from serving.updates import read_serving_model

    folder = latest_snapshot(store, model) if version == "latest" else Path(store) / model / version
    if folder is None or not folder.is_dir():
        raise ValueError(f"--version: no snapshot {version!r} of model {model!r} in {store}")
    try:
        return read_serving_model(folder)
    except (SnapshotError, ValueError) as err:
        raise ValueError(f"--version: snapshot {folder} cannot be used: {err}") from None


def _click_model(model):
    from serving.ope.candidates import ModelClickModel

    return None if model is None else ModelClickModel(model)


def format_table(report: dict) -> str:
    """The report as a terminal table."""
    lines = [f"candidate: {report['candidate']}    slates: {report['n_slates']}    "
             f"logged CTR (the reference): {report['logged_ctr']:.4f}",
             f"{'estimator':<10} {'CTR':>8} {'95% CI':>19} {'vs logged':>9} {'clicks/slate':>12} {'ESS':>9} "
             f"{'max w':>9}"]
    for name, e in report["estimates"].items():
        lift = e["ctr"] / report["logged_ctr"] - 1.0 if report["logged_ctr"] > 0 else float("nan")
        lines.append(f"{name:<10} {e['ctr']:>8.4f} [{e['ci'][0]:>8.4f}, {e['ci'][1]:>7.4f}] {lift:>+9.1%} "
                     f"{e['clicks_per_slate']:>12.4f} {e['ess']:>9.1f} {e['max_weight']:>9.3g}")
    lines.append("CTR by position (logged | " + " | ".join(report["estimates"]) + "):")
    for k, logged in enumerate(report["logged_ctr_by_position"]):
        cells = []
        for e in report["estimates"].values():
            value, (low, high) = e["ctr_by_position"][k], e["ci_by_position"][k]
            cells.append(f"{value:.4f} [{low:.4f}, {high:.4f}]")
        lines.append(f"  {k + 1:>2}: {logged:.4f} | " + " | ".join(cells))
    for note in report["notes"]:
        lines.append(f"note: {note}")
    for name, e in report["estimates"].items():
        lines += [f"warning ({name}): {w}" for w in e["warnings"]]
    return "\n".join(lines)
