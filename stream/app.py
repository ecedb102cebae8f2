"""The Faust app of the stream worker: ingest agent, idle timer and the /metrics page.

The agent reads ``events`` in batches (``take_events``: up to ``batch_size`` events or
``batch_timeout_s`` seconds), hands each batch to ``IngestPipeline`` and then, in this order:
sends the dead letters, examples and anomalies and waits until Kafka has them, writes the batch's
rows to the Parquet log, and only then lets Faust acknowledge the batch's offsets. A crash at any
point therefore replays the batch; the dedupe window, seeded from the log at start-up, keeps a
replayed event from being logged twice. Sends are at least once; the log is exactly once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream import metrics
from stream.config import StreamSettings, Topics, state_dir
from stream.eventlog import EVENTS, EXAMPLES, ParquetLog
from stream.pipeline import AnomalyDetector, BatchResult, IngestPipeline, Record

log = logging.getLogger(__name__)


_encode_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _json_bytes(obj: dict) -> bytes:
    return _encode_json(obj).encode("utf-8")


@dataclass
class Worker:
    """The pieces of one worker process: settings, pipeline, log and the Faust app that drives them."""

    settings: StreamSettings
    pipeline: IngestPipeline
    log: ParquetLog
    topics: Topics
    app: faust.App = field(init=False)

    async def handle(self, records: list[Record]) -> BatchResult:
        """Process one batch and make it durable (sends delivered, rows on disk)."""
        started = time.perf_counter()
        result = self.pipeline.process(records)
        await self.publish(result)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        return result

    async def publish(self, result: BatchResult) -> None:
        producer = self.app.producer
        topics = self.topics
        pending: list[Awaitable] = []
        for key, message in result.dlq:
            pending.append(await producer.send(topics.dlq, key, _json_bytes(message), None, None, None))
        for example in result.examples:
            pending.append(await producer.send(
                topics.examples, example["user_id"].encode(), _json_bytes(example), None, None, None))
        for anomaly in result.anomalies:
            pending.append(await producer.send(
                topics.anomalies, str(anomaly["entity"]).encode(), _json_bytes(anomaly), None, None, None))
        if pending:
            await asyncio.gather(*pending)
        if result.examples or result.log_rows:
            tag = str(time.time_ns())
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.log.write, EXAMPLES, result.examples, tag)
            await loop.run_in_executor(None, self.log.write, EVENTS, result.log_rows, tag)


def create_worker(
    settings: StreamSettings | None = None,
    detector: AnomalyDetector | None = None,
    app_id: str = "streamrec-worker",
) -> Worker:
    """Build the worker: restore state from the log, then wire the Faust app around the pipeline."""
    settings = settings or StreamSettings()
    if not settings.bootstrap_servers:
        raise ValueError("no Kafka cluster: set KAFKA_BOOTSTRAP_SERVERS or pass --bootstrap-servers")
    topics = Topics(settings.topic_prefix)
    pipeline = IngestPipeline(
        dedupe_window_s=settings.dedupe_window_s,
        attribution_window_s=settings.attribution_window_s,
        detector=detector,
        idle_grace_s=settings.idle_grace_s,
    )
    event_log = ParquetLog(settings.log_dir)
    restored = pipeline.restore(event_log)
    log.info("restored from %s: %d recent event ids, %d open slates",
             settings.log_dir, restored["events"], restored["open_slates"])
    worker = Worker(settings, pipeline, event_log, topics)
    datadir = state_dir() / "faust" / (settings.topic_prefix + app_id)
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.topic_prefix + app_id,
        broker=f"kafka://{settings.bootstrap_servers}",
        store="memory://",
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=max(4096, 2 * settings.batch_size),
        broker_commit_every=settings.batch_size,
        broker_commit_interval=1.0,
        producer_linger_ms=5,
        producer_acks=-1,
        web_enabled=settings.web_port > 0,
        web_bind=settings.web_host,
        web_port=max(settings.web_port, 1),
        web_in_thread=False,
    )
    worker.app = app
    events_topic = app.topic(topics.events, key_type=bytes, value_type=bytes,
                             key_serializer="raw", value_serializer="raw")

    @app.agent(events_topic, name="ingest")
    async def ingest(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_timeout_s):
            records = [
                Record(e.message.value, e.message.partition, e.message.offset, e.message.key, e.message.topic)
                for e in batch
            ]
            task = asyncio.ensure_future(worker.handle(records))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                # take_events acks the batch when we leave; finish making it durable first.
                await task
                raise

    @app.timer(interval=1.0)
    async def close_idle_slates() -> None:
        result = pipeline.tick()
        if result.examples:
            await worker.publish(result)

    @app.page("/metrics")
    async def metrics_page(web, request):  # noqa: ANN001 (Faust view signature)
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    return worker


def run_worker(settings: StreamSettings, detector: AnomalyDetector | None = None, loglevel: str = "info") -> None:
    """Run the worker in the foreground until SIGINT/SIGTERM (``streamrec worker``)."""
    from faust.worker import Worker as FaustWorker

    from stream.topics import ensure_topics

    ensure_topics(settings.bootstrap_servers, settings.partitions, Topics(settings.topic_prefix))
    Path(settings.log_dir).mkdir(parents=True, exist_ok=True)
    worker = create_worker(settings, detector)
    FaustWorker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
