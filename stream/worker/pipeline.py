"""The ingest logic of the stream worker, free of Faust and Kafka so that it can be tested directly.

One call of ``IngestPipeline.process`` takes a batch of raw Kafka records and decides, for each:
dead-letter it (with a reason), drop it as a duplicate, or accept it, log it and feed the join;
then it advances event time, scores traffic for anomalies and returns everything the worker must
send and write. The Faust agent (``stream.worker.app``) does the I/O around it.

State is kept per source partition (``PartitionState``: dedupe window, open slates, watermark; the
anomaly detector keeps its entity windows per partition too), so that a partition can move between
workers: ``assign`` rebuilds it from the log rows of that partition, ``revoke`` parks it until the
next assignment reuses or drops it, and a lagging partition's slates are closed by its own event
time, never by another partition's. The detector's learned models and flags are the worker's,
over all its partitions.

Events are the contract's msgspec Structs (``stream.events.decode`` parses each once) and a
batch's log rows are built in columns. Measurements of this hot path: docs/worker.md.
"""
from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec
import pandas as pd
import pyarrow as pa
from msgspec import UNSET

from stream.worker import metrics
from stream.worker.dedupe import DedupeWindow
from stream.log.table import EVENTS, EVENTS_SCHEMA, EXAMPLES, DeltaLog, events_table
from stream.events import (DEFAULT_MAX_FUTURE_S, EVENT_TYPE, SCHEMA_VERSION, Event, Impression, InvalidEvent, Item,
                           decode)
from stream.examples import (CLICK, CLICK_LABELS, CLOSED, EXAMPLE_ROWS_SCHEMA, FEEDBACK_PROTOCOLS, NEGATIVE, RATED,
                             RATING, WAIT, Example, batch_rows, example_rows, label_name, rating_example)
from stream.worker.join import MATCHED, ImpressionJoiner

if TYPE_CHECKING:
    from stream.anomaly import DetectorSnapshot


class AnomalyDetector(Protocol):
    """What the pipeline and the worker need of an anomaly detector (``stream.anomaly``): windows
    per source partition, models and flags per worker."""

    def observe_batch(self, events: Sequence[dict], partitions: Sequence[int]) -> list[dict]: ...

    def is_flagged(self, user_id: str) -> bool: ...

    last_scores: dict  # kind -> the scores of the latest batch (for the score histogram)
    idle_s: float  # entities idle this long are forgotten: how much of the log ``assign`` replays

    def warm_windows(self, events: Sequence[dict], partition: int) -> None: ...

    def detach_windows(self, partition: int) -> object | None: ...

    def attach_windows(self, partition: int, windows: object) -> None: ...

    def snapshot(self) -> DetectorSnapshot: ...

    def load_checkpoint(self, directory: Path) -> bool: ...

    def describe(self) -> str: ...


class ConsumedRecord(Protocol):
    """What the pipeline reads of a Kafka message: ``Record`` here, or aiokafka's ``ConsumerRecord``
    as the consumer returns it (the worker passes those on without copying them)."""

    value: bytes | None
    partition: int
    offset: int
    key: bytes | None
    topic: str


@dataclass
class Record:
    """One Kafka message as the worker received it (a ``ConsumedRecord``)."""

    value: bytes | None
    partition: int
    offset: int
    key: bytes | None = None
    topic: str = ""


@dataclass
class BatchResult:
    """What one batch produced: rows to log, messages to send, counts for the logs."""

    log_table: pa.Table = field(default_factory=EVENTS_SCHEMA.empty_table)
    examples: list[Example] = field(default_factory=list)
    example_rows: pa.Table = field(default_factory=EXAMPLE_ROWS_SCHEMA.empty_table)  # the examples' log rows
    dlq: list[tuple[bytes | None, dict]] = field(default_factory=list)
    anomalies: list[dict] = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0
    join_outcomes: Counter = field(default_factory=Counter)


