"""The ``examples`` contract (DESIGN.md "Examples"): the labelled outcomes the worker sends to the learner.

One definition, imported by everyone who writes or reads an example: the worker's join and
pipeline build them here (``click_example``, ``rating_example``), the log stores their rows
(``example_rows``, ``EXAMPLE_ROWS_SCHEMA``), the learner and serving's monitor read them in
columns (``decode_examples``).

Framing: one message per outcome, keyed by ``user_id``: a header (who, which slate, which model,
when, which stage) and the items the outcome labels, each with its position, propensity,
inverse-propensity weight, label and the score serving gave it. The stages:

- ``rated``: a rating; one item labelled with its value;
- ``clicked``: a click joined to its slate; one item labelled ``POSITIVE``;
- ``closed``: a slate's attribution window closed; the shown items nobody clicked, ``NEGATIVE``;
- ``shown``: a slate at impression time, every item ``NEGATIVE`` (a provisional negative that a
  later ``clicked`` corrects; only under the worker's ``immediate`` feedback protocol).

The worker builds them as msgspec Structs (``Example``, ``ExampleItem``: one object per outcome and
per item, no dictionaries) and sends them as JSON; the log keeps one row per labelled item
(``example_rows``, built in columns), the form every reader computes on.

>>> from stream.events import Impression, Item
>>> imp = Impression(schema_version=1, event_id="e1", user_id="u", ts=0.0, request_id="r", model_version="m1",
...                  policy="greedy", items=[Item("a", position=2, propensity=0.25)])
>>> ex = click_example(imp, imp.items, CLICKED, ts=5.0, event_id="e2", max_weight=50.0)
>>> ex.stage, [(i.item_id, i.label, i.position, i.weight) for i in ex.items]
('clicked', [('a', 1.0, 2, 4.0)])
>>> rows = example_rows([ex])
>>> rows.num_rows, rows.column("label").to_pylist(), rows.column("request_id").to_pylist()
(1, [1.0], ['r'])
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from operator import attrgetter
from typing import Literal, NamedTuple

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from msgspec import UNSET, Struct

from stream.events import Impression, Item, Rating

CLICK = "click"
RATING = "rating"
# The kinds of example, in the order the learner trains a micro-batch's examples.
EXAMPLE_KINDS = (RATING, CLICK)

# Labels of click examples.
POSITIVE = 1.0
NEGATIVE = 0.0

# Stages: what settled the labels of an example's items (module docstring).
RATED, CLICKED, CLOSED, SHOWN = "rated", "clicked", "closed", "shown"
STAGES = (RATED, CLICKED, CLOSED, SHOWN)
# The label every item of a click example carries, by stage.
CLICK_LABELS = {CLICKED: POSITIVE, CLOSED: NEGATIVE, SHOWN: NEGATIVE}

# The worker's feedback protocols: ``wait`` sends a slate's unclicked items as one ``closed``
# example when its attribution window closes; ``immediate`` sends every shown item at once as a
# ``shown`` example, and a click as a ``clicked`` correction (``learner.feedback``).
WAIT, IMMEDIATE = "wait", "immediate"
FEEDBACK_PROTOCOLS = (WAIT, IMMEDIATE)


class ExampleItem(Struct, gc=False):
    """One labelled item of an example."""

    item_id: str
    position: int | None  # where the slate showed the item (None for ratings)
    propensity: float  # the probability the policy showed it there (1.0 for ratings)
    weight: float  # the inverse propensity clipped at max_weight to bound the variance (1.0 for ratings)
    label: float  # click: POSITIVE or NEGATIVE; rating: the rating value
    score: float | None  # serving's score of the item when it chose the slate (its position-free click
    # probability; None for ratings and where the impression had none): what the click calibration is fitted on


class Example(Struct, gc=False):
    """One outcome, as sent on ``examples``: the header and the items it labels."""

    kind: Literal["click", "rating"]
    stage: Literal["rated", "clicked", "closed", "shown"]
    user_id: str
    request_id: str | None  # the slate's request (None for ratings)
    model_version: str | None  # the model that served the slate (None for ratings)
    policy: str | None  # the policy that chose the slate (None for ratings)
    variant: str | None  # the A/B variant that served the slate (None for ratings and outside A/B tests)
    ts: float  # event time: the click's, the impression's (closed, shown) or the rating's
    anomalous: bool  # the user was flagged by the anomaly detector (the learner skips it)
    event_id: str  # the event that settled the labels: the click, the impression or the rating
    items: list[ExampleItem]


_HEADER_TYPES = {
    "kind": pa.string(), "stage": pa.string(), "user_id": pa.string(), "request_id": pa.string(),
    "model_version": pa.string(), "policy": pa.string(), "variant": pa.string(), "ts": pa.float64(),
    "anomalous": pa.bool_(), "event_id": pa.string(),
}
_ITEM_TYPES = {"item_id": pa.string(), "position": pa.int32(), "propensity": pa.float64(), "weight": pa.float64(),
               "label": pa.float64(), "score": pa.float64()}
# A field added to the TypedDicts without a column type here fails at import.
HEADER_FIELDS: tuple[str, ...] = tuple(f for f in Example.__struct_fields__ if f != "items")
ITEM_FIELDS: tuple[str, ...] = ExampleItem.__struct_fields__
EXAMPLE_SCHEMA = pa.schema([(f, _HEADER_TYPES[f]) for f in HEADER_FIELDS]
                           + [("items", pa.list_(pa.struct([(f, _ITEM_TYPES[f]) for f in ITEM_FIELDS])))])
# One row per labelled item: the log's ``examples`` table and what readers compute on. The order
# is the log's (``stage`` and ``score`` came with the one-message-per-outcome framing, so they are last).
EXAMPLE_ROW_FIELDS: tuple[str, ...] = ("user_id", "item_id", "label", "position", "propensity", "weight",
                                       "model_version", "request_id", "ts", "kind", "anomalous", "policy",
                                       "event_id", "variant", "stage", "score")
EXAMPLE_ROWS_SCHEMA = pa.schema([(f, {**_HEADER_TYPES, **_ITEM_TYPES}[f]) for f in EXAMPLE_ROW_FIELDS])
_JSON_OPTIONS = pa_json.ParseOptions(explicit_schema=EXAMPLE_SCHEMA, unexpected_field_behavior="ignore")
_READ_OPTIONS = pa_json.ReadOptions(use_threads=False, block_size=1 << 24)


def click_example(impression: Impression, items: Sequence[Item], stage: str, ts: float, event_id: str,
                  max_weight: float) -> Example:
    """The ``stage`` outcome of ``items``, shown by the (valid) event ``impression``; ``ts`` and
    ``event_id`` are those of the event that settled the labels."""
    label = CLICK_LABELS[stage]
    labelled = []
    for item in items:  # once per shown item: the weight min(1 / propensity, max_weight) without min()
        propensity = item.propensity
        inverse = 1.0 / propensity
        score = item.score
        labelled.append(ExampleItem(item.item_id, item.position, propensity,
                                    max_weight if max_weight < inverse else inverse, label,
                                    None if score is UNSET else score))
    variant = impression.variant
    return Example(CLICK, stage, impression.user_id, impression.request_id,  # type: ignore[arg-type]
                   impression.model_version, impression.policy, None if variant is UNSET else variant,
                   ts, False, event_id, labelled)


def rating_example(event: Rating) -> Example:
    """A (valid) rating event is an example as it stands: label = the rating, no position, propensity 1."""
    return Example(RATING, RATED, event.user_id, None, None, None, None, event.ts, False, event.event_id,
                   [ExampleItem(event.item_id, None, 1.0, 1.0, event.value, None)])


class ExampleBatch(NamedTuple):
    """A batch of examples in columns: one row per labelled item (``EXAMPLE_ROWS_SCHEMA``), the
    index of each row's message in the batch, and how many messages were not examples."""

    rows: pa.Table
    message: np.ndarray  # int64, ascending: rows of one message are consecutive
    malformed: int = 0

    def first_rows(self) -> np.ndarray:
        """The first row of each message that has items (where its header is read)."""
        message = self.message
        return np.flatnonzero(np.r_[True, message[1:] != message[:-1]]) if len(message) else message


