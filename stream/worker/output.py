"""Sends the worker's output (examples, dead letters, anomalies) to Kafka as whole record batches.

One ingest batch fans out into many small messages (every shown item of a slate becomes an
example). Handing them to a producer one ``send`` at a time costs more than the rest of the
pipeline; here they are appended to one aiokafka ``BatchBuilder`` per topic partition and each
builder is sent as a unit. Partitions follow Kafka's default partitioner (murmur2 of the key), so
a user's examples stay in one partition, in order, as they would with a plain ``send``.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Iterable, Sequence

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

Message = tuple[str, bytes | None, object]  # topic, key, value msgspec writes as JSON (a dict, a Struct)


_JSON = msgspec.json.Encoder()


class BatchSender:
    """Sends lists of messages and returns once Kafka has acknowledged all of them (``acks=all``)."""

    def __init__(self, bootstrap_servers: str, max_batch_bytes: int = 1 << 20) -> None:
        self._config = dict(bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=True,
                            max_batch_size=max_batch_bytes, linger_ms=0)
        self._producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, int] = {}
        self._key_partition: dict[tuple[str, bytes], int] = {}

    async def start(self) -> None:
        """Connect (aiokafka needs the running event loop, so this happens on first use)."""
        if self._producer is None:
            producer = AIOKafkaProducer(**self._config)
            await producer.start()
            self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def reset(self, timeout_s: float = 5.0) -> None:
        """Drop the producer after a failed send; the next ``enqueue`` starts a new one.

        An idempotent producer whose batches were lost with a broker's restart keeps numbering
        after them, and the broker refuses its next batch for good (OutOfOrderSequenceNumber,
        seen after a 60 s outage). A new producer gets a new producer id and starts afresh."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), timeout_s)
            except Exception:  # noqa: BLE001 (it failed already; only its replacement matters)
                pass

    async def _partition_counts(self, topics: Iterable[str]) -> None:
        for topic in topics:
            if topic not in self._partitions:
                self._partitions[topic] = len(await self._producer.partitions_for(topic))

    def _partition(self, topic: str, key: bytes | None) -> int:
        if key is None:
            return 0
        cache_key = (topic, key)
        partition = self._key_partition.get(cache_key)
        if partition is None:
            if len(self._key_partition) > 1_000_000:
                self._key_partition.clear()
            partition = (murmur2(key) & 0x7FFFFFFF) % self._partitions[topic]
            self._key_partition[cache_key] = partition
        return partition

    async def enqueue(self, messages: Sequence[Message]) -> Awaitable[list]:
        """Hand every message to the producer; the returned awaitable finishes when Kafka has
        acknowledged all of them.

        The caller can do other work between the two steps: the worker processes its next batch
        while the broker acknowledges this one.
        """
        await self.start()
        await self._partition_counts({topic for topic, _, _ in messages})
        builders: dict[tuple[str, int], object] = {}
        pending = []
        producer, partition_of, dumps = self._producer, self._partition, _JSON.encode
        for topic, key, value in messages:
            partition = partition_of(topic, key)
            slot = (topic, partition)
            builder = builders.get(slot)
            if builder is None:
                builder = builders[slot] = producer.create_batch()
            payload = dumps(value)  # compact UTF-8; values come from validated events, all finite
            if builder.append(key=key, value=payload, timestamp=None) is None:
                pending.append(await producer.send_batch(builder, topic, partition=partition))
                builder = builders[slot] = producer.create_batch()
                if builder.append(key=key, value=payload, timestamp=None) is None:
                    raise ValueError(f"a message of {len(payload)} bytes does not fit in a batch")
        for (topic, partition), builder in builders.items():
            if builder.record_count():
                pending.append(await producer.send_batch(builder, topic, partition=partition))
        return asyncio.gather(*pending)
