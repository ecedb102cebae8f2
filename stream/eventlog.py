"""The bias-aware event log: Parquet files partitioned by event date and hour.

Two datasets live under one root:

- ``events``: every accepted event, one row per shown item for impressions, so each row says
  what was shown, at which position, with what probability, by which model version and policy;
- ``examples``: the labelled rows the join produced (click label, position, propensity, weight).

Files are written whole and atomically: a temporary file in the target folder, then a rename,
so a reader (or a worker restarting after SIGKILL) never sees half a file. The worker writes the
rows of a batch before it acknowledges the batch's Kafka offsets, which makes the log the durable
record of what was accepted; ``read`` brings it back as a pandas DataFrame.
"""
from __future__ import annotations

import json
import os
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

EVENTS = "events"
EXAMPLES = "examples"

EVENTS_SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("type", pa.string()),
    ("user_id", pa.string()),
    ("ts", pa.float64()),
    ("request_id", pa.string()),
    ("model_version", pa.string()),
    ("policy", pa.string()),
    ("surface", pa.string()),
    ("item_id", pa.string()),
    ("position", pa.int32()),
    ("propensity", pa.float64()),
    ("score", pa.float64()),
    ("value", pa.float64()),
    ("slate_size", pa.int32()),
    ("context", pa.string()),
    ("source_partition", pa.int32()),
    ("source_offset", pa.int64()),
])

EXAMPLES_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("label", pa.float64()),
    ("position", pa.int32()),
    ("propensity", pa.float64()),
    ("weight", pa.float64()),
    ("model_version", pa.string()),
    ("request_id", pa.string()),
    ("ts", pa.float64()),
    ("kind", pa.string()),
    ("anomalous", pa.bool_()),
    ("policy", pa.string()),
    ("event_id", pa.string()),
])

SCHEMAS = {EVENTS: EVENTS_SCHEMA, EXAMPLES: EXAMPLES_SCHEMA}


def event_rows(event: dict, partition: int | None = None, offset: int | None = None) -> list[dict]:
    """The log rows of one validated event: one per shown item for an impression, else one."""
    base = {
        "event_id": event["event_id"],
        "type": event["type"],
        "user_id": event["user_id"],
        "ts": float(event["ts"]),
        "request_id": event.get("request_id"),
        "model_version": event.get("model_version"),
        "policy": event.get("policy"),
        "surface": event.get("surface"),
        "item_id": event.get("item_id"),
        "position": event.get("position"),
        "propensity": None,
        "score": None,
        "value": event.get("value"),
        "slate_size": None,
        "context": json.dumps(event["context"], separators=(",", ":")) if "context" in event else None,
        "source_partition": partition,
        "source_offset": offset,
    }
    if event["type"] != "impression":
        return [base]
    items = event["items"]
    rows = []
    for item in items:
        row = dict(base)
        row["item_id"] = item["item_id"]
        row["position"] = item["position"]
        row["propensity"] = item["propensity"]
        row["score"] = item.get("score")
        row["slate_size"] = len(items)
        rows.append(row)
    return rows


@lru_cache(maxsize=4096)
def _hour_folder(hour_bucket: int) -> tuple[str, str]:
    t = datetime.fromtimestamp(hour_bucket * 3600, tz=timezone.utc)
    return t.strftime("%Y-%m-%d"), t.strftime("%H")


def _hour_start(folder: Path) -> float:
    """Epoch seconds at which the ``date=YYYY-MM-DD/hour=HH`` folder's hour begins (UTC)."""
    date = folder.parent.name.split("=", 1)[1]
    hour = int(folder.name.split("=", 1)[1])
    return datetime.strptime(date, "%Y-%m-%d").replace(hour=hour, tzinfo=timezone.utc).timestamp()


class ParquetLog:
    """Writes and reads the two datasets under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def write(self, dataset: str, rows: Sequence[dict], tag: str = "") -> list[Path]:
        """Write ``rows`` as one file per (date, hour) partition they fall in; return the paths.

        ``tag`` goes into the file names (the worker puts the source partition and offsets there).
        """
        if not rows:
            return []
        schema = SCHEMAS[dataset]
        by_hour: dict[int, list[dict]] = defaultdict(list)
        for row in rows:
            by_hour[int(row["ts"] // 3600)].append(row)
        written = []
        for bucket, part in sorted(by_hour.items()):
            date, hour = _hour_folder(bucket)
            folder = self.root / dataset / f"date={date}" / f"hour={hour}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"part-{tag}{'-' if tag else ''}{uuid.uuid4().hex[:12]}.parquet"
            table = pa.Table.from_pydict({name: [row[name] for row in part] for name in schema.names}, schema=schema)
            tmp = folder / f".{name}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, folder / name)
            written.append(folder / name)
        return written

    def files(self, dataset: str, since_ts: float | None = None) -> list[Path]:
        """The finished files of ``dataset``, oldest hour first; only hours that may hold ts >= since_ts."""
        base = self.root / dataset
        if not base.is_dir():
            return []
        out = []
        for folder in sorted(base.glob("date=*/hour=*")):
            if since_ts is not None and _hour_start(folder) + 3600 <= since_ts:
                continue
            out.extend(sorted(folder.glob("part-*.parquet")))
        return out

    def newest_hour_start(self, dataset: str) -> float | None:
        """Start of the newest hour that holds files of ``dataset``, or None for an empty log."""
        files = self.files(dataset)
        return _hour_start(files[-1].parent) if files else None

    def read(self, dataset: str, since_ts: float | None = None, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """The rows of ``dataset`` (optionally only ts >= since_ts) as a DataFrame."""
        schema = SCHEMAS[dataset]
        cols = list(columns) if columns is not None else schema.names
        files = self.files(dataset, since_ts)
        if not files:
            return schema.empty_table().select(cols).to_pandas()
        read_cols = cols if since_ts is None or "ts" in cols else [*cols, "ts"]
        df = pa.concat_tables([pq.read_table(f, columns=read_cols) for f in files]).to_pandas()
        if since_ts is not None:
            df = df[df["ts"] >= since_ts].reset_index(drop=True)
        return df[cols]
