"""``streamrec serve``: the command line of a serving replica.

``add_parser`` adds the ``serve`` subcommand to the ``streamrec`` parser (``stream.cli``);
``python -m serving`` runs the same command on its own. Every flag defaults to its
``STREAMREC_*`` variable (``ServeSettings``); ``KAFKA_BOOTSTRAP_SERVERS`` or
``--bootstrap-servers`` selects the cluster, else the local broker is started.

A replica scores with one BLAS thread unless ``OPENBLAS_NUM_THREADS`` says otherwise: requests
are many and small, several replicas scale better than threads inside one, and on a small
shared machine OpenBLAS threads waiting for a busy core turned a 0.4 ms lookup into 12 ms.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from serving.settings import RETRIEVAL_MODES, ServeSettings
from serving.variants import DEFAULT_SALT, MAX_SALT_BYTES, SYNTAX, Assignment, VariantError, check_salt, parse_variants

# flag name -> (type, help); the defaults shown come from ServeSettings (environment included).
_FLAGS = {
    "model": (str, "model name in the store and on model.updates"),
    "store_dir": (Path, "model store folder"),
    "host": (str, "address to bind (keep 127.0.0.1 unless a proxy in front needs otherwise)"),
    "port": (int, "HTTP port (0: any free port)"),
    "header_timeout_s": (float, "seconds a connection has, from its start or its previous answer, to send a "
                                "request's whole header (idle keep-alive connections close after it too)"),
    "body_timeout_s": (float, "seconds a request has to send its whole body once its header arrived (408 past it)"),
    "max_connections": (int, "open HTTP connections at most; past it a new one gets 503 and is closed (keep it "
                             "below the process's file limit)"),
    "epsilon": (float, "default exploration probability of epsilon_greedy"),
    "attribution_window_s": (float, "the worker's attribution window (event-time seconds): the monitor scores a "
                                    "slate's clicks together with its unclicked items, which arrive when it closes"),
    "temperature": (float, "default temperature of softmax"),
    "candidates": (int, "softmax samples among this many best-scored items"),
    "history": (int, "recent model versions kept to score outcomes with the version that served them"),
    "rmse_window": (int, "outcomes per kind in the served RMSE"),
    "drift_window": (int, "observations in each of the reference and current drift windows"),
    "shadow_window": (int, "recent outcomes a candidate snapshot is checked on"),
    "shadow_tolerance": (float, "relative RMSE by which a candidate may be worse and still be promoted, and "
                                 "by which its estimated CTR (lower end of its 95%% interval) may fall below the live model's"),
    "shadow_min_outcomes": (int, "outcomes of a kind needed before it can refuse a candidate"),
    "seen_users": (int, "users whose seen items are kept (exclude_seen)"),
    "seen_per_user": (int, "items kept per user (exclude_seen)"),
    "popularity_half_life_s": (float, "half-life of the popularity counts behind the fallback"),
    "examples_lookback_s": (float, "how far back the monitor starts reading examples"),
    "ivf_min_items": (int, "with --retrieval ivf, catalogues smaller than this are still scored exactly"),
    "ivf_probe": (int, "with the index, clusters scored per request (more: higher recall, slower); items "
                       "changed by deltas since the last rebuild are always scored"),
    "ivf_clusters": (int, "k-means clusters of the index (0: about the square root of the item count)"),
}


DESCRIPTION = ("Serve GET /recommendations, POST /predict, /healthz, /readyz and /metrics from the newest snapshot "
               "in the model store plus the deltas on model.updates, and monitor served RMSE and drift from the "
               "outcomes on examples.")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve`` to ``streamrec``'s subcommands; its handler is ``args.func``."""
    p = subparsers.add_parser("serve", help="serve recommendations from the live model, with monitoring",
                              description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``serve``, and ``cmd_serve`` as ``func``."""
    defaults = ServeSettings(bootstrap_servers="-")
    p.add_argument("--bootstrap-servers", default=None,
                   help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS, else the local broker)")
    p.add_argument("--topic-prefix", default=defaults.topic_prefix,
                   help="namespace prefix for every topic name (default: $STREAMREC_TOPIC_PREFIX or none)")
    for name, (kind, text) in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{text} (default {getattr(defaults, name)})")
    p.add_argument("--kind", choices=("rating", "click"), default=None,
                   help=f"which model ranks and scores (default {defaults.kind})")
    p.add_argument("--retrieval", choices=RETRIEVAL_MODES, default=None,
                   help="how a known user's candidates are found: 'exact' scores every item; 'ivf' scores the "
                        "items of the --ivf-probe clusters of a k-means index nearest the user (plus every item "
                        "a delta changed since the index was built), exactly, and runs the policy on those "
                        "candidates: approximate retrieval, exact propensities for the policy as executed "
                        "(serving.index, serving.policies). The index is built when a snapshot loads and "
                        f"rebuilt in the background as deltas accumulate (default {defaults.retrieval})")
    p.add_argument("--seed", type=int, default=None, help="seed of the exploration policies (default: random)")
    p.add_argument("--variant", action="append", default=None, metavar=SYNTAX,
                   help="an A/B variant; repeat the flag for each. NAME names it in responses, impressions and "
                        "metrics; SOURCE is 'live' (the live model), a model store version such as mf-12 (that "
                        "snapshot, pinned) or 'popularity' (recent popularity, the baseline); POLICY (optional; "
                        "a policy of GET /recommendations, e.g. epsilon_greedy) replaces the request's policy; "
                        "WEIGHT is the variant's relative share of the users, who are assigned by a keyed hash of "
                        "user_id, the same on every replica and after restarts. E.g. --variant "
                        "model=live/epsilon_greedy:1 --variant control=popularity/epsilon_greedy:1; compare them "
                        "with `streamrec ab` (default: no A/B test)")
    p.add_argument("--variant-salt", default=DEFAULT_SALT,
                   help="key of the assignment hash; a new salt draws a new, independent assignment for a new "
                        f"experiment (1..{MAX_SALT_BYTES} bytes; default {DEFAULT_SALT!r})")
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Checked ServeSettings from parsed flags (unset flags keep the environment's defaults); the
    cluster is left to ``cmd_serve``, which may start the local broker."""
    settings = ServeSettings(topic_prefix=args.topic_prefix, seed=args.seed)
    for name in (*_FLAGS, "kind", "retrieval"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    try:
        settings.check()
    except ValueError as err:
        raise SystemExit(f"streamrec serve: {err}") from None
    return settings


def variants_from_args(args: argparse.Namespace) -> Assignment | None:
    """The A/B assignment the ``--variant`` flags describe (None without any); SystemExit naming
    the flag when one is wrong."""
    try:
        check_salt(args.variant_salt)
        return Assignment(parse_variants(args.variant), args.variant_salt) if args.variant else None
    except VariantError as err:
        raise SystemExit(f"streamrec serve: {err}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is imported (module docstring)
    from serving.app import run
    from stream.tools.command import resolve_bootstrap

    settings = settings_from_args(args)
    variants = variants_from_args(args)
    settings.bootstrap_servers = resolve_bootstrap(args.bootstrap_servers)
    try:
        run(settings, variants)
    except VariantError as err:  # a pinned version missing from the store or unusable
        raise SystemExit(f"streamrec serve: {err}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m serving``: the ``serve`` subcommand as a program of its own."""
    parser = argparse.ArgumentParser(prog="python -m serving", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