def dlq_message(record: ConsumedRecord, error: InvalidEvent) -> dict:
    """The dead-letter record: reason, detail, the raw bytes (base64) and where they came from."""
    raw = record.value if record.value is not None else b""
    return {
        "reason": error.reason,
        "detail": error.detail[:2000],
        "raw": base64.b64encode(raw).decode("ascii"),
        "raw_encoding": "base64",
        "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
        "dlq_ts": time.time(),
    }


class IngestPipeline:
    """Validate, deduplicate, log, join and score one batch of raw events at a time.

    Parameters:
        dedupe_window_s: how long (event time) an event_id is remembered.
        attribution_window_s: how long a slate waits for clicks before its negatives are emitted.
        detector: optional anomaly detector; examples of users it flags are marked ``anomalous``.
        idle_grace_s: after this long without events, event time follows the wall clock so that
            the last slates of a quiet stream still close.
        max_weight: clip of the inverse-propensity weight on click examples.
        anomaly_slice_s: the most event time one anomaly-scoring pass covers (see ``_detect``).
        clock: seconds on a monotonic clock, read to measure how long the stream has been idle;
            tests pass a fake one to move time by hand.
        max_future_s: an event whose ts is more than this ahead of the wall clock is dead-lettered
            as ``ts_in_future`` (it would move event time past the rest of the stream).
        feedback: the feedback protocol, ``"wait"`` or ``"immediate"`` (``stream.worker.join``).
    """

    def __init__(
        self,
        dedupe_window_s: float = 3600.0,
        attribution_window_s: float = 1800.0,
        detector: AnomalyDetector | None = None,
        idle_grace_s: float = 2.0,
        max_weight: float = 50.0,
        anomaly_slice_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_future_s: float = DEFAULT_MAX_FUTURE_S,
        feedback: str = WAIT,
    ) -> None:
        if not dedupe_window_s > 0 or not attribution_window_s > 0:
            raise ValueError(f"dedupe_window_s and attribution_window_s must be positive, "
                             f"got {dedupe_window_s!r}, {attribution_window_s!r}")
        if feedback not in FEEDBACK_PROTOCOLS:
            raise ValueError(f"feedback must be one of {FEEDBACK_PROTOCOLS} (STREAMREC_FEEDBACK, --feedback), "
                             f"got {feedback!r}")
        self.dedupe_window_s = dedupe_window_s
        self.attribution_window_s = attribution_window_s
        self.max_weight = max_weight
        self.detector = detector
        self.idle_grace_s = idle_grace_s
        self.anomaly_slice_s = anomaly_slice_s
        self.clock = clock
        self.max_future_s = max_future_s
        self.feedback = feedback
        self.partitions: dict[int, PartitionState] = {}
        self._parked: dict[int, PartitionState] = {}  # revoked, kept until the next assignment

    def partition(self, partition: int) -> PartitionState:
        """The state of one source partition (empty when it is new to this worker)."""
        state = self.partitions.get(partition)
        if state is None:
            state = self.partitions[partition] = PartitionState(
                DedupeWindow(self.dedupe_window_s),
                ImpressionJoiner(self.attribution_window_s, self.max_weight, self.feedback),
                last_batch_wall=self.clock())
        return state

    def revoke(self, partition: int) -> None:
        """Take a partition's state, the detector's windows of it included, out of use. It is
        kept aside until the assignment that follows (Kafka's eager rebalance revokes every
        partition and often hands the same ones back): ``assign`` reuses it when the log shows
        nobody processed the partition since."""
        state = self.partitions.pop(partition, None)
        if state is not None:
            if self.detector is not None:
                state.anomaly_windows = self.detector.detach_windows(partition)
            self._parked[partition] = state

    def forget_revoked(self) -> None:
        """Drop the states kept aside by ``revoke``, with their anomaly windows (after an
        assignment that did not reuse them)."""
        self._parked.clear()

    @property
    def open_slates(self) -> int:
        return sum(len(state.joiner) for state in self.partitions.values())

    @property
    def remembered_ids(self) -> int:
        return sum(len(state.dedupe) for state in self.partitions.values())

    def process(self, records: Sequence[ConsumedRecord]) -> BatchResult:
        out = BatchResult()
        accepted: list[Event] = []
        partitions: list[int] = []
        offsets: list[int] = []
        examples = out.examples
        shown_from: dict[int, int] = {}  # index of a ``shown`` example -> the first log row of its impression
        log_rows = 0  # rows of the accepted events so far (``events_table``: one per shown item, else one)
        dlq_reasons: Counter = Counter()
        types: Counter = Counter()
        now, max_future_s = time.time(), self.max_future_s  # the validating clock, read once a batch
        newest: dict[int, float] = {}  # partition -> newest ts accepted in this batch
        current, state = None, None
        for record in records:
            if record.partition != current:
                current, state = record.partition, self.partition(record.partition)
                joiner, remember = state.joiner, state.dedupe.add
            state.next_offset = record.offset + 1
            try:
                event = decode(record.value, now=now, max_future_s=max_future_s)
            except InvalidEvent as err:
                out.dlq.append((record.key, dlq_message(record, err)))
                dlq_reasons[err.reason] += 1
                continue
            ts = event.ts
            if not remember(event.event_id, ts):
                out.duplicates += 1
                continue
            if ts > newest.get(current, float("-inf")):
                newest[current] = ts
            accepted.append(event)
            partitions.append(current)
            offsets.append(record.offset)
            kind = EVENT_TYPE[type(event)]
            types[kind] += 1
            if kind == "impression":
                shown = joiner.on_impression(event)
                if shown is not None:
                    shown_from[len(examples)] = log_rows
                    examples.append(shown)
                log_rows += len(event.items)
            else:
                log_rows += 1
                if kind == "click":
                    outcome, example = joiner.on_click(event)
                    out.join_outcomes[outcome] += 1
                    if example is not None:
                        examples.append(example)
                else:
                    examples.append(rating_example(event))
        out.accepted = len(accepted)
        if accepted:
            out.log_table = events_table(accepted, partitions, offsets)
            wall = self.clock()
            for partition, ts in sorted(newest.items()):  # each partition's event time, on its own
                state = self.partitions[partition]
                state.last_event_ts = max(state.last_event_ts, ts)
                state.last_batch_wall = wall
                examples.extend(state.joiner.advance(state.last_event_ts))
        if self.detector is not None and accepted:
            out.anomalies = self._detect(accepted, partitions)
        self._finish_examples(examples)
        out.example_rows = batch_rows(examples, shown_from, out.log_table, self.max_weight)
        _count(metrics.EVENTS, types)
        _count(metrics.DLQ, dlq_reasons)
        _count(metrics.UNJOINED_CLICKS, {k: v for k, v in out.join_outcomes.items() if k != MATCHED})
        if out.duplicates:
            metrics.DUPLICATES.inc(out.duplicates)
        return out

    def _detect(self, accepted: list[Event], partitions: list[int]) -> list[dict]:
        """Score the batch in slices of at most ``anomaly_slice_s`` of event time, in time order;
        each event updates the detector's windows of its source partition (``partitions``).

        A replayed backlog packs hours of event time into one batch; the detector scores an
        entity at most once per call, so without slicing a burst inside the batch would be seen
        only as part of a long average. The detector reads events as the dictionaries of JSON.
        """
        detector, records = self.detector, []
        order = sorted(range(len(accepted)), key=lambda i: accepted[i].ts)
        ordered = msgspec.to_builtins([accepted[i] for i in order])
        sources = [partitions[i] for i in order]
        start = 0
        for end in range(1, len(ordered) + 1):
            if end == len(ordered) or ordered[end]["ts"] - ordered[start]["ts"] > self.anomaly_slice_s:
                records += detector.observe_batch(ordered[start:end], sources[start:end])
                for scores in detector.last_scores.values():
                    for score in scores:
                        metrics.ANOMALY_SCORE.observe(float(score))
                start = end
        metrics.ANOMALIES.inc(len(records))
        return records

    def tick(self) -> BatchResult:
        """Close slates by wall time in every partition that has been idle for ``idle_grace_s``."""
        out = BatchResult()
        now = self.clock()
        for _, state in sorted(self.partitions.items()):
            idle = now - state.last_batch_wall
            if len(state.joiner) and idle >= self.idle_grace_s and state.last_event_ts > float("-inf"):
                out.examples += state.joiner.advance(state.last_event_ts + idle)
        self._finish_examples(out.examples)
        out.example_rows = example_rows(out.examples)
        return out

    def _finish_examples(self, examples: list[Example]) -> None:
        """Mark the examples of users the detector flags as anomalous; count labelled items."""
        detector = self.detector
        if detector is not None:
            flags: dict[str, bool] = {}
            flagged = 0
            for example in examples:
                user = example.user_id
                flag = flags.get(user)
                if flag is None:
                    flag = flags[user] = detector.is_flagged(user)
                if flag:
                    example.anomalous = True
                    flagged += len(example.items)
            if flagged:
                metrics.SKIPPED_ANOMALOUS.inc(flagged)
        labels: Counter = Counter()
        for example in examples:  # one message per outcome: its items share a label but for ratings
            labels[example.kind, _LABEL_NAMES[example.stage]] += len(example.items)
        _count(metrics.EXAMPLES, labels)

    def restore(self, log: DeltaLog) -> dict:
        """Rebuild the state of every partition the log holds (one worker taking over a whole log:
        the tests, a single-process run); the worker itself calls ``assign`` per partition."""
        counts: Counter = Counter()
        for partition in log.partitions_logged():
            restored = self.assign(partition, log)
            counts.update(events=restored["events"], open_slates=restored["open_slates"])
        return {"events": counts["events"], "open_slates": counts["open_slates"]}

    def assign(self, partition: int, log: DeltaLog, until_offset: int | None = None) -> dict:
        """Rebuild one partition's dedupe window, open slates, watermark and the detector's
        windows of it from the log rows of that partition (up to ``until_offset``, the last
        offset the log records for it), replacing whatever state this worker had for it.

        The log holds exactly the events whose offsets it records, so ids seen there are
        duplicates when Kafka delivers them again, impressions still inside their window wait for
        clicks as if the partition had never moved, and the partition's anomaly windows are
        rebuilt from its events of its last ``idle_s`` seconds (unscored;
        ``AnomalyDetector.warm_windows``) as if it had never moved. A state this worker had
        before ``revoke``, anomaly windows included, is reused as it is when the log's offset
        shows that nobody processed the partition since.

        Returns the event ids and open slates it holds, and whether it came from the log.
        """
        resume = None if until_offset is None else until_offset + 1
        parked = self._parked.pop(partition, None)
        if parked is not None and parked.next_offset == resume:  # nothing happened to it meanwhile
            self._unpark(partition, parked)
            return {"events": len(parked.dedupe), "open_slates": len(parked.joiner), "from_log": False}
        self.partitions.pop(partition, None)
        state = self.partition(partition)
        state.next_offset = resume
        newest = log.newest_ts(EVENTS, source_partition=partition, until_offset=until_offset)
        detector = self.detector
        if newest is None:
            if detector is not None:
                detector.warm_windows([], partition)  # nothing logged: empty windows
            return {"events": 0, "open_slates": 0, "from_log": True}
        horizon = max(self.dedupe_window_s, self.attribution_window_s, detector.idle_s if detector is not None else 0.0)
        rows = log.read(EVENTS, since_ts=newest - horizon, source_partition=partition, until_offset=until_offset)
        rows = rows.sort_values("source_offset", kind="stable").reset_index(drop=True)
        ids = rows.drop_duplicates("event_id")
        state.dedupe.seed(zip(ids["event_id"], ids["ts"]))
        window = self.attribution_window_s
        impressions = rows[rows["type"] == "impression"]
        slates = [_impression_from_rows(group) for _, group in impressions.groupby("event_id", sort=False)]
        labelled = log.read(EXAMPLES, since_ts=newest - horizon - window,
                            columns=["request_id", "item_id", "label", "kind", "stage"])
        labelled = labelled[(labelled["kind"] == "click") & labelled["request_id"].isin({s.request_id for s in slates})]
        stage = labelled["stage"]  # null in rows logged before stages: those are closed or clicked
        closed = (stage == CLOSED) | (stage.isna() & (labelled["label"] == NEGATIVE))
        negatives_logged = set(labelled.loc[closed, "request_id"])
        if detector is not None:
            first_rows = impressions.drop_duplicates("event_id").index  # in the order of the groups
            since = newest - detector.idle_s
            detector.warm_windows(_events_since(rows, dict(zip(first_rows, slates)), since), partition)
        slates.sort(key=lambda imp: imp.ts)
        # A slate whose ``closed`` example is in the log was closed (perhaps by the idle timer, ahead of
        # event time); one whose window has passed is closed too. The rest are still open.
        is_open = [imp.request_id not in negatives_logged and imp.ts + window >= newest for imp in slates]
        positives = labelled[labelled["label"] > NEGATIVE]
        state.joiner.restore(
            [imp for imp, o in zip(slates, is_open) if o],
            zip(positives["request_id"], positives["item_id"]),
            newest,
            closed=[(imp.request_id, imp.ts + window) for imp, o in zip(slates, is_open) if not o],
        )
        state.last_event_ts = float(newest)
        return {"events": len(ids), "open_slates": len(state.joiner), "from_log": True}

    def _unpark(self, partition: int, parked: PartitionState) -> None:
        """Put a parked partition state back in use, its anomaly windows back into the detector."""
        self.partitions[partition] = parked
        if parked.anomaly_windows is not None:
            self.detector.attach_windows(partition, parked.anomaly_windows)
            parked.anomaly_windows = None


