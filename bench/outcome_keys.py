"""Benchmark of training each outcome once: outcome keys in the learner against Kafka transactions.

A worker killed between sending a batch's examples and committing its offsets re-sends them when
it restarts. Two ways to keep the learner from training them twice (docs/learner.md, "Outcomes
trained once"), each measured against its peer in the same run:

1. keys in the learner: ``Learner.learn`` on a stream of click outcome messages (the examples
   contract's framing, one message per outcome: per ten-item slate a ``closed`` message of its
   unclicked items and, for 10% of them, a ``clicked`` one) with its outcome window
   (``learner.outcomes``: one key per message, ``stream.examples.outcome_key(kind, stage,
   event_id)``) against the same learner with the check taken out, batch for batch on the same
   stream, alternating which goes first. A batch is ``learner_batch`` messages (the learner's
   default poll, ``LEARNER_BATCH_SIZE``), decoded from JSON as the learner decodes them
   (``decode_examples``) before the clock starts; ``learner_time_ratio`` is keyed / plain per
   batch. Because two learners' times on a shared machine are noisy, also
   ``key_share_of_learn``: inside the keyed learner, the time of the check (keying each message
   from its header, asking the window, dropping the rows of re-sent ones) over the time of the
   whole ``learn`` call. Also the window's memory per remembered key (tracemalloc, numpy's
   allocations included), one key per message in batches of 1,024.
2. transactions on the worker's output: an aiokafka producer sending batches of outcome messages
   (each a ten-item slate's ``closed`` message, the commonest) in one transaction per batch, the
   batch's consumer offsets sent to the transaction as the worker would, against the same
   producer (idempotent, acks=all) that sends a batch and awaits its acknowledgements, as the
   worker does today; on the local broker (or ``KAFKA_BOOTSTRAP_SERVERS``), alternating batch for
   batch. ``txn_throughput_ratio_<n>`` is transactional / plain messages per second for batches
   of ``n`` messages.

Every ratio is the median over paired batches with a 95% bootstrap interval (``*_ci95``).
``messages`` and ``example_rows`` are the size of the learner's stream, in messages and in
labelled items.

    python -m bench.outcome_keys [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import tracemalloc
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from bench.common import StolenCpu, emit, median_ci
from learner.outcomes import OutcomeWindow
from learner.service import Learner
from learner.settings import LearnerSettings
from stream.events import SCHEMA_VERSION, Impression, Item
from stream.examples import (CLICK, CLICKED, CLOSED, Example, ExampleBatch, click_example, count_rows,
                             decode_examples, outcome_key)
from stream.tools.kafka_local import broker_for_run

NAME = "outcome_keys"


def click_stream(n_slates: int, seed: int = 0) -> list[Example]:
    """Ten-item slates over 5,000 users and 2,000 items, a click on 10% of them: per slate a
    ``clicked`` message of its clicked item, if any, and a ``closed`` message of the others;
    every outcome distinct."""
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    for n in range(n_slates):
        items = [Item(f"i{i}", position=p + 1, propensity=0.1) for p, i in enumerate(rng.choice(2000, 10, replace=False))]
        slate = Impression(schema_version=SCHEMA_VERSION, event_id=f"imp-{n}", user_id=f"u{rng.integers(5000)}",
                           ts=1.75e9 + n * 0.05, request_id=f"r{n}", model_version="m", policy="softmax", items=items)
        clicked = items[:1] if rng.random() < 0.1 else []
        if clicked:
            out.append(click_example(slate, clicked, CLICKED, slate.ts + 1.0, f"clk-{n}", 50.0))
        out.append(click_example(slate, items[len(clicked):], CLOSED, slate.ts, slate.event_id, 50.0))
    return out


class _PlainLearner(Learner):
    """The peer: the same learner with the outcome check taken out."""

    def _first_sent(self, batch: ExampleBatch) -> pa.Table:
        return batch.rows


class _TimedLearner(Learner):
    """The learner as it runs, with the time of its outcome check added up."""

    check_s = 0.0

    def _first_sent(self, batch: ExampleBatch) -> pa.Table:
        started = time.perf_counter()
        try:
            return super()._first_sent(batch)
        finally:
            self.check_s += time.perf_counter() - started


def learner_cost(n_slates: int, batch: int, root: Path) -> dict:
    messages = click_stream(n_slates)
    settings = dict(bootstrap_servers="unused:9092", n_factors=32, device="cpu", outcome_keys_max=10_000_000)
    keyed = _TimedLearner(LearnerSettings(checkpoint_dir=root / "a", store_dir=root / "sa", **settings))
    plain = _PlainLearner(LearnerSettings(checkpoint_dir=root / "b", store_dir=root / "sb", **settings))
    ratios, shares = [], []
    # as the learner receives them: JSON, decoded in columns (outside the timed calls, as in its loop)
    batches = [decode_examples([msgspec.json.encode(m) for m in messages[i:i + batch]])
               for i in range(0, len(messages), batch)]
    for k, part in enumerate(tqdm(batches, desc="learner batches", unit="batch")):
        order = (("keyed", keyed), ("plain", plain)) if k % 2 == 0 else (("plain", plain), ("keyed", keyed))
        seconds, trained = {}, {}
        check_before = keyed.check_s
        for name, learner in order:
            started = time.perf_counter()
            trained[name] = learner.learn(part)
            seconds[name] = time.perf_counter() - started
        assert trained["keyed"] == trained["plain"] == part.rows.num_rows, "every outcome of the stream is distinct"
        ratios.append(seconds["keyed"] / seconds["plain"])
        shares.append((keyed.check_s - check_before) / seconds["keyed"])
    assert len(keyed.outcomes) == len(messages), "one key per message"
    ratio, ratio_ci = median_ci(ratios)
    share, share_ci = median_ci(shares)
    return {"messages": len(messages), "example_rows": count_rows(messages), "learner_batch": batch,
            "learner_time_ratio": ratio, "learner_time_ratio_ci95": ratio_ci, "key_share_of_learn": share,
            "key_share_of_learn_ci95": share_ci}


def bytes_per_key(n_keys: int, batch: int = 1024) -> float:
    """Memory per key of a window of ``n_keys`` message keys, remembered ``batch`` a call (a micro-batch
    of messages); one message in ten a slate's ``clicked``, the others ``closed`` (as ``click_stream``)."""
    keys = [outcome_key(CLICK, CLICKED, f"clk-{n}") if n % 10 == 0 else outcome_key(CLICK, CLOSED, f"imp-{n}")
            for n in range(n_keys)]
    window = OutcomeWindow(retention_s=1e9, max_keys=n_keys)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(0, n_keys, batch):
        window.fresh(keys[i:i + batch], newest_ts=float(i))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / len(window)


