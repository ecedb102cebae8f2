"""Ingest throughput: the full Faust pipeline against a raw aiokafka consumer on the same topic.

Produces N events (a realistic mix from ``sim.sources.synthetic_events``) into the broker, then
measures in the same run:

- ``raw``: an aiokafka consumer that only fetches and decodes every message with ``orjson.loads``
  into a dict (the worker parses into msgspec Structs instead; ``raw_stdlib_json`` repeats it
  with ``json.loads``, the peer of earlier runs, for comparison);
- ``fanout``: the same consumer, which also sends one ``examples`` message per event (the
  ``closed`` outcome of an impression, with an item per shown item; the ``clicked`` or ``rated``
  outcome of a click or rating), built from fixed examples and sent through the worker's own
  ``BatchSender`` with ``acks=all``. It is the Kafka traffic the pipeline cannot avoid, without
  any of its logic: no validation, join, dedupe or log;
- ``pipeline``: ``streamrec worker`` (Faust: validate, dedupe, Delta log, click join, sends to
  ``examples``), timed from its first accepted event to its N-th through its /metrics counter.

All start with the data already in Kafka, so all are measured at full speed. The figure that
matters is ``ratio`` = pipeline / raw: the machine is shared and noisy, the ratio much less so.
``fanout_ratio`` = fanout / raw bounds it from above for any worker that sends its examples
through aiokafka from Python: what is left between the two is the pipeline's own work.
``cpu_stolen_share`` is the share of the machine's CPU time the hypervisor gave to other guests
while the pipeline ran (``steal`` in /proc/stat), to say how noisy it was.
``examples_messages_per_event`` counts the worker's messages on ``examples`` per event it read;
``pipeline_events_per_s_per_core`` divides the events it processed by the CPU seconds its process
used meanwhile (user + system), which the other processes on the machine affect less than wall time.
``broker_cpu_us_per_event`` is the broker's CPU time per event while each peer ran (the raw peer
only reads; the fan-out peer and the pipeline also write an ``examples`` message per event): the
broker shares the machine's cores with the peer it serves (None with an external broker).

The log's cost: ``log_commits`` flushes, each ``log_commit_ms_p50`` / ``log_commit_ms_p99`` of wall
time (data files and commits of both tables, from the worker's ``streamrec_log_commit_seconds``
histogram, interpolated within its buckets), and ``log_files`` data files after the run (before
any compaction). Measurements: docs/log.md.

    python -m bench.ingest            # 200,000 events
    python -m bench.ingest --quick    # 30,000 events
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import orjson
from aiokafka import AIOKafkaConsumer
from tqdm import tqdm

from bench.common import StolenCpu, emit
from stream.events import Impression, impression, to_event
from stream.examples import CLICKED, CLOSED, Example, click_example
from stream.log.table import EVENTS, EXAMPLES, DeltaLog
from stream.topics import Topics
from stream.tools.kafka_local import broker_for_run, free_port
from stream.tools.kafka_local import status as kafka_status
from stream.tools.scrape import Samples, scrape, total
from stream.worker.output import BatchSender
from stream.tools.processes import spawn, stop
from stream.producer import EventProducer
from sim.sources import synthetic_events
from stream.topics import end_offsets, ensure_topics


def produce(bootstrap: str, topic: str, n: int, seed: int) -> float:
    """Send n synthetic events; return the producer's events per second."""
    started = time.perf_counter()
    with EventProducer(bootstrap, topic=topic) as producer:
        for event in tqdm(synthetic_events(n, n_users=5000, n_items=2000, seed=seed), total=n,
                          desc="produce", unit="ev", file=sys.stderr, mininterval=1.0):
            producer.send(event)
    return n / (time.perf_counter() - started)