def example_rows(examples: Sequence[Example]) -> pa.Table:
    """One row per labelled item of ``examples`` (``EXAMPLE_ROWS_SCHEMA``), in message order."""
    return example_batch(examples).rows


def example_batch(examples: Sequence[Example]) -> ExampleBatch:
    """``examples`` (as the worker builds them) in columns: each header field read once per
    message and repeated for its items by Arrow's ``take``, each item field read once per item."""
    counts = [len(e.items) for e in examples]
    message = np.repeat(np.arange(len(examples), dtype=np.int64), counts)
    parents = pa.array(message)
    columns = {f: pa.array(list(map(attrgetter(f), examples)), _HEADER_TYPES[f]).take(parents) for f in HEADER_FIELDS}
    items = [item for e in examples for item in e.items]
    columns.update({f: pa.array(list(map(attrgetter(f), items)), _ITEM_TYPES[f]) for f in ITEM_FIELDS})
    rows = pa.table([columns[f] for f in EXAMPLE_ROW_FIELDS], schema=EXAMPLE_ROWS_SCHEMA)
    return ExampleBatch(rows, message)


def batch_rows(examples: Sequence[Example], shown_from: dict[int, int], events: pa.Table,
               max_weight: float) -> pa.Table:
    """``example_rows(examples)``, built without reading the items of ``shown`` outcomes one by one.

    ``shown_from`` maps the index of each ``shown`` example to the first row of its impression in
    ``events`` (the batch's log rows, ``stream.log.table.events_table``: one row per shown item, in
    slate order). A ``shown`` outcome labels every item of its slate, so its rows are the
    impression's rows, taken by Arrow, with the label, stage and the weight
    ``min(1 / propensity, max_weight)`` computed in columns; the other outcomes are read from
    their Structs. Under ``immediate`` feedback that is all but a few rows of a batch.
    """
    if not shown_from:
        return example_rows(examples)
    rows = np.fromiter((len(e.items) for e in examples), np.int64, len(examples))  # per message
    shown_mask = np.zeros(len(examples), bool)
    shown_mask[np.fromiter(shown_from, np.int64, len(shown_from))] = True
    other_rows = example_rows([e for e, shown in zip(examples, shown_mask) if not shown])
    counts = rows[shown_mask]  # ``shown_from`` is in message order
    taken = _ranges(np.fromiter(shown_from.values(), np.int64, len(shown_from)), counts)
    shown = events.select(_FROM_EVENT_ROWS).take(taken)
    n = len(taken)
    inverse = pc.divide(1.0, shown.column("propensity"))
    columns = {name: shown.column(name) for name in _FROM_EVENT_ROWS}
    columns.update(
        label=pa.repeat(pa.scalar(CLICK_LABELS[SHOWN]), n),
        weight=pc.if_else(pc.less(max_weight, inverse), max_weight, inverse),
        kind=pa.repeat(pa.scalar(CLICK), n),
        anomalous=pa.array(np.repeat([examples[m].anomalous for m in shown_from], counts)),
        stage=pa.repeat(pa.scalar(SHOWN), n),
    )
    shown_rows = pa.table([columns[f] for f in EXAMPLE_ROW_FIELDS], schema=EXAMPLE_ROWS_SCHEMA)
    if not other_rows.num_rows:
        return shown_rows
    # Back to message order: the rows of message i start where its kind's rows before it end.
    start = np.where(shown_mask, np.cumsum(np.where(shown_mask, rows, 0)),
                     n + np.cumsum(np.where(shown_mask, 0, rows))) - rows
    return pa.concat_tables([shown_rows, other_rows]).take(_ranges(start, rows))


