"""Kafka clients side by side: confluent-kafka (librdkafka, C threads) against aiokafka (asyncio,
its record batches parsed in Cython), on one broker.

Issue 18 asks whether the worker should read and write Kafka through librdkafka instead of
aiokafka. This measures the two clients alone, on the same broker, topic and machine, in one run:

- ``consume``: events per second of fetching N events already in a 4-partition topic (synthetic
  events, encoded as the producer SDK does), from the earliest offset in a group of its own,
  touching every value and decoding none: aiokafka ``getmany(max_records=10_000)`` (as
  ``bench.ingest``'s raw consumer) against confluent-kafka ``Consumer.consume(10_000, timeout=1)``
  with ``fetch.queue.backoff.ms=10`` (``confluent``) and with its default, 1000
  (``confluent_default_backoff``: see FETCH_BACKOFF_MS);
- ``produce``: messages per second of sending M ``examples`` messages (a ``closed`` outcome of a
  6-item slate, orjson-encoded, keyed by user id, ``acks=all``, idempotent) until Kafka has
  acknowledged all: the worker's own ``BatchSender`` (aiokafka record batches, 10,000 messages per
  ``enqueue``, the next enqueued while the last is acknowledged, as in the worker) against a
  confluent-kafka ``Producer`` (``linger.ms=5``, ``produce`` in a loop, then ``flush()``).

Each client runs ``--repeats`` times, alternating (a, b, a, b, ...), so that drift on this shared
machine falls on both. Reported: medians, and ``ratio`` = confluent / aiokafka as the median of the
paired ratios with a 95% bootstrap interval (``ratio_default_backoff`` the same for the consumer at
its default); ``*_cpu_us_per_message`` is the process's CPU time
(all threads, librdkafka's included) per message, which the other guests of the machine affect less
than wall time; ``*_first_ms`` the consumer's time from its assignment to its first message. Timing starts when the group assigns the partitions (consume: both clients fetch
ahead in the background, so the first message returned would be too late a start) or after one
warm-up message was acknowledged (produce), so connecting and joining are left out.

The ceiling this bounds: the pipeline processes about 15,000 events/s and aiokafka's raw consumer
decodes about 200,000 (bench.ingest). Measurements: docs/worker.md.

    python -m bench.kafka_clients            # 200,000 events, 100,000 messages, 7 repeats
    python -m bench.kafka_clients --quick    # 30,000 events and messages, 3 repeats (under a minute)

Needs the optional extra: ``pip install .[bench-clients]``.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from importlib.metadata import version
from typing import Callable

import msgspec
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

from bench.common import StolenCpu, emit, median_ci
from bench.ingest import produce as produce_events
from stream.events import impression, to_event
from stream.examples import CLOSED, click_example
from stream.topics import Topics, end_offsets, ensure_topics
from stream.tools.kafka_local import broker_for_run
from stream.worker.output import BatchSender

try:
    import confluent_kafka
except ImportError:  # an optional extra: the product never imports it
    confluent_kafka = None

FETCH_BYTES = 4 * 1024 * 1024  # per partition and fetch, both clients (bench.ingest's aiokafka setting)
BATCH = 10_000                 # records per getmany / consume, messages per BatchSender.enqueue
# librdkafka stops fetching for fetch.queue.backoff.ms (1000 by default) once its prefetch queue
# is full (queued.max.messages.kbytes, 64 MiB): reading a larger backlog stalls about a second per
# fill, which a worker catching up meets and one keeping up at 15,000 events/s (more than 4 s of
# its events in 64 MiB) does not. The consumer is measured with 10 ms, and with the default.
FETCH_BACKOFF_MS = 10
DEFAULT_BACKOFF = 1000


def _group(name: str) -> str:
    return f"bench-clients-{name}-{uuid.uuid4().hex[:8]}"


# --- consume ---------------------------------------------------------------------------------

class _Clock:
    """Wall and CPU clocks read when the group gives the consumer its partitions: fetching starts
    then (both clients prefetch in the background, so the first message returned is too late)."""

    def __init__(self) -> None:
        self.wall = self.cpu = None

    def start(self, *_: object) -> None:
        if self.wall is None:
            self.wall, self.cpu = time.perf_counter(), time.process_time()


class _Assigned(ConsumerRebalanceListener):
    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    async def on_partitions_revoked(self, revoked: object) -> None:
        pass

    async def on_partitions_assigned(self, assigned: object) -> None:
        self.clock.start()


async def _aiokafka_consume(bootstrap: str, topic: str, n: int) -> tuple[float, float, float]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=_group("aiokafka"),
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=FETCH_BYTES)
    clock = _Clock()
    consumer.subscribe([topic], listener=_Assigned(clock))
    await consumer.start()
    try:
        seen = size = 0
        first = None
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=BATCH)
            if batches and first is None:
                first = time.perf_counter()
            for records in batches.values():
                for record in records:
                    size += len(record.value)
                seen += len(records)
        wall, cpu = time.perf_counter() - clock.wall, time.process_time() - clock.cpu
    finally:
        await consumer.stop()
    if seen != n:
        raise RuntimeError(f"aiokafka read {seen} events, the topic holds {n}")
    return n / wall, cpu / n, first - clock.wall


def aiokafka_consume(bootstrap: str, topic: str, n: int) -> tuple[float, float, float]:
    """(events per second, CPU seconds per event, seconds from assignment to the first event) of
    aiokafka reading the n events of ``topic``."""
    return asyncio.run(_aiokafka_consume(bootstrap, topic, n))


def confluent_consume(bootstrap: str, topic: str, n: int,
                      backoff_ms: int = FETCH_BACKOFF_MS) -> tuple[float, float, float]:
    """(events per second, CPU seconds per event, seconds from assignment to the first event) of
    confluent-kafka reading the n events of ``topic``."""
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": _group("confluent"), "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "max.partition.fetch.bytes": FETCH_BYTES, "fetch.queue.backoff.ms": backoff_ms,
    })
    clock = _Clock()
    consumer.subscribe([topic], on_assign=clock.start)  # the client assigns once the callback returns
    try:
        seen = size = 0
        first = None
        deadline = time.monotonic() + 120
        while seen < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"confluent-kafka read {seen} of {n} events in 120 s")
            messages = consumer.consume(num_messages=BATCH, timeout=1)
            if messages and first is None:
                first = time.perf_counter()
            for message in messages:
                if message.error() is not None:
                    if message.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"confluent-kafka: {message.error()}")
                size += len(message.value())
                seen += 1
        wall, cpu = time.perf_counter() - clock.wall, time.process_time() - clock.cpu
    finally:
        consumer.close()
    if seen != n:
        raise RuntimeError(f"confluent-kafka read {seen} events, the topic holds {n}")
    return n / wall, cpu / n, first - clock.wall


# --- produce ---------------------------------------------------------------------------------

def example_payload() -> dict:
    """The ``closed`` outcome of a 6-item slate, as the worker sends it to ``examples`` (811 bytes)."""
    items = [{"item_id": f"i{k:05d}", "position": k + 1, "propensity": 0.125} for k in range(6)]
    slate = impression("u000123", "0" * 32, "synthetic-v1", "epsilon_greedy", items, ts=1.7e9, event_id="0" * 32)
    parsed = to_event(slate)
    example = click_example(parsed, parsed.items, CLOSED, ts=1.7e9, event_id="0" * 32, max_weight=50.0)
    return msgspec.to_builtins(example)


def user_keys(m: int, n_users: int = 5000) -> list[bytes]:
    return [f"u{k % n_users:06d}".encode() for k in range(m)]


async def _batch_sender_produce(bootstrap: str, topic: str, keys: list[bytes], value: dict) -> tuple[float, float]:
    sender = BatchSender(bootstrap)
    try:
        await (await sender.enqueue([(topic, keys[0], value)]))  # connect, metadata, producer id
        started, cpu0 = time.perf_counter(), time.process_time()
        acknowledged = None
        for start in range(0, len(keys), BATCH):
            sent = asyncio.ensure_future(await sender.enqueue([(topic, key, value) for key in keys[start:start + BATCH]]))
            if acknowledged is not None:
                await acknowledged  # as in the worker: the next batch is built while this one is acknowledged
            acknowledged = sent
        await acknowledged
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    finally:
        await sender.stop()
    return len(keys) / wall, cpu / len(keys)


def batch_sender_produce(bootstrap: str, topic: str, keys: list[bytes], value: dict) -> tuple[float, float]:
    """(messages per second, CPU seconds per message) of the worker's BatchSender until all are acknowledged."""
    return asyncio.run(_batch_sender_produce(bootstrap, topic, keys, value))


