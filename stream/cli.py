"""``streamrec``: the one console script, with a subcommand per component.

Every flag takes its default from a ``STREAMREC_*`` environment variable where one exists.
``KAFKA_BOOTSTRAP_SERVERS`` (or ``--bootstrap-servers``) selects an existing cluster; without it
the commands that need Kafka start the local broker (``streamrec kafka start``) themselves.

Each package adds its own subcommands (``learner.cli``, ``serving.cli``, ``sim.cli``); this module,
the console script, is the one place allowed to import every package.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from learner.cli import add_parser as add_learner_parser
from serving.ab_cli import add_parser as add_ab_parser
from serving.cli import add_parser as add_serve_parser
from serving.ope.cli import add_parser as add_evaluate_parser
from sim.cli import add_parsers as add_sim_parsers
from stream.config import StreamSettings
from stream.examples import FEEDBACK_PROTOCOLS
from stream.log.cli import add_parser as add_log_parser
from stream.tools.command import add_kafka_flags, resolve_bootstrap, setup_logging


# -- kafka -------------------------------------------------------------------------------------

def cmd_kafka(args: argparse.Namespace) -> int:
    from stream.tools import kafka_local

    home = Path(args.home) if args.home else None
    if args.action == "start":
        broker = kafka_local.start(home=home, port=args.port, partitions=args.partitions, timeout_s=args.timeout)
        print(f"Kafka is up at {broker.bootstrap_servers} (pid {broker.pid}, log {broker.log_file})")
        print(f"export KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}")
    elif args.action == "stop":
        print("stopped" if kafka_local.stop(home=home) else "no local broker was running")
    else:
        broker = kafka_local.status(home=home)
        if broker is None:
            print("no local broker is running")
            return 1
        print(f"running: {broker.bootstrap_servers} (pid {broker.pid}, log {broker.log_file})")
    return 0


# -- worker ------------------------------------------------------------------------------------

def _stream_settings(args: argparse.Namespace) -> StreamSettings:
    settings = StreamSettings()
    settings.bootstrap_servers = resolve_bootstrap(args.bootstrap_servers)
    settings.topic_prefix = args.topic_prefix
    for name in ("partitions", "batch_size", "batch_timeout_s", "log_flush_rows", "log_flush_interval_s",
                 "dedupe_window_s", "attribution_window_s", "idle_grace_s", "max_future_s", "feedback",
                 "detector_checkpoint_interval_s", "worker_id", "log_compact_interval_s",
                 "log_compact_min_files", "log_compact_min_age_s",
                 "web_port", "web_host"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
    settings.log_dir = settings.log_root(getattr(args, "log_dir", None))
    return settings


def cmd_worker(args: argparse.Namespace) -> int:
    from stream.worker.app import run_worker

    settings = _stream_settings(args)
    detector = None
    if not args.no_anomaly:
        from stream.anomaly import AnomalyDetector

        detector = AnomalyDetector()
    run_worker(settings, detector=detector, loglevel="debug" if args.verbose else "info")
    return 0


# -- export ------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from stream.log.export import export_obp

    settings = StreamSettings()
    rows = export_obp(settings.log_root(args.log_dir), Path(args.out), policy=args.policy, storage_options=settings.log_storage_options)
    print(f"wrote {rows} logged impressions in the Open Bandit Pipeline layout to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Recommendations learned from a live Kafka event stream, with display bias "
                    "logged at the source and corrected in learning and evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("kafka", help="start, stop or inspect the local single-node Kafka broker (KRaft)")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=None, help="listener port (default: a free port)")
    p.add_argument("--home", default=None, help="data, log and PID folder (default: .streamrec/kafka)")
    p.add_argument("--partitions", type=int, default=4, help="default partitions of new topics (default 4)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness (default 180)")
    p.set_defaults(func=cmd_kafka)

    p = sub.add_parser("worker", help="run the Faust stream worker: validate, dedupe, log, join, score")
    add_kafka_flags(p)
    defaults = StreamSettings()
    p.add_argument("--partitions", type=int, default=None, help=f"partitions of the topics it creates (default {defaults.partitions})")
    p.add_argument("--log-dir", default=None,
                   help=f"Delta log root: a folder, or s3://bucket/prefix for workers on several hosts with "
                        f"$STREAMREC_LOG_STORAGE_OPTIONS (default {defaults.log_dir})")
    p.add_argument("--batch-size", type=int, default=None, help=f"events per processing batch (default {defaults.batch_size})")
    p.add_argument("--batch-timeout-s", type=float, default=None, help=f"seconds before a partial batch is processed (default {defaults.batch_timeout_s})")
    p.add_argument("--log-flush-rows", type=int, default=None,
                   help=f"write the log (and commit offsets) once this many rows wait (default {defaults.log_flush_rows})")
    p.add_argument("--log-flush-interval-s", type=float, default=None,
                   help=f"... or once the oldest waiting row is this old (default {defaults.log_flush_interval_s:g})")
    p.add_argument("--log-compact-interval-s", type=float, default=None,
                   help=f"compact the log's closed hours this often, 0 never (default {defaults.log_compact_interval_s:g})")
    p.add_argument("--log-compact-min-files", type=int, default=None,
                   help=f"... an hour holding at least this many small files (default {defaults.log_compact_min_files})")
    p.add_argument("--log-compact-min-age-s", type=float, default=None,
                   help=f"... that closed at least this long ago (default {defaults.log_compact_min_age_s:g})")
    p.add_argument("--dedupe-window-s", type=float, default=None, help=f"event-time window of event_id dedupe (default {defaults.dedupe_window_s:.0f})")
    p.add_argument("--attribution-window-s", type=float, default=None, help=f"click attribution window (default {defaults.attribution_window_s:.0f})")
    p.add_argument("--feedback", choices=FEEDBACK_PROTOCOLS, default=None,
                   help=f"'wait': a slate's unclicked items go out as negatives when its attribution window "
                        f"closes; 'immediate': every shown item goes out at once as a provisional negative, "
                        f"corrected by its click (default {defaults.feedback})")
    p.add_argument("--idle-grace-s", type=float, default=None,
                   help=f"after this long without events, event time follows the wall clock so open slates "
                        f"still close (default {defaults.idle_grace_s:g})")
    p.add_argument("--max-future-s", type=float, default=None,
                   help=f"dead-letter an event whose ts is more than this many seconds ahead of the worker's "
                        f"clock (reason ts_in_future; default {defaults.max_future_s:g})")
    p.add_argument("--detector-checkpoint-interval-s", type=float, default=None,
                   help=f"save the anomaly detector's state after a log write at most this often "
                        f"(default {defaults.detector_checkpoint_interval_s:g}; always at a clean stop)")
    p.add_argument("--worker-id", default=None,
                   help="this worker's stable id in the ingest consumer group, unique per live worker and kept "
                        "across restarts: a restarted worker then rejoins at once as the same static member "
                        "(default $STREAMREC_WORKER_ID; empty: a dynamic member)")
    p.add_argument("--web-host", default=None, help=f"address of the /metrics server (default {defaults.web_host})")
    p.add_argument("--web-port", type=int, default=None, help=f"port of the /metrics server, 0 to disable (default {defaults.web_port})")
    p.add_argument("--no-anomaly", action="store_true", help="do not score traffic for anomalies")
    p.set_defaults(func=cmd_worker)

    add_learner_parser(sub)
    add_serve_parser(sub)
    add_evaluate_parser(sub)
    add_ab_parser(sub)
    add_sim_parsers(sub)
    p = sub.add_parser("export", help="export the logged impressions for off-policy evaluation")
    p.add_argument("format", choices=["obp"], help="obp: the Open Bandit Pipeline's CSV layout")
    p.add_argument("--log-dir", default=None, help="Delta log root, a folder or an s3:// URL (default: the worker's)")
    p.add_argument("--out", required=True, help="output CSV path")
    p.add_argument("--policy", default=None, help="only impressions logged by this policy")
    p.set_defaults(func=cmd_export)
    add_log_parser(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
