"""Event validation: msgspec's compiled check for the common, valid event, a detailed path that names every problem.

The validator is on the stream worker's hot path (every event) and the producer SDK's (every
send). ``accepts`` is the verdict: msgspec decodes the event's JSON against the Structs of
``model`` (every per-field rule, in C), and only what a Struct cannot say is checked here in
Python: unique positions within a slate and ``ts`` against the clock. Only an event it does not
accept is walked through the field tables (``schema``) by ``_explain``, which reports every
problem with a field path (``items[2].propensity``, ``context.x``) and a low-cardinality reason
code, so a dead letter's reason does not depend on which check saw it first.

Beyond the per-field rules, two rules hold for the whole event:

- ``ts`` may lie in the past without limit (replays of old data), but not more than
  ``max_future_s`` ahead of the validating clock (reason ``ts_in_future``);
- every number anywhere in it is finite, ``context``, unknown fields and their nested values
  included (reason ``invalid_value``): a number in no field table is checked for that alone.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgspec
import orjson

from stream.events.errors import Problem
from stream.events.model import Event
from stream.events.schema import (
    BY_TYPE,
    CHECKED_FIELDS,
    CHECKED_ITEM_FIELDS,
    COMMON,
    DEFAULT_MAX_FUTURE_S,
    FLOAT_MAX,
    ITEM,
    TS,
    Found,
    check_fields,
    describe,
    json_kind,
)

# msgspec's typed JSON decoder: raises unless the text is an ``Event`` (Struct rules, C code).
_STRUCT_DECODER = msgspec.json.Decoder(Event)
# What it raises on a text that is not an Event: msgspec's errors (ValueErrors), invalid UTF-8
# (UnicodeDecodeError, a ValueError) and nesting deeper than the interpreter's recursion limit.
NOT_AN_EVENT = (ValueError, RecursionError)


def validate(event: Any, *, now: float | None = None, max_future_s: float = DEFAULT_MAX_FUTURE_S) -> list[Problem]:
    """Every way ``event`` breaks the contract, in field order; an empty list when it is valid.

    ``now`` is the validating clock in epoch seconds (default: the wall clock); a ``ts`` more than
    ``max_future_s`` after it is ``ts_in_future`` (``math.inf`` turns the rule off).
    """
    now = time.time() if now is None else now
    return [] if _is_valid(event, now + max_future_s) else _explain(event, now, max_future_s)


def _explain(event: Any, now: float, max_future_s: float) -> list[Problem]:
    """The authoritative check: walks the field tables and names every problem."""
    if not isinstance(event, dict):
        return [Problem("", "not_object", f"an event must be a JSON object, got {json_kind(event)}")]
    found = check_fields(event, COMMON) or []
    if found and found[0][1] == "unsupported_schema_version":
        return _problems(found[:1])  # the other rules belong to a version this code does not know
    ts = event.get("ts")
    if ts is not None and TS.check(ts) is None and ts > now + max_future_s:
        found.append(("ts", "ts_in_future",
                      f"is {describe(ts)}, {ts - now:.0f} s ahead of the validating clock; "
                      f"at most {max_future_s:g} s allowed"))
    event_type = event.get("type")
    fields = BY_TYPE.get(event_type) if isinstance(event_type, str) else None
    if fields is not None:
        found += check_fields(event, fields) or []
        found += [(path, "invalid_value", f"must be a finite number, got {describe(value)}")
                  for path, value in _non_finite_outside_tables(event)]
    return _problems(found)


def _problems(found: Found) -> list[Problem]:
    return [Problem(path, reason, f"{path}: {message}") for path, reason, message in found]


def _non_finite_outside_tables(event: dict) -> Iterator[tuple[str, Any]]:
    """(path, value) of every non-finite number in the fields no table checks: ``context``,
    unknown top-level fields and unknown item fields. ``event["type"]`` is a known type."""
    checked = CHECKED_FIELDS[event["type"]]
    for key, value in event.items():
        if key not in checked:
            yield from _non_finite(value, str(key))
    items = event.get("items") if "items" in checked else None  # a slate, not an unknown field
    if isinstance(items, list):
        for i, item in enumerate(items):
            if isinstance(item, dict):
                for key, value in item.items():
                    if key not in CHECKED_ITEM_FIELDS:
                        yield from _non_finite(value, f"items[{i}].{key}")


def _non_finite(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, number) of every number in ``value`` (nested objects and arrays included) that is not
    a finite float: NaN, the infinities, ints too large for a float. In document order; iterative,
    so nesting as deep as the parser allows does not exhaust the stack."""
    stack = [(path, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            stack += reversed([(f"{path}.{key}", nested) for key, nested in v.items()])
        elif isinstance(v, (list, tuple)):
            stack += reversed([(f"{path}[{i}]", nested) for i, nested in enumerate(v)])
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and not -FLOAT_MAX <= v <= FLOAT_MAX:
            yield path, v


def accepts(raw: bytes, event: dict, ts_limit: float) -> bool:
    """True only if JSON text ``raw`` is a valid event whose ``ts`` is at most ``ts_limit``;
    ``event`` is ``raw`` parsed (for the two rules a Struct cannot hold).

    Numbers outside the Structs' fields (``context``, unknown fields) are not checked here: what
    orjson parses is finite already, and ``_finite_outside_tables`` checks an event built in Python.
    """
    return is_event_text(raw) and holds_clock_and_slate_rules(event, ts_limit)


def is_event_text(raw: bytes) -> bool:
    """Whether msgspec decodes JSON text ``raw`` as an ``Event``: every per-field rule holds."""
    try:
        _STRUCT_DECODER.decode(raw)
    except NOT_AN_EVENT:
        return False
    return True


def holds_clock_and_slate_rules(event: dict, ts_limit: float) -> bool:
    """The rules a Struct cannot hold, for an event whose fields msgspec accepted: ``ts`` at most
    ``ts_limit`` and, for an impression, unique positions."""
    if not event["ts"] <= ts_limit:
        return False
    if event["type"] != "impression":
        return True
    items = event["items"]
    return len({item["position"] for item in items}) == len(items)


def _is_valid(e: Any, ts_limit: float) -> bool:
    """The hot path for an event built in Python: True only for a valid event whose ``ts`` is at
    most ``ts_limit``. Whatever it does not accept goes to ``_explain``, which decides;
    tests/unit/test_events.py checks both agree."""
    raw = to_json(e)
    return raw is not None and accepts(raw, e, ts_limit) and _finite_outside_tables(e)


def to_json(e: Any) -> bytes | None:
    """orjson's encoding of ``e``; None where it refuses (a float subclass, an int beyond 64 bits,
    an unpaired surrogate, a key that is not a string), which the detailed path then decides.
    orjson writes NaN and the infinities as null, which no contract number accepts."""
    if not isinstance(e, dict):  # orjson also writes dataclasses as objects
        return None
    try:
        return orjson.dumps(e)
    except TypeError:  # orjson.JSONEncodeError
        return None


def holds_only_table_fields(event: dict) -> bool:
    """Whether every field of a valid ``event`` (and of its items) is in a field table."""
    if not event.keys() <= CHECKED_FIELDS[event["type"]]:
        return False
    items = event.get("items")
    return items is None or _items_hold_only_table_fields(items)


# A valid item holds every required item field, so it holds another field exactly when it has
# more keys than that and its optional one (counted, not compared: this runs once per shown item).
_N_REQUIRED_ITEM_FIELDS = sum(required for _, required, _ in ITEM)
(_OPTIONAL_ITEM_FIELD,) = [name for name, required, _ in ITEM if not required]


def _items_hold_only_table_fields(items: list[dict]) -> bool:
    for item in items:
        if len(item) != _N_REQUIRED_ITEM_FIELDS + (_OPTIONAL_ITEM_FIELD in item):
            return False
    return True


def _finite_outside_tables(e: dict) -> bool:
    """``_non_finite_outside_tables`` finds nothing, for an event whose table fields are valid
    (the same walk without the paths, and only over the fields outside the tables)."""
    checked = CHECKED_FIELDS[e["type"]]
    extra = e.keys() - checked
    if extra and not all(_all_finite(e[key]) for key in extra):
        return False
    items = e.get("items") if "items" in checked else None
    if items is None or _items_hold_only_table_fields(items):
        return True
    return all(_all_finite(item[key]) for item in items for key in item.keys() - CHECKED_ITEM_FIELDS)


def _all_finite(value: Any) -> bool:
    """Whether ``_non_finite`` finds nothing in ``value``."""
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is str or t is bool or v is None:
            continue
        if t is float or t is int:
            if not -FLOAT_MAX <= v <= FLOAT_MAX:
                return False
        elif isinstance(v, dict):
            stack += v.values()
        elif isinstance(v, (list, tuple)):
            stack += v
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and not -FLOAT_MAX <= v <= FLOAT_MAX:
            return False
    return True
