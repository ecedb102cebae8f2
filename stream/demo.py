"""``streamrec demo``: the pipeline end to end on the local broker, then a report of what was logged.

It starts what is not running (the local broker unless a cluster is given, and a stream worker
with its own run folder), replays the shared datasets through the producer SDK (the Open Bandit
sample with its real positions and propensities, MovieLens ratings, synthetic traffic and a few
deliberately broken messages), waits until the worker has taken every message, and prints what
the log holds: events by type, dead letters by reason, examples by label, where the Parquet files
and the Open Bandit export are. Everything it started is stopped at the end, Ctrl-C included.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from stream import events as ev
from stream import kafka_local
from stream.config import PROJECT_ROOT, Topics
from stream.eventlog import EVENTS, EXAMPLES, ParquetLog
from stream.export import export_obp
from stream.metrics import scrape, total
from stream.producer import EventProducer
from stream.sources import movielens_ratings, obd_events, replay, synthetic_events
from stream.topics import ensure_topics

log = logging.getLogger(__name__)
SHARED_DATA = (PROJECT_ROOT / ".." / "shared" / "data").resolve()

BROKEN_MESSAGES = [
    b"{this is not json",
    b"\xff\xfe not utf-8",
    json.dumps({"event_id": "x1", "type": "purchase", "user_id": "u", "ts": 1.0, "schema_version": 1}).encode(),
    json.dumps({"event_id": "x2", "type": "rating", "user_id": "u", "ts": 1.0, "schema_version": 1,
                "item_id": "i", "value": "five"}).encode(),
    json.dumps({"event_id": "x3", "type": "impression", "user_id": "u", "ts": 1.0, "schema_version": 1,
                "request_id": "r", "model_version": "m", "policy": "greedy",
                "items": [{"item_id": "a", "position": 1, "propensity": 0}]}).encode(),
]


def _datasets(quick: bool) -> list[tuple[str, object]]:
    """(name, events) to replay; the shared datasets when present, synthetic traffic always."""
    sets: list[tuple[str, object]] = []
    if SHARED_DATA.is_dir():
        sets.append(("Open Bandit (random policy)", obd_events(SHARED_DATA / "obd" / "random" / "men.csv")))
        if not quick:
            sets.append(("Open Bandit (Thompson sampling)", obd_events(SHARED_DATA / "obd" / "bts" / "men.csv")))
        ratings = movielens_ratings(SHARED_DATA / "ml-100k" / "u.data")
        sets.append(("MovieLens 100K ratings", itertools.islice(ratings, 5_000) if quick else ratings))
    else:
        log.warning("no shared datasets at %s: replaying synthetic traffic only", SHARED_DATA)
    sets.append(("synthetic traffic", synthetic_events(5_000 if quick else 50_000, n_users=500, n_items=300, seed=7)))
    return sets


def _wait_for_worker(port: int, expected: float, proc: subprocess.Popen, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the stream worker exited; see its log in the run folder")
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        seen = sum(total(samples, n) for n in
                   ("streamrec_events_total", "streamrec_duplicates_total", "streamrec_dlq_total"))
        if seen >= expected:
            return samples
        time.sleep(0.5)
    raise RuntimeError(f"the worker took fewer than {expected:.0f} messages within {timeout_s:.0f} s")


def _by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        if sample == name:
            key = "/".join(v for k, v in labels if k in label.split(","))
            out[key] = out.get(key, 0) + value
    return out


def run_demo(quick: bool = False, bootstrap: str | None = None, run_dir: str | None = None) -> int:
    run = Path(run_dir or PROJECT_ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    run.mkdir(parents=True, exist_ok=True)
    print(f"streamrec demo: run folder {run}")
    with ExitStack() as stack:
        bootstrap = bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            already = kafka_local.status()
            broker = kafka_local.start()
            if already is None:
                stack.callback(kafka_local.stop)
            bootstrap = broker.bootstrap_servers
        print(f"Kafka: {bootstrap}")
        topics = Topics(f"demo{time.strftime('%Y%m%d%H%M%S')}.")
        ensure_topics(bootstrap, 4, topics)

        port = kafka_local.free_port()
        worker_log = open(run / "worker.log", "wb")
        stack.callback(worker_log.close)
        env = dict(os.environ, STREAMREC_HOME=str(run / "state"))
        worker = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker", "--bootstrap-servers", bootstrap,
             "--topic-prefix", topics.prefix, "--log-dir", str(run / "log"), "--web-port", str(port),
             "--attribution-window-s", "60"],
            stdout=worker_log, stderr=subprocess.STDOUT, env=env,
        )
        stack.callback(_stop, worker)
        print(f"stream worker: pid {worker.pid}, metrics at http://127.0.0.1:{port}/metrics, log {run / 'worker.log'}")

        sent = 0
        with EventProducer(bootstrap, topic=topics.events) as producer:
            for name, events in _datasets(quick):
                print(f"replaying {name} ...")
                sent += replay(events, producer)
            for raw in BROKEN_MESSAGES:
                producer.send_raw(raw, key=b"demo")
            sent += len(BROKEN_MESSAGES)
        print(f"sent {sent} messages ({len(BROKEN_MESSAGES)} deliberately broken); waiting for the worker ...")
        samples = _wait_for_worker(port, sent, worker, timeout_s=1800)
        time.sleep(4)  # the idle timer closes the last attribution windows
        samples = scrape(f"http://127.0.0.1:{port}/metrics") or samples
        _report(run, samples)
    return 0


def _report(run: Path, samples: dict) -> None:
    event_log = ParquetLog(run / "log")
    obp_csv = run / "obp_export.csv"
    rows = export_obp(run / "log", obp_csv)
    print("\n== what the stream logged ==")
    print("events by type:   ", _by_label(samples, "streamrec_events_total", "type"))
    print("duplicates:       ", int(total(samples, "streamrec_duplicates_total")))
    print("dead letters:     ", _by_label(samples, "streamrec_dlq_total", "reason"))
    print("examples:         ", _by_label(samples, "streamrec_examples_total", "kind,label"))
    print("unjoined clicks:  ", _by_label(samples, "streamrec_unjoined_clicks_total", "reason"))
    print(f"Parquet log:       {run / 'log'} ({len(event_log.files(EVENTS))} event files, "
          f"{len(event_log.files(EXAMPLES))} example files)")
    print(f"OBP export:        {obp_csv} ({rows} logged impressions with position, click, propensity)")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
