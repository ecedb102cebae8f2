"""The Faust app of the stream worker: the ingest service, the idle timer and the /metrics page.

The ingest service reads ``events`` in batches (up to ``batch_size`` events or ``batch_timeout_s``
seconds), hands each batch to ``IngestPipeline`` and then, in this order: sends the dead letters,
examples and anomalies and waits until Kafka has them, makes the batch's rows visible in the
Parquet log, and only then commits the batch's offsets. A crash at any point therefore replays
the batch; the dedupe window, seeded from the log at start-up, keeps a replayed event from being
logged twice. Sends are at least once; the log is exactly once.

The steps overlap where that is safe: the log files are encoded in a thread (under temporary
names) while Kafka acknowledges the sends, and the next batch is processed while the previous one
becomes durable. One batch is in flight at a time, so offsets are committed in order.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable
from pathlib import Path

import faust
from aiokafka import AIOKafkaConsumer
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream import metrics
from stream.config import StreamSettings, Topics, state_dir
from stream.eventlog import EVENTS, EXAMPLES, ParquetLog
from stream.output import BatchSender
from stream.pipeline import AnomalyDetector, BatchResult, IngestPipeline, Record

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """The pieces of one worker process: settings, pipeline, log and the Faust app that drives them."""

    settings: StreamSettings
    pipeline: IngestPipeline
    log: ParquetLog
    topics: Topics
    sender: BatchSender
    group_id: str
    app: faust.App = field(init=False)

    async def start_publish(self, result: BatchResult) -> Awaitable[None]:
        """Start making a batch durable; the returned awaitable finishes once it is.

        The batch's messages go to the producer and its Parquet files are encoded in a thread
        under temporary names, both at once; the files become visible (renamed) only after Kafka
        has acknowledged every message, so the log never holds an event whose output could still
        be lost (a replayed event found in the log is a duplicate and produces nothing again).
        """
        topics = self.topics
        messages = [(topics.dlq, key, message) for key, message in result.dlq]
        messages += [(topics.examples, e["user_id"].encode(), e) for e in result.examples]
        messages += [(topics.anomalies, str(a["entity"]).encode(), a) for a in result.anomalies]
        acknowledged = await self.sender.enqueue(messages) if messages else None
        staged = None
        if result.examples or result.log_table.num_rows:
            staged = asyncio.get_running_loop().run_in_executor(None, self._stage, result, str(time.time_ns()))
        return self._durable(acknowledged, staged)

    def _stage(self, result: BatchResult, tag: str) -> list:
        return self.log.stage(EXAMPLES, result.examples, tag) + self.log.stage(EVENTS, result.log_table, tag)

    async def _durable(self, acknowledged: Awaitable | None, staged: Awaitable | None) -> None:
        if acknowledged is not None:
            await acknowledged
        if staged is not None:
            self.log.commit(await staged)

    async def publish(self, result: BatchResult) -> None:
        """Make a batch durable and wait for it."""
        await (await self.start_publish(result))


class IngestService(Service):
    """Consumes ``events`` in batches and commits a batch's offsets only once it is durable.

    The worker runs it inside the Faust app. It reads with aiokafka's ``getmany`` instead of a Faust
    agent: Faust's per-message stream machinery tops out at about 3,000 messages per second on
    this 2-core machine even when the agent does nothing, some 20 times below a raw consumer,
    while batch reads keep the pipeline's own work the cost that counts. Offsets are committed by
    hand after the batch's sends are acknowledged and its rows are on disk, so neither a crash nor
    an error can commit an event that is not in the log.
    """

    worker: "Worker"

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 (mode.Service's keyword arguments)
        super().__init__(**kwargs)
        self._consumer: AIOKafkaConsumer | None = None

    async def on_start(self) -> None:
        w = self.worker
        self._consumer = AIOKafkaConsumer(
            w.topics.events,
            bootstrap_servers=w.settings.bootstrap_servers,
            group_id=w.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
        )
        await self._consumer.start()
        log.info("consuming %s as group %s", w.topics.events, w.group_id)

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        await self.worker.sender.stop()

    @Service.task
    async def _consume(self) -> None:
        """Fetch, process, publish; batch N+1 is processed while batch N becomes durable, and
        N's offsets are committed once it is (commits stay in order, one batch in flight)."""
        consumer, worker = self._consumer, self.worker
        timeout_ms = int(worker.settings.batch_timeout_s * 1000)
        in_flight: tuple[asyncio.Future, dict, float] | None = None
        while not self.should_stop:
            fetched = await consumer.getmany(timeout_ms=timeout_ms, max_records=worker.settings.batch_size)
            if not fetched:
                if in_flight is not None:
                    await self._finish(*in_flight)
                    in_flight = None
                continue
            started = time.perf_counter()
            records = [Record(m.value, m.partition, m.offset, m.key, m.topic)
                       for messages in fetched.values() for m in messages]
            durable = asyncio.ensure_future(await worker.start_publish(worker.pipeline.process(records)))
            if in_flight is not None:
                await self._finish(*in_flight)
            in_flight = (durable, {tp: messages[-1].offset + 1 for tp, messages in fetched.items()}, started)
        if in_flight is not None:  # a clean stop; a crash or cancellation replays the batch instead
            await self._finish(*in_flight)

    async def _finish(self, durable: asyncio.Future, offsets: dict, started: float) -> None:
        await durable
        await self._consumer.commit(offsets)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)


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
    stale = event_log.remove_temporary()
    if stale:
        log.info("removed %d log files staged but never committed (their events will be replayed)", stale)
    restored = pipeline.restore(event_log)
    log.info("restored from %s: %d recent event ids, %d open slates",
             settings.log_dir, restored["events"], restored["open_slates"])
    worker = Worker(settings, pipeline, event_log, topics, BatchSender(settings.bootstrap_servers),
                    group_id=settings.topic_prefix + "streamrec-ingest")
    datadir = state_dir() / "faust" / (settings.topic_prefix + app_id)
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.topic_prefix + app_id,
        broker=f"kafka://{settings.bootstrap_servers}",
        store="memory://",
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        web_enabled=settings.web_port > 0,
        web_bind=settings.web_host,
        web_port=max(settings.web_port, 1),
        web_in_thread=False,
    )
    worker.app = app
    @app.service
    class _Ingest(IngestService):
        pass

    _Ingest.worker = worker

    @app.timer(interval=1.0)
    async def close_idle_slates() -> None:
        result = pipeline.tick()
        if result.examples:
            # A failure here crashes the app; the slates reopen from the log at restart (their
            # negatives are not in it), so nothing is lost.
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
