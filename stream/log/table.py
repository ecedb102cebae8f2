"""The bias-aware event log: Parquet files partitioned by event date and hour.

Two datasets live under one root:

- ``events``: every accepted event, one row per shown item for impressions, so each row says
  what was shown, at which position, with what probability, by which model version and policy;
- ``examples``: the labelled rows the join produced (``stream.examples.Example``: label,
  position, propensity, weight, ...).

Files are written whole and atomically: a temporary file in the target folder, then a rename,
so a reader (or a worker restarting after SIGKILL) never sees half a file. The two steps are
separate calls (``stage``, ``commit``) so that the worker can encode a batch's files while Kafka
acknowledges the batch's output, and make them visible only after. The worker writes the
rows of a batch before it acknowledges the batch's Kafka offsets, which makes the log the durable
record of what was accepted; ``read`` brings it back as a pandas DataFrame.
"""
from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stream.examples import EXAMPLE_FIELDS

EVENTS = "events"
EXAMPLES = "examples"
TEMPORARY_SUFFIX = ".tmp"

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

# The column type of each field of ``stream.examples.Example``: a field added there without a
# type here fails at import.
_EXAMPLE_COLUMN_TYPES = {
    "user_id": pa.string(),
    "item_id": pa.string(),
    "label": pa.float64(),
    "position": pa.int32(),
    "propensity": pa.float64(),
    "weight": pa.float64(),
    "model_version": pa.string(),
    "request_id": pa.string(),
    "ts": pa.float64(),
    "kind": pa.string(),
    "anomalous": pa.bool_(),
    "policy": pa.string(),
    "event_id": pa.string(),
}
EXAMPLES_SCHEMA = pa.schema([(name, _EXAMPLE_COLUMN_TYPES[name]) for name in EXAMPLE_FIELDS])

SCHEMAS = {EVENTS: EVENTS_SCHEMA, EXAMPLES: EXAMPLES_SCHEMA}
# Parquet dictionary-encodes only the columns whose values repeat (ids of users and items, enums);
# on unique ids (event_id, request_id) the dictionary is built and then thrown away, and with
# it everywhere writing took twice as long for a 10% smaller file. Column statistics are kept
# for ``ts``, the column readers filter on.
_DICTIONARY_COLUMNS = {
    EVENTS: ["type", "user_id", "model_version", "policy", "surface", "item_id"],
    EXAMPLES: ["user_id", "item_id", "model_version", "kind", "policy"],
}


def events_table(
    events: Sequence[dict],
    partitions: Sequence[int | None] | None = None,
    offsets: Sequence[int | None] | None = None,
) -> pa.Table:
    """The log rows of validated events as one Arrow table (``EVENTS_SCHEMA``), in event order:
    one row per shown item for an impression, else one row.

    Built column by column: the per-event columns once per event, then repeated for the shown
    items by Arrow's ``take``, so an impression of ten items costs four short Python lists, not
    ten dictionaries.
    """
    n = len(events)
    partitions = [None] * n if partitions is None else partitions
    offsets = [None] * n if offsets is None else offsets
    item_id: list = []
    position: list = []
    propensity: list = []
    score: list = []
    rows_per_event = []
    slate_size = []
    for e in events:
        if e["type"] == "impression":
            items = e["items"]
            item_id += [item["item_id"] for item in items]
            position += [item["position"] for item in items]
            propensity += [item["propensity"] for item in items]
            score += [item.get("score") for item in items]
            rows_per_event.append(len(items))
            slate_size.append(len(items))
        else:
            item_id.append(e.get("item_id"))
            position.append(e.get("position"))
            propensity.append(None)
            score.append(None)
            rows_per_event.append(1)
            slate_size.append(None)
    per_event = {
        "event_id": [e["event_id"] for e in events],
        "type": [e["type"] for e in events],
        "user_id": [e["user_id"] for e in events],
        "ts": [e["ts"] for e in events],
        "request_id": [e.get("request_id") for e in events],
        "model_version": [e.get("model_version") for e in events],
        "policy": [e.get("policy") for e in events],
        "surface": [e.get("surface") for e in events],
        "value": [e.get("value") for e in events],
        "slate_size": slate_size,
        "context": [json.dumps(e["context"], separators=(",", ":")) if "context" in e else None for e in events],
        "source_partition": partitions,
        "source_offset": offsets,
    }
    per_row = {"item_id": item_id, "position": position, "propensity": propensity, "score": score}
    parent = pa.array(np.repeat(np.arange(n), rows_per_event))
    columns = []
    for name in EVENTS_SCHEMA.names:
        kind = EVENTS_SCHEMA.field(name).type
        if name in per_row:
            columns.append(pa.array(per_row[name], kind))
        else:
            columns.append(pa.array(per_event[name], kind).take(parent))
    return pa.Table.from_arrays(columns, schema=EVENTS_SCHEMA)


