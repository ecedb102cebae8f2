"""Compaction and vacuum of the Delta log: closed hours with many small files become one file, the
rows and the recorded offsets stay, the open hour is left alone, and vacuum removes what no
version refers to any more; the ``streamrec log`` commands do the same by hand."""
from __future__ import annotations

from datetime import datetime, timezone

from stream.cli import main
from stream.events import Rating, to_event
from stream.log.maintenance import compact, vacuum
from stream.log.table import EVENTS, EXAMPLES, DeltaLog, events_table

HOUR = datetime(2024, 3, 1, 10, tzinfo=timezone.utc).timestamp()


def rating(event_id: str, ts: float) -> Rating:
    return to_event({"event_id": event_id, "type": "rating", "schema_version": 1, "user_id": "u", "ts": ts,
                     "item_id": "z", "value": 1.0})


def small_appends(log: DeltaLog, hour_start: float, n: int, first_offset: int = 0) -> None:
    for k in range(n):
        offset = first_offset + k
        log.append(EVENTS, events_table([rating(f"e{offset}", hour_start + k)], [0], [offset]),
                   offsets={("events", 0): offset}, group="g")
        log.append(EXAMPLES, [], offsets={("events", 0): offset}, group="g")


def files_on_disk(table_dir) -> int:
    return sum(1 for p in table_dir.rglob("*.parquet") if "_delta_log" not in p.parts)


def test_compaction_merges_closed_hours_and_keeps_rows_and_offsets(tmp_path):
    log = DeltaLog(tmp_path)
    small_appends(log, HOUR, 4)
    small_appends(log, HOUR + 3600, 3, first_offset=4)  # the hour still open at ``now``
    assert log.data_files(EVENTS) == 7
    (events_report, examples_report) = compact(log, min_files=2, min_age_s=0, now=HOUR + 3600 + 60)
    assert (events_report.partitions, events_report.files_removed, events_report.files_added) == (1, 4, 1)
    assert examples_report.partitions == 0
    assert log.data_files(EVENTS) == 4
    assert sorted(log.read(EVENTS)["event_id"]) == sorted(f"e{k}" for k in range(7))
    assert log.resume_offsets("g", "events", [0]) == {0: 7}


def test_compaction_waits_for_age_and_file_count(tmp_path):
    log = DeltaLog(tmp_path)
    small_appends(log, HOUR, 3)
    assert compact(log, min_files=4, min_age_s=0, now=HOUR + 7200)[0].partitions == 0  # too few files
    assert compact(log, min_files=2, min_age_s=3600, now=HOUR + 3600 + 60)[0].partitions == 0  # too young
    assert compact(log, min_files=2, min_age_s=3600, now=HOUR + 7200)[0].partitions == 1


def test_vacuum_removes_the_compacted_away_files(tmp_path):
    log = DeltaLog(tmp_path)
    small_appends(log, HOUR, 3)
    compact(log, min_files=2, min_age_s=0, now=HOUR + 7200)
    assert files_on_disk(tmp_path / EVENTS) == 4
    assert vacuum(log, retention_hours=0, dry_run=True)[EVENTS] == 3 and files_on_disk(tmp_path / EVENTS) == 4
    assert vacuum(log, retention_hours=0) == {EVENTS: 3, EXAMPLES: 0}
    assert files_on_disk(tmp_path / EVENTS) == 1 and len(log.read(EVENTS)) == 3


def test_log_commands(tmp_path, capsys):
    log = DeltaLog(tmp_path)
    small_appends(log, HOUR, 3)
    assert main(["log", "compact", "--log-dir", str(tmp_path)]) == 0
    assert "events: 1 hours compacted, 3 files into 1; 1 data files now" in capsys.readouterr().out
    assert main(["log", "vacuum", "--log-dir", str(tmp_path), "--retention-hours", "0", "--dry-run"]) == 0
    assert "events: would remove 3 files" in capsys.readouterr().out