@dataclass
class PartitionState:
    """What a worker keeps for one source partition between events (DESIGN.md "The worker's
    state"): its dedupe window, its open slates and its event-time watermark. The anomaly
    detector holds the partition's windows while the partition is in use; a revoked (parked)
    state holds them until it is reused or dropped."""

    dedupe: DedupeWindow
    joiner: ImpressionJoiner
    last_event_ts: float = float("-inf")  # the partition's watermark: the newest ts it accepted
    last_batch_wall: float = 0.0  # the clock when it last accepted an event (for the idle timer)
    next_offset: int | None = None  # the offset after the last record processed (None: none yet)
    anomaly_windows: object | None = None  # the detector's windows of the partition while parked


# The ``label`` label of ``streamrec_examples_total`` by stage (``stream.examples.label_name``).
_LABEL_NAMES = {RATED: label_name(RATING, 0.0)} | {
    stage: label_name(CLICK, label) for stage, label in CLICK_LABELS.items()}


def _count(counter, counts: dict) -> None:
    """Add a batch's counts to a labelled counter: one call per label, not one per event."""
    for label, n in counts.items():
        counter.labels(*(label if isinstance(label, tuple) else (label,))).inc(n)


def _events_since(rows: pd.DataFrame, impressions: dict[int, Impression], since: float) -> list[dict]:
    """The logged events with ts >= since in log order, as far as the detector's windows need
    them: ``impressions`` (by the index of their first row) as the dictionaries of JSON; clicks
    and ratings rebuilt with type, user, time and item."""
    events = {row: msgspec.to_builtins(imp) for row, imp in impressions.items() if imp.ts >= since}
    others = rows[(rows["type"] != "impression") & (rows["ts"] >= since)]
    for row, kind, user_id, ts, item_id in zip(others.index, others["type"], others["user_id"],
                                                others["ts"], others["item_id"]):
        events[row] = {"type": kind, "user_id": user_id, "ts": float(ts), "item_id": item_id}
    return [events[row] for row in sorted(events)]


def _impression_from_rows(group: pd.DataFrame) -> Impression:
    first = group.iloc[0]
    variant = first.get("variant")  # tables written before the column read it as null
    return Impression(
        schema_version=SCHEMA_VERSION,
        event_id=first["event_id"],
        user_id=first["user_id"],
        ts=float(first["ts"]),
        request_id=first["request_id"],
        model_version=first["model_version"],
        policy=first["policy"],
        items=[Item(row.item_id, position=int(row.position), propensity=float(row.propensity),
                    score=UNSET if pd.isna(row.score) else float(row.score))
               for row in group.itertuples()],
        variant=variant if isinstance(variant, str) else UNSET,
    )
