"""``streamrec``: the one console script, with a subcommand per component.

Every flag takes its default from a ``STREAMREC_*`` environment variable where one exists.
``KAFKA_BOOTSTRAP_SERVERS`` (or ``--bootstrap-servers``) selects an existing cluster; without it
the commands that need Kafka start the local broker (``streamrec kafka start``) themselves.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from stream.config import SHARED_DATA, StreamSettings, Topics

log = logging.getLogger("streamrec")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python's IO thread warns whenever the GIL held it past 100 ms: noise on a busy 2-core box.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


def resolve_bootstrap(explicit: str | None) -> str:
    """The cluster to use: the flag, else KAFKA_BOOTSTRAP_SERVERS, else the local broker (started if needed)."""
    if explicit:
        return explicit
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    from stream import kafka_local

    broker = kafka_local.start()
    log.info("using the local Kafka broker at %s (stop it with 'streamrec kafka stop')", broker.bootstrap_servers)
    return broker.bootstrap_servers


def _add_kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", default=None,
                   help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS, else the local broker)")
    p.add_argument("--topic-prefix", default=os.environ.get("STREAMREC_TOPIC_PREFIX", ""),
                   help="namespace prefix for every topic name (default: none, i.e. DESIGN.md's names)")


# -- kafka -------------------------------------------------------------------------------------

def cmd_kafka(args: argparse.Namespace) -> int:
    from stream import kafka_local

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
                 "dedupe_window_s", "attribution_window_s", "idle_grace_s", "detector_checkpoint_interval_s",
                 "web_port", "web_host"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
    if getattr(args, "log_dir", None):
        settings.log_dir = Path(args.log_dir)
    return settings


def cmd_worker(args: argparse.Namespace) -> int:
    from stream.app import run_worker

    settings = _stream_settings(args)
    detector = None
    if not args.no_anomaly:
        from stream.anomaly import AnomalyDetector

        detector = AnomalyDetector()
    run_worker(settings, detector=detector, loglevel="debug" if args.verbose else "info")
    return 0


# -- learner -----------------------------------------------------------------------------------

def cmd_learner(args: argparse.Namespace) -> int:
    from learner.service import run_learner
    from learner.settings import LearnerSettings

    settings = LearnerSettings()
    settings.bootstrap_servers = resolve_bootstrap(args.bootstrap_servers)
    settings.topic_prefix = args.topic_prefix
    for name in ("model", "n_factors", "device", "batch_size", "batch_timeout_s", "publish_interval_s",
                 "snapshot_interval_s", "checkpoint_interval_s", "web_port", "web_host"):
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


def _add_learner_parser(sub: argparse._SubParsersAction) -> None:
    from learner.settings import LearnerSettings

    d = LearnerSettings(bootstrap_servers="-")
    p = sub.add_parser("learner", help="train the online model on `examples` and publish it to serving")
    _add_kafka_flags(p)
    p.add_argument("--model", default=None, help=f"model name in the store and on model.updates (default {d.model})")
    p.add_argument("--n-factors", type=int, default=None, help=f"embedding size of a new model (default {d.n_factors})")
    p.add_argument("--rating-range", type=_rating_range_arg, default=None, metavar="LOW,HIGH",
                   help="bounds of the ratings, e.g. 1,5: a new model's rating scores are clipped to them, "
                        f"in training and in serving (default {_range_text(d.rating_range)})")
    p.add_argument("--device", default=None, help=f"'auto' (CUDA when present), 'cpu' or 'cuda:N' (default {d.device})")
    p.add_argument("--batch-size", type=int, default=None, help=f"examples per micro-batch (default {d.batch_size})")
    p.add_argument("--batch-timeout-s", type=float, default=None, help=f"seconds before a partial micro-batch trains (default {d.batch_timeout_s})")
    p.add_argument("--publish-interval-s", type=float, default=None, help=f"seconds between deltas (default {d.publish_interval_s})")
    p.add_argument("--snapshot-interval-s", type=float, default=None, help=f"seconds between snapshots (default {d.snapshot_interval_s})")
    p.add_argument("--checkpoint-interval-s", type=float, default=None, help=f"seconds between checkpoints (default {d.checkpoint_interval_s})")
    p.add_argument("--store-dir", default=None, help=f"model store (default {d.store_dir})")
    p.add_argument("--checkpoint-dir", default=None, help=f"checkpoints (default {d.checkpoint_dir})")
    p.add_argument("--web-host", default=None, help=f"address of /metrics (default {d.web_host})")
    p.add_argument("--web-port", type=int, default=None, help=f"port of /metrics, 0 to disable (default {d.web_port})")
    p.set_defaults(func=cmd_learner)


# -- replay ------------------------------------------------------------------------------------

def _source(args: argparse.Namespace):
    from stream import sources

    if args.source == "movielens":
        path = Path(args.path or SHARED_DATA / "ml-100k" / "u.data")
        return sources.movielens_ratings(path)
    if args.source == "obd":
        path = Path(args.path or SHARED_DATA / "obd" / "random" / "men.csv")
        return sources.obd_events(path)
    return sources.synthetic_events(args.n, n_users=args.users, n_items=args.items, seed=args.seed)


def cmd_replay(args: argparse.Namespace) -> int:
    from stream.producer import EventProducer
    from stream.sources import replay
    from stream.topics import ensure_topics

    bootstrap = resolve_bootstrap(args.bootstrap_servers)
    topics = Topics(args.topic_prefix)
    ensure_topics(bootstrap, args.partitions, topics)
    events = _source(args)
    with EventProducer(bootstrap_servers=bootstrap, topic=topics.events) as producer:
        sent = replay(events, producer, rate=args.rate, limit=args.limit, progress=not args.no_progress)
    print(f"sent {sent} {args.source} events to {topics.events} at {bootstrap}")
    return 0


# -- export ------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from stream.export import export_obp

    settings = StreamSettings()
    log_dir = Path(args.log_dir) if args.log_dir else settings.log_dir
    rows = export_obp(log_dir, Path(args.out), policy=args.policy)
    print(f"wrote {rows} logged impressions in the Open Bandit Pipeline layout to {args.out}")
    return 0


# -- simulate ----------------------------------------------------------------------------------

def cmd_simulate(args: argparse.Namespace) -> int:
    from stream.closed_loop import ClosedLoop
    from stream.producer import EventProducer
    from stream.simulator import Schedule, Simulation

    bootstrap = resolve_bootstrap(args.bootstrap_servers)
    schedule = Schedule(args.warmup, args.steady, args.attack, args.shift)
    if args.movielens:
        sim = Simulation.from_movielens(args.movielens, seed=args.seed, schedule=schedule)
    else:
        sim = Simulation.planted(n_users=args.users, n_items=args.items, seed=args.seed, schedule=schedule)
    with EventProducer(bootstrap, topic=Topics(args.topic_prefix).events) as producer:
        loop = ClosedLoop(sim, args.serve_url, producer, policy=args.policy, k=args.k, seed=args.seed)
        for step in range(schedule.n_steps):
            stats = loop.run_step(step)
            print(f"step {step:>3} {stats.phase:<7} requests {stats.requests:>5} CTR {stats.ctr:.4f} "
                  f"models {sorted(stats.model_versions) or ['none']}", flush=True)
    return 0


# -- demo --------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from stream.demo import run_demo

    return run_demo(quick=args.quick, bootstrap=args.bootstrap_servers, run_dir=args.run_dir)


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
    _add_kafka_flags(p)
    defaults = StreamSettings()
    p.add_argument("--partitions", type=int, default=None, help=f"partitions of the topics it creates (default {defaults.partitions})")
    p.add_argument("--log-dir", default=None, help=f"Parquet log root (default {defaults.log_dir})")
    p.add_argument("--batch-size", type=int, default=None, help=f"events per processing batch (default {defaults.batch_size})")
    p.add_argument("--batch-timeout-s", type=float, default=None, help=f"seconds before a partial batch is processed (default {defaults.batch_timeout_s})")
    p.add_argument("--log-flush-rows", type=int, default=None,
                   help=f"write the log (and commit offsets) once this many rows wait (default {defaults.log_flush_rows})")
    p.add_argument("--log-flush-interval-s", type=float, default=None,
                   help=f"... or once the oldest waiting row is this old (default {defaults.log_flush_interval_s:g})")
    p.add_argument("--dedupe-window-s", type=float, default=None, help=f"event-time window of event_id dedupe (default {defaults.dedupe_window_s:.0f})")
    p.add_argument("--attribution-window-s", type=float, default=None, help=f"click attribution window (default {defaults.attribution_window_s:.0f})")
    p.add_argument("--idle-grace-s", type=float, default=None,
                   help=f"after this long without events, event time follows the wall clock so open slates "
                        f"still close (default {defaults.idle_grace_s:g})")
    p.add_argument("--detector-checkpoint-interval-s", type=float, default=None,
                   help=f"save the anomaly detector's state after a log write at most this often "
                        f"(default {defaults.detector_checkpoint_interval_s:g}; always at a clean stop)")
    p.add_argument("--web-host", default=None, help=f"address of the /metrics server (default {defaults.web_host})")
    p.add_argument("--web-port", type=int, default=None, help=f"port of the /metrics server, 0 to disable (default {defaults.web_port})")
    p.add_argument("--no-anomaly", action="store_true", help="do not score traffic for anomalies")
    p.set_defaults(func=cmd_worker)

    _add_learner_parser(sub)

    from serving.cli import add_parser as add_serve_parser

    add_serve_parser(sub)

    p = sub.add_parser("replay", help="stream a dataset into the events topic through the producer SDK")
    _add_kafka_flags(p)
    p.add_argument("--source", choices=["movielens", "obd", "synthetic"], required=True,
                   help="movielens: u.data as ratings; obd: Open Bandit CSV as impressions + clicks; synthetic: generated mix")
    p.add_argument("--path", default=None, help="dataset file (default: the one in ../shared/data)")
    p.add_argument("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="stop after this many events")
    p.add_argument("--n", type=int, default=10_000, help="synthetic: number of events (default 10000)")
    p.add_argument("--users", type=int, default=500, help="synthetic: number of users (default 500)")
    p.add_argument("--items", type=int, default=200, help="synthetic: number of items (default 200)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: random seed (default 0)")
    p.add_argument("--partitions", type=int, default=4, help="partitions if the topics must be created (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("export", help="export the logged impressions for off-policy evaluation")
    p.add_argument("format", choices=["obp"], help="obp: the Open Bandit Pipeline's CSV layout")
    p.add_argument("--log-dir", default=None, help="Parquet log root (default: the worker's)")
    p.add_argument("--out", required=True, help="output CSV path")
    p.add_argument("--policy", default=None, help="only impressions logged by this policy")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("simulate", help="simulated users ask serving for slates and log impressions and clicks")
    _add_kafka_flags(p)
    p.add_argument("--serve-url", default="http://127.0.0.1:8080", help="serving base URL (default %(default)s)")
    p.add_argument("--policy", default="epsilon_greedy", choices=["greedy", "epsilon_greedy", "softmax"],
                   help="serving's exploration policy (default %(default)s)")
    p.add_argument("--k", type=int, default=10, help="slate size (default %(default)s)")
    p.add_argument("--users", type=int, default=500, help="planted world: users (default %(default)s)")
    p.add_argument("--items", type=int, default=200, help="planted world: items (default %(default)s)")
    p.add_argument("--movielens", default=None, help="fit the hidden preferences to this MovieLens u.data instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the traffic and the clicks (default 0)")
    for phase, steps in (("warmup", 10), ("steady", 30), ("attack", 10), ("shift", 20)):
        p.add_argument(f"--{phase}", type=int, default=steps, help=f"steps of the {phase} phase (default {steps})")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="set up and run the pipeline on the local broker, then report")
    p.add_argument("--quick", action="store_true", help="a smaller run")
    p.add_argument("--bootstrap-servers", default=None, help="use this cluster instead of the local broker")
    p.add_argument("--run-dir", default=None, help="where logs and results go (default: runs/<timestamp>)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