def confluent_produce(bootstrap: str, topic: str, keys: list[bytes], value: dict) -> tuple[float, float]:
    """(messages per second, CPU seconds per message) of a confluent-kafka Producer until flush() returns.

    Delivery reports are asked for failures only (``delivery.report.only.error``): a flush that
    returns 0 with no report means every message was acknowledged, which is all the worker needs
    before it commits its offsets, and it spares a Python callback per message."""
    failures: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    producer = confluent_kafka.Producer({
        "bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
        "delivery.report.only.error": True, "on_delivery": on_delivery,
    })
    dumps, send, poll = orjson.dumps, producer.produce, producer.poll
    producer.produce(topic, value=dumps(value), key=keys[0])  # connect, metadata, producer id
    if producer.flush(30) != 0:
        raise RuntimeError("confluent-kafka: the warm-up message was not acknowledged in 30 s")
    started, cpu0 = time.perf_counter(), time.process_time()
    for key in keys:
        payload = dumps(value)  # the worker encodes every message, as BatchSender does
        try:
            send(topic, value=payload, key=key)
        except BufferError:  # the local queue is full: let librdkafka send some, then retry
            poll(0.05)
            send(topic, value=payload, key=key)
    left = producer.flush(60)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    if left or failures:
        raise RuntimeError(f"confluent-kafka: {left} messages unacknowledged, {len(failures)} failed "
                           f"({failures[:1]})")
    return len(keys) / wall, cpu / len(keys)


