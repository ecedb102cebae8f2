"""Event validation: a fast path for the common, valid event and a detailed path that names every problem.

The validator is on the stream worker's hot path (every event) and the producer SDK's (every
send): ``_is_valid`` accepts a valid event in a few inline comparisons per field (about 1 µs for a
click, 4 µs for a 10-item slate); only an event it does not accept is walked through the field
tables (``schema``) by ``_explain``, which reports every problem with a field path
(``items[2].propensity``, ``context.x``) and a low-cardinality reason code.

Beyond the field tables, two rules hold for the whole event:

- ``ts`` may lie in the past without limit (replays of old data), but not more than
  ``max_future_s`` ahead of the validating clock (reason ``ts_in_future``);
- every number anywhere in it is finite, ``context``, unknown fields and their nested values
  included (reason ``invalid_value``): a number in no field table is checked for that alone.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from stream.events.errors import Problem
from stream.events.schema import (
    BY_TYPE,
    CHECKED_FIELDS,
    CHECKED_ITEM_FIELDS,
    COMMON,
    DEFAULT_MAX_FUTURE_S,
    FLOAT_MAX,
    ITEM,
    MAX_ID_CHARS,
    MAX_POSITION,
    MAX_SLATE,
    MAX_TS,
    POLICIES,
    SCHEMA_VERSION,
    TS,
    Found,
    check_fields,
    describe,
    json_kind,
)

_POLICY_SET = frozenset(POLICIES)


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


def _is_id(v: Any) -> bool:
    return type(v) is str and 0 < len(v) <= MAX_ID_CHARS


def _is_valid(e: Any, ts_limit: float) -> bool:
    """The hot path: True only for a valid event whose ``ts`` is at most ``ts_limit``."""
    return _fields_valid(e, ts_limit) and _finite_outside_tables(e)


def _fields_valid(e: Any, ts_limit: float) -> bool:
    """True only if every field of the tables is valid and ``ts`` is at most ``ts_limit``.

    It is the field tables' rules written out inline (exact builtin types only); whatever it does
    not accept goes to ``_explain``, which decides. tests/unit/test_events.py checks both agree.
    On its own it is the whole check of what orjson parsed: orjson refuses NaN, Infinity and
    numbers that overflow a double, so every number it returns is finite.
    """
    try:
        version, event_type, ts = e["schema_version"], e["type"], e["ts"]
        if not (
            type(version) is int
            and version == SCHEMA_VERSION
            and _is_id(e["event_id"])
            and _is_id(e["user_id"])
            and (type(ts) is float or type(ts) is int)
            and 0.0 <= ts < MAX_TS
            and ts <= ts_limit
        ):
            return False
        if event_type == "impression":
            return _is_valid_impression(e)
        if event_type == "click":
            position = e.get("position", 1)
            return (
                _is_id(e["request_id"])
                and _is_id(e["item_id"])
                and type(position) is int
                and 1 <= position <= MAX_POSITION
            )
        if event_type == "rating":
            value = e["value"]
            return _is_id(e["item_id"]) and (type(value) is float or type(value) is int) and -FLOAT_MAX <= value <= FLOAT_MAX
        return False
    except (KeyError, TypeError):  # a missing field, or not a dict at all
        return False


def _is_valid_impression(e: dict) -> bool:
    items, policy = e["items"], e["policy"]
    if not (
        _is_id(e["request_id"])
        and _is_id(e["model_version"])
        and type(policy) is str
        and policy in _POLICY_SET
        and type(items) is list
        and 0 < len(items) <= MAX_SLATE
        and ("surface" not in e or _is_id(e["surface"]))
        and ("context" not in e or type(e["context"]) is dict)
    ):
        return False
    positions = set()
    for item in items:
        if type(item) is not dict:
            return False
        item_id, position, propensity = item["item_id"], item["position"], item["propensity"]
        if not (  # _is_id inlined: this loop runs once per shown item
            type(item_id) is str
            and 0 < len(item_id) <= MAX_ID_CHARS
            and type(position) is int
            and 1 <= position <= MAX_POSITION
            and (type(propensity) is float or type(propensity) is int)
            and 0.0 < propensity <= 1.0
        ):
            return False
        if "score" in item:
            score = item["score"]
            if not ((type(score) is float or type(score) is int) and -FLOAT_MAX <= score <= FLOAT_MAX):
                return False
        positions.add(position)
    return len(positions) == len(items)


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