async def _started_consumer(bootstrap: str, topic: str, name: str) -> AIOKafkaConsumer:
    """A consumer of ``topic`` from its start, in a group of its own."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-{name}-{uuid.uuid4().hex[:8]}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    return consumer


class _Span:
    """From the first batch a peer received to its end: events per second, and the broker's CPU
    seconds per event meanwhile (None without the broker's pid)."""

    def __init__(self, broker_pid: int | None) -> None:
        self.broker_pid = broker_pid
        self.first: float | None = None

    def start(self) -> None:
        if self.first is None:
            self.first, self._broker = time.perf_counter(), process_cpu_seconds(self.broker_pid)

    def end(self, events: float) -> tuple[float, float | None]:
        """The rate of ``events`` processed since ``start``, and the broker's CPU per event."""
        rate = events / (time.perf_counter() - self.first)
        broker = process_cpu_seconds(self.broker_pid) - self._broker
        return rate, None if self.broker_pid is None else broker / events


async def _raw_consume(bootstrap: str, topic: str, n: int, loads: Callable[[bytes], object],
                       broker_pid: int | None) -> tuple[float, float | None]:
    consumer = await _started_consumer(bootstrap, topic, "raw")
    span = _Span(broker_pid)
    try:
        seen = 0
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batches.values():
                span.start()
                for record in records:
                    loads(record.value)
                seen += len(records)
        return span.end(n)
    finally:
        await consumer.stop()


def raw_consume(bootstrap: str, topic: str, n: int, loads: Callable[[bytes], object] = orjson.loads,
                broker_pid: int | None = None) -> tuple[float, float | None]:
    """Events per second of a raw aiokafka consumer that only decodes JSON (with ``loads``), and
    the broker's CPU seconds per event meanwhile."""
    return asyncio.run(_raw_consume(bootstrap, topic, n, loads, broker_pid))


# The examples the worker sends (``stream.examples``: one message per outcome), ids as long as
# the synthetic ones: a ``closed`` message with the items of a slate of each size, one item otherwise.
def _slate(size: int) -> Impression:
    items = [{"item_id": f"i{k:05d}", "position": k + 1, "propensity": 0.125} for k in range(size)]
    return to_event(impression("u000123", "0" * 32, "synthetic-v1", "epsilon_greedy", items, ts=1.7e9,
                               event_id="0" * 32))


_ONE_SLATE = _slate(1)
_ONE_ITEM = click_example(_ONE_SLATE, _ONE_SLATE.items, CLICKED, ts=1.7e9, event_id="0" * 32, max_weight=50.0)
_CLOSED: dict[int, Example] = {}


def _closed(size: int) -> Example:
    if size not in _CLOSED:
        slate = _slate(size)
        _CLOSED[size] = click_example(slate, slate.items, CLOSED, ts=1.7e9, event_id="0" * 32, max_weight=50.0)
    return _CLOSED[size]


async def _fanout_consume(bootstrap: str, topic: str, out_topic: str, n: int,
                          broker_pid: int | None) -> tuple[float, float | None]:
    consumer = await _started_consumer(bootstrap, topic, "fanout")
    sender = BatchSender(bootstrap)
    span = _Span(broker_pid)
    try:
        seen = 0
        acknowledged = None
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if batches:
                span.start()
            messages = []
            for records in batches.values():
                for record in records:
                    event = orjson.loads(record.value)  # an outcome per event: its slate closes, or it is one
                    example = _closed(len(event["items"])) if event["type"] == "impression" else _ONE_ITEM
                    messages.append((out_topic, record.key, example))
                seen += len(records)
            sent = asyncio.ensure_future(await sender.enqueue(messages))
            if acknowledged is not None:
                await acknowledged  # as in the worker: the next batch is read while this one is acknowledged
            acknowledged = sent
        await acknowledged
        return span.end(n)
    finally:
        await consumer.stop()
        await sender.stop()


def fanout_consume(bootstrap: str, topic: str, out_topic: str, n: int,
                   broker_pid: int | None = None) -> tuple[float, float | None]:
    """Events per second of a consumer that decodes every event and sends its examples' worth of
    fixed messages to ``out_topic`` (the pipeline's Kafka traffic without its logic), and the
    broker's CPU seconds per event meanwhile."""
    return asyncio.run(_fanout_consume(bootstrap, topic, out_topic, n, broker_pid))


def _after_last_flush(port: int, settle_s: float = 8.0) -> Samples:
    """The worker's metrics once its flush count has not moved for longer than a flush interval
    (5 s by default): the rows it accepted are all in the log then."""
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    deadline = time.monotonic() + 60.0
    last, since = total(samples, "streamrec_log_commit_seconds_count"), time.monotonic()
    while time.monotonic() - since < settle_s and time.monotonic() < deadline:
        time.sleep(0.5)
        samples = scrape(f"http://127.0.0.1:{port}/metrics") or samples
        count = total(samples, "streamrec_log_commit_seconds_count")
        if count != last:
            last, since = count, time.monotonic()
    return samples


def _events_seen(port: int) -> float:
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    return total(samples, "streamrec_events_total") + total(samples, "streamrec_duplicates_total")


def histogram_quantile(samples: Samples, name: str, q: float) -> float | None:
    """The q-quantile of a Prometheus histogram, interpolated linearly inside its bucket (as
    PromQL's ``histogram_quantile``); None when it has no observation."""
    buckets = sorted((float(dict(labels)["le"]), value) for (sample, labels), value in samples.items()
                     if sample == f"{name}_bucket")
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return lower_bound


def pipeline_consume(bootstrap: str, prefix: str, n: int, workdir: Path, anomaly: bool, timeout_s: float,
                     broker_pid: int | None = None) -> tuple[float, float, float | None, float, Samples]:
    """Run ``streamrec worker`` over the topic; return (events per second, events per CPU second
    of the worker, the broker's CPU seconds per event meanwhile (None without ``broker_pid``), the
    worker's peak RSS in MB, its metrics once its last flush is committed)."""
    port = free_port()
    proc = spawn(workdir, "worker", "worker", "--bootstrap-servers", bootstrap, "--topic-prefix", prefix,
                 "--log-dir", str(workdir / "log"), "--web-port", str(port), *(() if anomaly else ("--no-anomaly",)))
    try:
        span, first_n = _Span(broker_pid), None
        deadline = time.monotonic() + timeout_s
        bar = tqdm(total=n, desc="pipeline", unit="ev", file=sys.stderr, mininterval=1.0)
        done = 0.0
        while done < n:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "worker.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the worker stopped or stalled; its log ends:\n{tail}")
            done = _events_seen(port)
            bar.update(done - bar.n)
            if done > 0 and first_n is None:
                span.start()
                first_n, first_cpu = done, process_cpu_seconds(proc.pid)
            time.sleep(0.05)
        bar.close()
        rate, broker = span.end(n - first_n)
        per_core = (n - first_n) / max(process_cpu_seconds(proc.pid) - first_cpu, 1e-9)
        samples = _after_last_flush(port)
        peak_kb = 0
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak_kb = int(line.split()[1])
        return rate, per_core, broker, peak_kb / 1024, samples
    finally:
        stop(proc)


