"""``streamrec replay``, ``simulate`` and ``demo``: datasets and simulated users driving the system."""
from __future__ import annotations

import argparse
from pathlib import Path

from stream.config import SHARED_DATA
from stream.topics import Topics
from stream.tools.command import add_kafka_flags, resolve_bootstrap


# -- replay ------------------------------------------------------------------------------------

def _source(args: argparse.Namespace):
    from sim import sources

    if args.source == "movielens":
        path = Path(args.path or SHARED_DATA / "ml-100k" / "u.data")
        return sources.movielens_ratings(path)
    if args.source == "obd":
        path = Path(args.path or SHARED_DATA / "obd" / "random" / "men.csv")
        return sources.obd_events(path)
    return sources.synthetic_events(args.n, n_users=args.users, n_items=args.items, seed=args.seed)


def cmd_replay(args: argparse.Namespace) -> int:
    from stream.producer import EventProducer
    from sim.sources import replay
    from stream.topics import ensure_topics

    bootstrap = resolve_bootstrap(args.bootstrap_servers)
    topics = Topics(args.topic_prefix)
    ensure_topics(bootstrap, args.partitions, topics)
    events = _source(args)
    with EventProducer(bootstrap_servers=bootstrap, topic=topics.events) as producer:
        sent = replay(events, producer, rate=args.rate, limit=args.limit, progress=not args.no_progress)
    print(f"sent {sent} {args.source} events to {topics.events} at {bootstrap}")
    return 0


# -- simulate ----------------------------------------------------------------------------------

def cmd_simulate(args: argparse.Namespace) -> int:
    from sim.closed_loop import ClosedLoop
    from stream.producer import EventProducer
    from sim.simulator import Schedule, Simulation

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
    from sim.demo import run_demo

    return run_demo(quick=args.quick, bootstrap=args.bootstrap_servers, run_dir=args.run_dir, seed=args.seed)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``replay``, ``simulate`` and ``demo`` to the ``streamrec`` parser."""
    p = sub.add_parser("replay", help="stream a dataset into the events topic through the producer SDK")
    add_kafka_flags(p)
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

    p = sub.add_parser("simulate", help="simulated users ask serving for slates and log impressions and clicks")
    add_kafka_flags(p)
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
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the simulated world, its users and their clicks (default %(default)s)")
    p.set_defaults(func=cmd_demo)
