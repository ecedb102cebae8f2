"""Keeps the log's file count small: compaction of closed hours and vacuum of unreferenced files.

Every flush adds a data file per (date, hour) partition it touches, so a day of flushes every few
seconds leaves tens of thousands of small files. ``compact`` rewrites the small files of an hour
into few large ones, once the hour has been closed for ``min_age_s`` (late events rarely reach it
any more) and it holds at least ``min_files`` files smaller than ``target_bytes``; it is a Delta
commit like any other (the ``txn`` offsets are kept), so readers and writers carry on while it
runs. The replaced files stay on storage for readers of older versions until ``vacuum`` removes
the files no version newer than ``retention_hours`` refers to, together with the data files of
flushes that crashed before their commit. ``streamrec log compact`` / ``streamrec log vacuum``
run them by hand; the worker compacts on its own (``StreamSettings.log_compact_interval_s``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
from deltalake.exceptions import CommitFailedError

from stream.log.table import EVENTS, EXAMPLES, DeltaLog

logger = logging.getLogger(__name__)

TARGET_BYTES = 128 * 1024 * 1024  # the size compaction aims for, and under which a file counts as small
DATASETS = (EVENTS, EXAMPLES)


@dataclass
class CompactionReport:
    """What one compaction pass did to one table."""

    dataset: str
    partitions: int = 0  # (date, hour) partitions rewritten
    files_removed: int = 0
    files_added: int = 0
    conflicts: int = 0  # partitions another writer compacted at the same time (left to it)


def _due_partitions(log: DeltaLog, dataset: str, min_files: int, min_age_s: float,
                    target_bytes: int, now: float) -> list[tuple[str, str]]:
    table = log.table(dataset)
    if table is None:
        return []
    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return []
    sizes = actions.column("size_bytes").to_pylist()
    dates = actions.column("partition.date").to_pylist()
    hours = actions.column("partition.hour").to_pylist()
    small: dict[tuple[str, str], int] = {}
    for size, date, hour in zip(sizes, dates, hours):
        if size < target_bytes:
            small[date, hour] = small.get((date, hour), 0) + 1
    due = []
    for (date, hour), count in sorted(small.items()):
        closed_at = datetime.strptime(f"{date} {hour}", "%Y-%m-%d %H").replace(tzinfo=timezone.utc).timestamp() + 3600
        if count >= min_files and now - closed_at >= min_age_s:
            due.append((date, hour))
    return due


def compact(log: DeltaLog, min_files: int = 10, min_age_s: float = 3600.0,
            target_bytes: int = TARGET_BYTES, now: float | None = None) -> list[CompactionReport]:
    """Rewrite the small files of every hour closed ``min_age_s`` ago that holds at least
    ``min_files`` of them, in both tables; one Delta commit per hour."""
    now = time.time() if now is None else now
    reports = []
    for dataset in DATASETS:
        report = CompactionReport(dataset)
        for date, hour in _due_partitions(log, dataset, min_files, min_age_s, target_bytes, now):
            try:
                metrics = log.table(dataset).optimize.compact(
                    partition_filters=[("date", "=", date), ("hour", "=", hour)], target_size=target_bytes)
            except CommitFailedError as err:  # another worker compacted this hour first
                report.conflicts += 1
                logger.info("compaction of %s date=%s hour=%s left to a concurrent writer: %s", dataset, date, hour, err)
                continue
            report.partitions += 1
            report.files_removed += int(metrics.get("numFilesRemoved", 0))
            report.files_added += int(metrics.get("numFilesAdded", 0))
        reports.append(report)
    return reports


def vacuum(log: DeltaLog, retention_hours: int = 168, dry_run: bool = False) -> dict[str, int]:
    """Delete, in both tables, the files no version of the last ``retention_hours`` refers to
    (compacted-away files, data files of flushes that never committed); return the count per table.

    Readers still on an older version than that lose its files, hence a retention of a week by
    default; Delta refuses one below its ``deletedFileRetentionDuration`` unless forced, and this
    forces it, since the caller chose it.
    """
    removed = {}
    for dataset in DATASETS:
        table = log.table(dataset)
        if table is None:
            removed[dataset] = 0
            continue
        files = table.vacuum(retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False)
        removed[dataset] = len(files)
    return removed