def process_cpu_seconds(pid: int | None) -> float:
    """User plus system CPU seconds of a process so far, all its threads (/proc/<pid>/stat); 0
    without a pid."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events to produce (default 200000)")
    parser.add_argument("--quick", action="store_true", help="30,000 events: ends within a minute or two")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the events topic (default 4)")
    parser.add_argument("--anomaly", action="store_true", help="include the anomaly agent in the pipeline")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic events (default 0)")
    parser.add_argument("--timeout", type=float, default=1200, help="give up on the pipeline after this many seconds")
    args = parser.parse_args(argv)
    n = 30_000 if args.quick else args.events
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    with tempfile.TemporaryDirectory() as tmp, broker_for_run(Path(tmp) / "kafka", args.partitions) as bootstrap:
        broker = kafka_status(Path(tmp) / "kafka")  # None when KAFKA_BOOTSTRAP_SERVERS names another
        broker_pid = None if broker is None else broker.pid
        topics = Topics(prefix)
        ensure_topics(bootstrap, args.partitions, topics)
        produce_rate = produce(bootstrap, topics.events, n, args.seed)
        raw, raw_broker = raw_consume(bootstrap, topics.events, n, broker_pid=broker_pid)
        raw_stdlib, _ = raw_consume(bootstrap, topics.events, n, json.loads)
        fanout_topics = Topics(prefix + "fanout.")  # its own examples topic, configured like the worker's
        ensure_topics(bootstrap, args.partitions, fanout_topics)
        fanout, fanout_broker = fanout_consume(bootstrap, topics.events, fanout_topics.examples, n, broker_pid)
        with StolenCpu() as stolen:
            pipeline, per_core, pipeline_broker, peak_rss, samples = pipeline_consume(
                bootstrap, prefix, n, Path(tmp), args.anomaly, args.timeout, broker_pid)
        messages = sum(end_offsets(bootstrap, topics.examples).values())
        log = DeltaLog(Path(tmp) / "log")
        files = log.data_files(EVENTS) + log.data_files(EXAMPLES)
    result = {
        "events": n,
        "pipeline_events_per_s": round(pipeline, 1),
        "raw_events_per_s": round(raw, 1),
        "raw_stdlib_json_events_per_s": round(raw_stdlib, 1),
        "ratio": round(pipeline / raw, 3),
        "pipeline_events_per_s_per_core": round(per_core, 1),
        "broker_cpu_us_per_event": {name: None if value is None else round(value * 1e6, 1) for name, value in
                                    (("raw", raw_broker), ("fanout", fanout_broker), ("pipeline", pipeline_broker))},
        "examples_messages_per_event": round(messages / n, 3),
        "fanout_events_per_s": round(fanout, 1),
        "fanout_ratio": round(fanout / raw, 3),
        "peak_rss_mb": round(peak_rss, 1),
        "log_files": files,
        "log_commits": int(total(samples, "streamrec_log_commit_seconds_count")),
        "log_commit_ms_p50": _ms(histogram_quantile(samples, "streamrec_log_commit_seconds", 0.5)),
        "log_commit_ms_p99": _ms(histogram_quantile(samples, "streamrec_log_commit_seconds", 0.99)),
        "produce_events_per_s": round(produce_rate, 1),
        "partitions": args.partitions,
        "anomaly_agent": args.anomaly,
        "cpu_stolen_share": stolen.share,
    }
    emit("ingest", result)
    return result


if __name__ == "__main__":
    main()