async def _producer_rates(bootstrap: str, batch: int, n_batches: int, value: bytes) -> tuple[float, list[float]]:
    """Transactional / plain throughput, median over paired batches, and its 95% interval."""
    from aiokafka import AIOKafkaProducer, TopicPartition

    topic_plain, topic_txn, source = (f"bench-outcomes-{what}-{batch}-{time.time_ns()}" for what in ("plain", "txn", "src"))
    _create_topics(bootstrap, [topic_plain, topic_txn, source])
    plain = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    txn = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                           transactional_id=f"bench-outcomes-{batch}-{time.time_ns()}")
    await plain.start()
    await txn.start()
    seconds: dict[str, list[float]] = {"plain": [], "txn": []}

    async def send_plain(k: int) -> None:
        futures = [await plain.send(topic_plain, value, key=str(i).encode()) for i in range(batch)]
        await asyncio.gather(*futures)

    async def send_txn(k: int) -> None:
        async with txn.transaction():
            for i in range(batch):
                await txn.send(topic_txn, value, key=str(i).encode())
            await txn.send_offsets_to_transaction({TopicPartition(source, 0): (k + 1) * batch}, "bench-outcomes")

    try:
        await send_plain(-1)  # creates the topics and warms both producers up
        await send_txn(-1)
        for k in tqdm(range(n_batches), desc=f"producer batches of {batch}", unit="batch"):
            pair = (("plain", send_plain), ("txn", send_txn))
            for name, send in (pair if k % 2 == 0 else pair[::-1]):
                started = time.perf_counter()
                await send(k)
                seconds[name].append(time.perf_counter() - started)
    finally:
        await plain.stop()
        await txn.stop()
    return median_ci([plain_s / txn_s for plain_s, txn_s in zip(seconds["plain"], seconds["txn"])])


def _create_topics(bootstrap: str, names: list[str]) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-outcome-keys")
    try:
        admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1) for name in names])
    finally:
        admin.close()


def transaction_cost(bootstrap: str, batches: dict[int, int]) -> dict:
    # one outcome message as the worker sends it: a ten-item slate's ``closed`` (the commonest, 9 in 10)
    value = msgspec.json.encode(next(m for m in click_stream(10) if m.stage == CLOSED and len(m.items) == 10))
    out = {}
    for batch, n_batches in batches.items():
        ratio, ci = asyncio.run(_producer_rates(bootstrap, batch, n_batches, value))
        out[f"txn_throughput_ratio_{batch}"], out[f"txn_throughput_ratio_{batch}_ci95"] = ratio, ci
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.outcome_keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run (about a minute)")
    args = parser.parse_args(argv)
    slates, keys = (20_000, 200_000) if args.quick else (150_000, 1_000_000)  # about 21 and 160 batches
    producer_batches = {500: 10, 5000: 6} if args.quick else {500: 60, 5000: 30}
    result: dict = {"quick": args.quick}
    with StolenCpu() as stolen:
        with tempfile.TemporaryDirectory() as tmp:
            result.update(learner_cost(slates, 1024, Path(tmp)))
        result["window_bytes_per_key"] = round(bytes_per_key(keys), 1)
        result["window_keys_measured"] = keys
        with broker_for_run(partitions=2) as bootstrap:
            result.update(transaction_cost(bootstrap, producer_batches))
    result["cpu_stolen_share"] = stolen.share
    emit(NAME, result)
    return result


if __name__ == "__main__":
    main()