# The columns of a ``shown`` outcome's rows that are its impression's log rows as they stand.
_FROM_EVENT_ROWS = ("user_id", "item_id", "position", "propensity", "model_version", "request_id", "ts", "policy",
                    "event_id", "variant", "score")


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of ``range(start, start + count)`` for each pair, without a Python loop."""
    ends = np.cumsum(counts)
    return np.repeat(starts - ends + counts, counts) + np.arange(ends[-1] if len(ends) else 0)


def decode_examples(values: Sequence[bytes | None]) -> ExampleBatch:
    """A batch of ``examples`` messages as Kafka delivered them (JSON), decoded in columns by
    Arrow. A message that is not an example (not JSON, a field of the wrong type, no item list)
    is left out and counted in ``malformed``; a missing header field reads as null."""
    lines = [line for line in map(_one_line, values) if line is not None]
    try:
        return _flatten(_read(lines), len(values) - len(lines))
    except pa.ArrowInvalid:
        pass
    tables = []  # one message at a time, to find the bad ones
    for value in lines:
        try:
            tables.append(_read([value]))
        except pa.ArrowInvalid:
            pass
    messages = pa.concat_tables(tables) if tables else EXAMPLE_SCHEMA.empty_table()
    return _flatten(messages, len(values) - len(tables))


def _one_line(value: bytes | None) -> bytes | None:
    """Arrow reads one JSON document per line: a message with line breaks is re-encoded; None
    for an empty message or one with line breaks that is not JSON."""
    if not value:
        return None
    if b"\n" not in value:
        return value
    try:
        return orjson.dumps(orjson.loads(value))
    except orjson.JSONDecodeError:
        return None


def _read(lines: list[bytes]) -> pa.Table:
    if not lines:
        return EXAMPLE_SCHEMA.empty_table()
    return pa_json.read_json(io.BytesIO(b"\n".join(lines)), read_options=_READ_OPTIONS, parse_options=_JSON_OPTIONS)


def _flatten(messages: pa.Table, malformed: int = 0) -> ExampleBatch:
    """Flatten the item lists: each item's fields beside its message's header, no Python loop. A
    message without an item list (not of this framing) is counted as ``malformed``."""
    items = messages.column("items").combine_chunks()
    parents = pc.list_parent_indices(items)
    flat = pc.list_flatten(items)
    columns = {f: messages.column(f).take(parents) for f in HEADER_FIELDS}
    columns.update({f: flat.field(f) for f in ITEM_FIELDS})
    rows = pa.table([columns[f] for f in EXAMPLE_ROW_FIELDS], schema=EXAMPLE_ROWS_SCHEMA)
    return ExampleBatch(rows, parents.to_numpy().astype(np.int64), malformed + items.null_count)


def count_rows(examples: Sequence[Example]) -> int:
    """Labelled items in ``examples`` (the log rows they make)."""
    return sum(len(e.items) for e in examples)


def outcome_key(kind: str, stage: str, event_id: str) -> int:
    """The identity of one outcome message: a 63-bit integer digest of (kind, stage, the event that
    settled the labels).

    A worker that replays a batch after a crash re-sends the batch's outcomes with the same
    header, so the learner can recognise them (``learner.outcomes``). A click's ``clicked`` (the
    click's event_id) and its slate's ``closed`` or ``shown`` (the impression's) never share a key.
    The digest is stable across processes (unlike ``hash``), so remembered keys survive a
    restart; two of 10 million remembered outcomes collide with probability about 5e-6.

    >>> outcome_key("click", "closed", "e1") == outcome_key("click", "closed", "e1") != outcome_key("click", "shown", "e1")
    True
    """
    text = f"{len(kind)}:{kind}{len(stage)}:{stage}{event_id}"  # length-prefixed: no two triples alike
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def label_name(kind: str, label: float) -> str:
    """The ``label`` label of ``streamrec_examples_total{kind,label}``: rating, positive or negative."""
    if kind == RATING:
        return "rating"
    return "positive" if label > 0 else "negative"