# --- the comparison --------------------------------------------------------------------------

def alternate(repeats: int, clients: dict[str, Callable[[], tuple[float, ...]]], label: str) -> dict:
    """Run the clients in turn (a, b, a, b, ...) ``repeats`` times each; summarise each one's rate,
    CPU per message (and time to the first message, when given), and each one's paired ratio to
    the first (aiokafka)."""
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in clients}
    for i in range(repeats):
        for name, client in clients.items():
            runs[name].append(client())
        print(f"{label} {i + 1}/{repeats}: " + ", ".join(f"{name} {r[-1][0]:,.0f}/s" for name, r in runs.items()),
              file=sys.stderr, flush=True)
    base, summary = next(iter(runs)), {}
    for name, rs in runs.items():
        rate, ci = median_ci([r[0] for r in rs])
        summary[f"{name}_per_s"], summary[f"{name}_per_s_ci"] = round(rate, 1), [round(x, 1) for x in ci]
        summary[f"{name}_cpu_us_per_message"] = round(float(np.median([r[1] for r in rs])) * 1e6, 2)
        if len(rs[0]) > 2:
            summary[f"{name}_first_ms"] = round(float(np.median([r[2] for r in rs])) * 1e3, 1)
        summary[f"{name}_runs"] = [round(r[0]) for r in rs]
        if name != base:
            ratio, ratio_ci = median_ci([r[0] / b[0] for r, b in zip(rs, runs[base])])
            suffix = name.removeprefix("confluent")  # "ratio" for confluent, "ratio_<variant>" for the others
            summary[f"ratio{suffix}"], summary[f"ratio{suffix}_ci"] = round(ratio, 3), [round(x, 3) for x in ratio_ci]
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_clients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events to consume (default 200000)")
    parser.add_argument("--messages", type=int, default=100_000, help="messages to produce (default 100000)")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each client and direction (default 7)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the topics (default 4)")
    parser.add_argument("--quick", action="store_true", help="30,000 events and messages, 3 repeats")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic events (default 0)")
    args = parser.parse_args(argv)
    if confluent_kafka is None:
        sys.exit("bench.kafka_clients needs confluent-kafka, an optional extra: pip install .[bench-clients]")
    n, m, repeats = (30_000, 30_000, 3) if args.quick else (args.events, args.messages, args.repeats)
    topics = Topics(f"bench{uuid.uuid4().hex[:8]}.")
    keys, value = user_keys(m), example_payload()
    with broker_for_run(partitions=args.partitions) as bootstrap:
        ensure_topics(bootstrap, args.partitions, topics)
        produce_events(bootstrap, topics.events, n, args.seed)
        held = sum(end_offsets(bootstrap, topics.events).values())
        if held != n:
            raise RuntimeError(f"the events topic holds {held} events, {n} were produced")
        with StolenCpu() as stolen:
            consume = alternate(repeats, {
                "aiokafka": lambda: aiokafka_consume(bootstrap, topics.events, n),
                "confluent": lambda: confluent_consume(bootstrap, topics.events, n),
                "confluent_default_backoff": lambda: confluent_consume(bootstrap, topics.events, n, DEFAULT_BACKOFF),
            }, "consume")
            produce = alternate(repeats, {
                "aiokafka": lambda: batch_sender_produce(bootstrap, topics.examples, keys, value),
                "confluent": lambda: confluent_produce(bootstrap, topics.examples, keys, value),
            }, "produce")
        written = sum(end_offsets(bootstrap, topics.examples).values())
        if written != 2 * repeats * (m + 1):
            raise RuntimeError(f"the examples topic holds {written} messages, {2 * repeats * (m + 1)} were sent")
    result = {
        "events": n,
        "messages": m,
        "repeats": repeats,
        "partitions": args.partitions,
        "message_bytes": len(orjson.dumps(value)),
        "consume": consume,
        "produce": produce,
        "aiokafka_version": version("aiokafka"),
        "confluent_kafka_version": version("confluent-kafka"),
        "librdkafka_version": confluent_kafka.libversion()[0],
        "cpu_stolen_share": stolen.share,
    }
    emit("kafka_clients", result)
    return result


if __name__ == "__main__":
    main()
