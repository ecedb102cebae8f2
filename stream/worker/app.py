"""The Faust app of the stream worker: the ingest service, the idle timer and the /metrics page.

The ingest service reads ``events`` in batches (up to ``batch_size`` events or ``batch_timeout_s``
seconds) and hands each batch to ``IngestPipeline``. Then, in this order: the batch's dead
letters, examples and anomalies are sent and acknowledged by Kafka; its rows join the log buffer
(``stream.log.buffer``); when the buffer is due (``log_flush_rows`` rows or
``log_flush_interval_s`` seconds) its rows are written to the Parquet log and made visible; and
only then are the offsets of the batches it holds committed. A crash at any point therefore
replays those batches; the dedupe window, seeded from the log at start-up, keeps a replayed event
from being logged twice. Sends are at least once; the log is exactly once.

The anomaly detector's windows are rebuilt from the log at start-up too; its learned state
(forests, thresholds, flags) is checkpointed in ``<log_dir>/_detector/`` after a flush, at most
once per ``detector_checkpoint_interval_s``, and at a clean stop (see ``stream.anomaly``).

The steps overlap where that is safe: the next batch is processed while Kafka acknowledges the
last one's output, and a flush encodes its files in a thread while batches go on. One flush is in
flight at a time, so offsets are committed in order.

Restarts are quick: Faust here only serves /metrics and runs the idle timer, so its own Kafka
consumer (and with it its consumer group and its "Recovery" phase, which waited out the killed
process's 60 s session before a restarted worker consumed anything) is not started; and with a
worker id (``STREAMREC_WORKER_ID``) the ingest consumer is a static group member (KIP-345), which a
restarted process with the same id replaces at once, keeping its partitions. Measurements:
docs/worker.md.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import faust
from faust.app import BootStrategy
import pyarrow as pa
from aiokafka import AIOKafkaConsumer
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream.worker import metrics
from stream.config import StreamSettings, state_dir
from stream.topics import Topics
from stream.log.table import EVENTS, EVENTS_SCHEMA, EXAMPLES, ParquetLog
from stream.log.buffer import LogBuffer, Pending
from stream.worker.output import BatchSender
from stream.worker.pipeline import AnomalyDetector, BatchResult, IngestPipeline, Record

log = logging.getLogger(__name__)

DETECTOR_CHECKPOINT = "_detector"  # the detector's checkpoint folder, under the log root
DRAIN_TIMEOUT_S = 30.0  # how long a clean stop waits for the ingest loop to write what it accepted


@dataclass
class Worker:
    """The pieces of one worker process: settings, pipeline, log and the Faust app that drives them."""

    settings: StreamSettings
    pipeline: IngestPipeline
    log: ParquetLog
    topics: Topics
    sender: BatchSender
    group_id: str
    buffer: LogBuffer
    app: faust.App = field(init=False)
    _checkpointed: float = field(default_factory=time.monotonic, init=False)  # of the last one (or the start)

    async def send(self, result: BatchResult) -> Awaitable[list]:
        """Hand a batch's dead letters, examples and anomalies to the producer; the returned
        awaitable finishes when Kafka has acknowledged all of them."""
        topics = self.topics
        messages = [(topics.dlq, key, message) for key, message in result.dlq]
        messages += [(topics.examples, e["user_id"].encode(), e) for e in result.examples]
        messages += [(topics.anomalies, str(a["entity"]).encode(), a) for a in result.anomalies]
        return await self.sender.enqueue(messages)

    async def publish(self, result: BatchResult) -> None:
        """Send a result that covers no offsets (the idle timer's) and buffer its log rows."""
        await (await self.send(result))
        self.buffer.add(result.examples, result.log_table, {})

    async def flush(self, pending: Pending, commit: Callable[[dict], Awaitable[None]], final: bool = False) -> None:
        """Write buffered rows (encoded in a thread, made visible by renames), commit offsets, then
        checkpoint the detector when one is due (always when ``final``)."""
        if pending.rows:
            staged = await asyncio.get_running_loop().run_in_executor(None, self._stage, pending)
            self.log.commit(staged)
        if pending.offsets:
            await commit(pending.offsets)
        await self.checkpoint_detector(force=final)

    @property
    def detector_dir(self) -> Path:
        """Where the detector's checkpoint lives: next to the log it is restored with."""
        return self.log.root / DETECTOR_CHECKPOINT

    async def checkpoint_detector(self, force: bool = False) -> None:
        """Save the detector's learned state if ``detector_checkpoint_interval_s`` has passed.

        The copy is taken here, on the event loop between two batches, so it is consistent; the
        files are written in a thread. A failed write is logged: the previous checkpoint stays.
        """
        detector = self.pipeline.detector
        now = time.monotonic()
        if detector is None or (not force and now - self._checkpointed < self.settings.detector_checkpoint_interval_s):
            return
        self._checkpointed = now
        snapshot = detector.snapshot()
        try:
            await asyncio.get_running_loop().run_in_executor(None, snapshot.save, self.detector_dir)
        except OSError as err:
            log.warning("could not write the detector checkpoint to %s: %s", self.detector_dir, err)
            return
        log.debug("detector checkpoint written to %s", self.detector_dir)

    def _stage(self, pending: Pending) -> list:
        tag = str(time.time_ns())
        events = pa.concat_tables(pending.events) if pending.events else EVENTS_SCHEMA.empty_table()
        return self.log.stage(EXAMPLES, pending.examples, tag) + self.log.stage(EVENTS, events, tag)


class IngestService(Service):
    """Consumes ``events`` in batches and commits a batch's offsets only once it is durable.

    The worker runs it inside the Faust app. It reads with aiokafka's ``getmany`` instead of a Faust
    agent: Faust's per-message stream machinery tops out at about 3,000 messages per second on
    this 2-core machine even when the agent does nothing, some 20 times below a raw consumer,
    while batch reads keep the pipeline's own work the cost that counts. Offsets are committed by
    hand after the batch's sends are acknowledged and its rows are on disk, so neither a crash nor
    an error can commit an event that is not in the log.

    A clean stop (SIGTERM) drains: ``on_stop`` runs before mode cancels the service's tasks, so it
    waits (at most ``DRAIN_TIMEOUT_S``) for the loop to see ``should_stop``, write and commit what
    it accepted and checkpoint the detector, and only then closes the consumer and the producer.
    """

    worker: "Worker"

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 (mode.Service's keyword arguments)
        super().__init__(**kwargs)
        self._consumer: AIOKafkaConsumer | None = None
        self._consuming = False
        self._drained = asyncio.Event()

    async def on_start(self) -> None:
        w = self.worker
        self._consumer = AIOKafkaConsumer(
            w.topics.events,
            bootstrap_servers=w.settings.bootstrap_servers,
            group_id=w.group_id,
            # Static membership when the worker has an id: a restart rejoins as the same member
            # instead of waiting for the killed one's session (10 s) to time out.
            group_instance_id=w.settings.worker_id or None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
        )
        await self._consumer.start()
        log.info("consuming %s as group %s, %s", w.topics.events, w.group_id,
                 f"static member {w.settings.worker_id}" if w.settings.worker_id else "dynamic member")

    async def on_stop(self) -> None:
        if self._consuming:
            try:
                await asyncio.wait_for(self._drained.wait(), DRAIN_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("the ingest loop did not finish within %.0f s of the stop; "
                            "its unwritten batches will be replayed", DRAIN_TIMEOUT_S)
        if self._consumer is not None:
            await self._consumer.stop()
        await self.worker.sender.stop()

    @Service.task
    async def _consume(self) -> None:
        """Fetch, process, send, buffer, flush. Batch N+1 is processed while Kafka acknowledges
        batch N's output; N's rows enter the log buffer only once acknowledged; a flush writes
        the buffer in a thread while batches go on, and commits offsets when its files are
        visible. One flush at a time, so offsets are committed in order."""
        self._consuming = True
        try:
            await self._consume_until_stopped()
        finally:
            self._drained.set()

    async def _consume_until_stopped(self) -> None:
        consumer, worker = self._consumer, self.worker
        timeout_ms = int(worker.settings.batch_timeout_s * 1000)
        in_flight: tuple[asyncio.Future, BatchResult, dict, float] | None = None
        flushing: asyncio.Future | None = None
        while not self.should_stop:
            if flushing is not None and flushing.done():
                flushing.result()  # a failed flush stops the worker; its batches are replayed
                flushing = None
            fetched = await consumer.getmany(timeout_ms=timeout_ms, max_records=worker.settings.batch_size)
            if fetched:
                started = time.perf_counter()
                records = [Record(m.value, m.partition, m.offset, m.key, m.topic)
                           for messages in fetched.values() for m in messages]
                result = worker.pipeline.process(records)
                acknowledged = asyncio.ensure_future(await worker.send(result))
                if in_flight is not None:
                    await self._settle(*in_flight)
                in_flight = (acknowledged, result, {tp: m[-1].offset + 1 for tp, m in fetched.items()}, started)
            elif in_flight is not None:
                await self._settle(*in_flight)
                in_flight = None
            if worker.buffer.due():
                if flushing is not None:
                    await flushing
                flushing = asyncio.ensure_future(worker.flush(worker.buffer.take(), consumer.commit))
        # A clean stop writes what was accepted; a crash or a cancellation replays it instead.
        if in_flight is not None:
            await self._settle(*in_flight)
        if flushing is not None:
            await flushing
        await worker.flush(worker.buffer.take(), consumer.commit, final=True)

    async def _settle(self, acknowledged: asyncio.Future, result: BatchResult, offsets: dict, started: float) -> None:
        await acknowledged
        self.worker.buffer.add(result.examples, result.log_table, offsets)
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
    if "$" in settings.worker_id:  # an unset variable would give every replica the same id
        raise ValueError(f"the worker id {settings.worker_id!r} names an unset environment variable")
    topics = Topics(settings.topic_prefix)
    pipeline = IngestPipeline(
        dedupe_window_s=settings.dedupe_window_s,
        attribution_window_s=settings.attribution_window_s,
        detector=detector,
        idle_grace_s=settings.idle_grace_s,
        max_future_s=settings.max_future_s,
    )
    event_log = ParquetLog(settings.log_dir)
    stale = event_log.remove_temporary()
    if stale:
        log.info("removed %d log files staged but never committed (their events will be replayed)", stale)
    restored = pipeline.restore(event_log)
    log.info("restored from %s: %d recent event ids, %d open slates",
             settings.log_dir, restored["events"], restored["open_slates"])
    worker = Worker(settings, pipeline, event_log, topics, BatchSender(settings.bootstrap_servers),
                    group_id=settings.topic_prefix + "streamrec-ingest",
                    buffer=LogBuffer(settings.log_flush_rows, settings.log_flush_interval_s))
    if detector is not None:
        # After pipeline.restore: the checkpoint's scoring times and flags apply to the entities
        # whose windows came back from the log.
        if detector.load_checkpoint(worker.detector_dir):
            log.info("restored anomaly detector: %s", detector.describe())
        else:
            log.info("anomaly detector with cold models: %s", detector.describe())
    datadir = state_dir() / "faust" / (settings.topic_prefix + app_id)
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.topic_prefix + app_id,
        datadir=str(datadir),
        web_enabled=settings.web_port > 0,
        web_bind=settings.web_host,
        web_port=max(settings.web_port, 1),
        web_in_thread=False,
    )
    # The app consumes and produces nothing through Faust (the ingest service has its own
    # consumer and producer): without Faust's consumer there is no Faust consumer group whose
    # rebalance ("Recovery") holds back the services and timers at every start.
    app.boot_strategy = BootStrategy(app, enable_kafka=False)
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
    # The ingest allocates about a million short-lived objects per batch (dictionaries of events
    # and examples), freed by reference counting, while the dedupe window, the open slates and
    # the log buffer hold millions of long-lived ones. With the default thresholds (700, 10, 10)
    # the cyclic collector walks that long-lived heap over and over: measured with bench.ingest,
    # freezing the start-up heap and collecting the youngest generation every 100,000 allocations
    # instead raised the worker's throughput from about 2,700 to 7,800 events/s.
    gc.freeze()
    gc.set_threshold(100_000, 20, 100)
    FaustWorker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
