"""The ``examples`` contract's framing (stream.examples, DESIGN.md "Examples"): one message per
outcome, decoded in columns into one row per labelled item."""
from __future__ import annotations

import msgspec
import numpy as np
import orjson
import pytest

from stream.events import to_event
from stream.examples import (CLICKED, CLOSED, EXAMPLE_ROW_FIELDS, HEADER_FIELDS, ITEM_FIELDS, click_example,
                             decode_examples, example_batch, example_rows, rating_example)

IMPRESSION = to_event({
    "event_id": "imp-1", "type": "impression", "schema_version": 1, "user_id": "u1", "ts": 100.0,
    "request_id": "r1", "model_version": "mf-3", "policy": "softmax", "variant": "model",
    "items": [{"item_id": "a", "position": 1, "propensity": 0.5},
              {"item_id": "b", "position": 2, "propensity": 0.25},
              {"item_id": "c", "position": 3, "propensity": 0.01}]})


def _messages() -> list:
    """A slate's ``clicked`` (item b), its ``closed`` (a and c) and a rating: 1 + 2 + 1 items."""
    items = IMPRESSION.items
    return [click_example(IMPRESSION, items[1:2], CLICKED, 105.0, "clk-1", max_weight=50.0),
            click_example(IMPRESSION, [items[0], items[2]], CLOSED, 100.0, "imp-1", max_weight=50.0),
            rating_example(to_event({"event_id": "rat-1", "type": "rating", "schema_version": 1, "user_id": "u2",
                                     "item_id": "z", "value": 4, "ts": 90}))]


def dumps(message) -> bytes:
    """A message as the worker sends it (msgspec's JSON; a dict or an ``Example``)."""
    return msgspec.json.encode(message)


def _expected_rows(messages: list) -> list[dict]:
    """Every item of every message, in order, beside its message's header."""
    out = []
    for message in msgspec.to_builtins(messages):
        header = {f: message[f] for f in HEADER_FIELDS}
        for item in message["items"]:
            row = {**header, **item}
            out.append({f: row[f] for f in EXAMPLE_ROW_FIELDS})
    return out


def test_example_rows_flatten_the_header_onto_every_item_in_order():
    messages = _messages()
    rows = example_rows(messages)
    assert rows.column_names == list(EXAMPLE_ROW_FIELDS)
    assert set(EXAMPLE_ROW_FIELDS) == set(HEADER_FIELDS) | set(ITEM_FIELDS)
    assert rows.to_pylist() == _expected_rows(messages)
    assert [(r["stage"], r["item_id"], r["label"], r["event_id"]) for r in rows.to_pylist()] == [
        ("clicked", "b", 1.0, "clk-1"), ("closed", "a", 0.0, "imp-1"), ("closed", "c", 0.0, "imp-1"),
        ("rated", "z", 4.0, "rat-1")]
    assert rows.column("weight").to_pylist() == [4.0, 2.0, 50.0, 1.0]  # clipped inverse propensities
    assert rows.column("variant").to_pylist() == ["model", "model", "model", None]
    batch = example_batch(messages)
    assert batch.rows.equals(rows) and batch.malformed == 0
    assert batch.message.tolist() == [0, 1, 1, 2] and batch.first_rows().tolist() == [0, 1, 3]


def test_a_message_without_items_makes_no_row():
    first, closed, rating = _messages()
    batch = example_batch([first, msgspec.structs.replace(closed, items=[]), rating])
    assert batch.rows.column("item_id").to_pylist() == ["b", "z"]
    assert batch.message.tolist() == [0, 2] and batch.first_rows().tolist() == [0, 1]
    empty = example_batch([])
    assert empty.rows.num_rows == 0 and empty.first_rows().tolist() == []


def test_decoding_json_gives_the_rows_of_the_messages_as_built():
    messages = _messages()
    batch = decode_examples([dumps(m) for m in messages])
    assert batch.malformed == 0
    assert batch.rows.to_pylist() == _expected_rows(messages)
    assert batch.message.dtype == np.int64 and batch.message.tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("wrong", [
    {"ts": "yesterday"},                                            # a header field
    {"anomalous": "no"},
    {"items": "a,b"},                                               # the item list
    {"items": [{"item_id": "a", "position": "first", "propensity": 0.5, "weight": 2.0, "label": 0.0}]},
])
def test_a_non_json_and_a_wrongly_typed_message_are_counted_and_the_others_kept(wrong):
    clicked, closed, rating = _messages()
    values = [dumps(clicked), b"this is not json", dumps(closed), dumps({**msgspec.to_builtins(closed), **wrong}),
              dumps(rating)]
    batch = decode_examples(values)
    assert batch.malformed == 2
    assert batch.rows.to_pylist() == _expected_rows([clicked, closed, rating])
    assert batch.message.tolist() == [0, 1, 1, 2]  # numbered among the messages kept


def test_empty_values_are_counted_as_malformed():
    clicked, _, rating = _messages()
    batch = decode_examples([None, dumps(clicked), b"", dumps(rating)])
    assert batch.malformed == 2 and batch.rows.column("item_id").to_pylist() == ["b", "z"]


def test_a_pretty_printed_message_with_raw_newlines_decodes():
    clicked, closed, rating = _messages()
    pretty = orjson.dumps(msgspec.to_builtins(closed), option=orjson.OPT_INDENT_2)
    assert b"\n" in pretty
    batch = decode_examples([dumps(clicked), pretty, dumps(rating) + b"\n"])
    assert batch.malformed == 0
    assert batch.rows.to_pylist() == _expected_rows([clicked, closed, rating])


def test_a_non_json_message_with_a_line_break_is_counted_as_malformed():
    clicked, _, rating = _messages()
    batch = decode_examples([dumps(clicked), b"{not\njson}", dumps(rating)])
    assert batch.malformed == 1 and batch.rows.column("item_id").to_pylist() == ["b", "z"]


def test_a_message_of_the_old_framing_is_counted_as_malformed():
    """One labelled item per message, without an item list: not an example of this framing."""
    clicked, _, _ = _messages()
    old = {"user_id": "u", "item_id": "a", "label": 1.0, "kind": "click", "event_id": "e9", "ts": 1.0}
    batch = decode_examples([dumps(old), dumps(clicked)])
    assert batch.malformed == 1 and batch.rows.num_rows == 1