@lru_cache(maxsize=4096)
def _hour_folder(hour_bucket: int) -> tuple[str, str]:
    t = datetime.fromtimestamp(hour_bucket * 3600, tz=timezone.utc)
    return t.strftime("%Y-%m-%d"), t.strftime("%H")


def _hour_start(folder: Path) -> float:
    """Epoch seconds at which the ``date=YYYY-MM-DD/hour=HH`` folder's hour begins (UTC)."""
    date = folder.parent.name.split("=", 1)[1]
    hour = int(folder.name.split("=", 1)[1])
    return datetime.strptime(date, "%Y-%m-%d").replace(hour=hour, tzinfo=timezone.utc).timestamp()


def _table(rows: Sequence[dict], schema: pa.Schema) -> pa.Table:
    """Dictionaries to a table of ``schema`` (a missing key is a null, an unknown one is ignored)
    through one struct array: Arrow reads each dictionary once, in C++."""
    return pa.Table.from_struct_array(pa.array(rows, type=pa.struct(schema)))


class ParquetLog:
    """Writes and reads the two datasets under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def write(self, dataset: str, rows: Sequence[dict] | pa.Table, tag: str = "") -> list[Path]:
        """Write ``rows`` (dictionaries or an Arrow table of the dataset's schema) as one file per
        (date, hour) partition they fall in; return the paths.

        ``tag`` goes into the file names (the worker puts the source partition and offsets there).
        """
        return self.commit(self.stage(dataset, rows, tag))

    def stage(self, dataset: str, rows: Sequence[dict] | pa.Table, tag: str = "") -> list[tuple[Path, Path]]:
        """The slow half of ``write``: encode and write the files under temporary names that
        readers ignore; returns (temporary, final) path pairs for ``commit``."""
        schema = SCHEMAS[dataset]
        table = rows if isinstance(rows, pa.Table) else _table(rows, schema)
        if table.num_rows == 0:
            return []
        hours = np.floor_divide(table.column("ts").to_numpy(), 3600).astype(np.int64)
        buckets = np.unique(hours)
        staged = []
        for bucket in buckets:
            part = table if len(buckets) == 1 else table.filter(pa.array(hours == bucket))
            date, hour = _hour_folder(int(bucket))
            folder = self.root / dataset / f"date={date}" / f"hour={hour}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"part-{tag}{'-' if tag else ''}{uuid.uuid4().hex[:12]}.parquet"
            tmp = folder / f".{name}{TEMPORARY_SUFFIX}"
            pq.write_table(part, tmp, use_dictionary=_DICTIONARY_COLUMNS[dataset], write_statistics=["ts"])
            staged.append((tmp, folder / name))
        return staged

    @staticmethod
    def commit(staged: Sequence[tuple[Path, Path]]) -> list[Path]:
        """Make staged files visible, each by one atomic rename; returns the final paths."""
        for tmp, final in staged:
            os.replace(tmp, final)
        return [final for _, final in staged]

    def remove_temporary(self) -> int:
        """Delete files staged but never committed (a worker stopped between the two); returns
        how many there were. Their rows were not acknowledged, so Kafka delivers them again."""
        stale = list(self.root.glob(f"*/date=*/hour=*/.part-*{TEMPORARY_SUFFIX}"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

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
