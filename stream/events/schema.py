"""The event contract's constants and reason codes, and the field tables of the detailed validator.

The compiled validator and the JSON Schema are the msgspec Structs of ``model``. msgspec stops at
the first violation and words it its own way; a dead letter needs every problem, each with a
field path and one of ``REASONS``. So the field tables (``COMMON``, ``BY_TYPE``, ``ITEM``) list
every field with whether it is required and its kind, and a kind's ``check`` names what is wrong
with one value, for ``validation._explain``, which runs only on events the Structs refuse.
tests/unit/test_events.py checks that both accept exactly the same events.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 65536
MAX_ID_CHARS = 256
MAX_SLATE = 1000
MAX_POSITION = 1000
# Epoch seconds below 1e11 (year 5138): a millisecond timestamp is a client bug, not a date.
MAX_TS = 1e11
# How far ``ts`` may lie ahead of the validating clock: one event from the future would move the
# worker's event-time watermark (DESIGN.md "Events"). The past is unbounded: replays are valid.
DEFAULT_MAX_FUTURE_S = 300.0
EVENT_TYPES = ("impression", "click", "rating")
POLICIES = ("greedy", "epsilon_greedy", "softmax", "uniform", "external")
# The fixed set of DLQ reasons, also the values of the ``reason`` metric label.
REASONS = (
    "too_large",
    "not_utf8",
    "not_json",
    "not_object",
    "unknown_type",
    "unsupported_schema_version",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "ts_in_future",
)
SCHEMA_PATH = Path(__file__).with_name("event.schema.json")

FLOAT_MAX = sys.float_info.max


def describe(value: Any) -> str:
    """A short rendering of a bad value for messages (bounded, whatever the value is)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return json_kind(value)


def json_kind(value: Any) -> str:
    """The JSON type name of a value (``number``, ``array``, ...), else its Python type name."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# A field kind checks one value: ``check`` returns None when it is valid, else a list of
# (sub-path, reason, message) relative to the field, e.g. ("[2].position", ...) for a slate.
Found = list[tuple[str, str, str]]


class Id:
    """A non-empty string of at most MAX_ID_CHARS characters."""

    def check(self, v: Any) -> Found | None:
        if isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS:
            return None
        if not isinstance(v, str):
            return [("", "wrong_type", f"must be a string, got {json_kind(v)}")]
        if not v:
            return [("", "invalid_value", "must not be empty")]
        return [("", "invalid_value", f"has {len(v)} characters, at most {MAX_ID_CHARS} allowed")]


class Number:
    """A finite JSON number (int or float, never bool) within optional bounds."""

    def __init__(
        self, low: float = -FLOAT_MAX, high: float = FLOAT_MAX, low_open: bool = False, high_open: bool = False
    ) -> None:
        # ``*_open`` makes that bound exclusive. The default bounds are the float range, so the
        # range test also rejects NaN, infinities and ints too large for a float.
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def _in_range(self, v: float) -> bool:
        return (self.low < v if self.low_open else self.low <= v) and (v < self.high if self.high_open else v <= self.high)

    def check(self, v: Any) -> Found | None:
        t = type(v)
        if (t is float or t is int) and self._in_range(v):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return [("", "wrong_type", f"must be a number, got {json_kind(v)}")]
        if self._in_range(v):  # an int or float subclass, e.g. numpy.float64
            return None
        return [("", "invalid_value", f"must be {self._range_text()}, got {describe(v)}")]

    def _range_text(self) -> str:
        low = None if self.low == -FLOAT_MAX else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high == FLOAT_MAX else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(["a finite number"] + [bound for bound in (low, high) if bound])


def is_integer(v: Any) -> bool:
    """An int or a subclass of it (an IntEnum: JSON writes it as its number), never a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


class Position:
    """A slate position: an integer (not bool, not 2.0) in 1..MAX_POSITION."""

    def check(self, v: Any) -> Found | None:
        if is_integer(v) and 1 <= v <= MAX_POSITION:
            return None
        if not is_integer(v):
            return [("", "wrong_type", f"must be an integer, got {describe(v)}")]
        return [("", "invalid_value", f"must be in 1..{MAX_POSITION}, got {v}")]


class Enum:
    """One of a fixed set of strings; ``reason`` is the code for a string outside the set."""

    def __init__(self, values: tuple[str, ...], reason: str = "invalid_value") -> None:
        self.values, self.allowed, self.reason = values, frozenset(values), reason

    def check(self, v: Any) -> Found | None:
        if isinstance(v, str) and v in self.allowed:
            return None
        if not isinstance(v, str):
            return [("", "wrong_type", f"must be a string, got {json_kind(v)}")]
        return [("", self.reason, f"must be one of {', '.join(self.values)}, got {describe(v)}")]


class SchemaVersion:
    """The integer SCHEMA_VERSION; another integer is a version this code cannot read."""

    def check(self, v: Any) -> Found | None:
        if is_integer(v) and v == SCHEMA_VERSION:
            return None
        if not is_integer(v):
            return [("", "wrong_type", f"must be an integer, got {describe(v)}")]
        return [("", "unsupported_schema_version", f"{v} is not supported (this reader knows {SCHEMA_VERSION})")]


class Object:
    """A JSON object with free-form content (its numbers are checked like every other number)."""

    def check(self, v: Any) -> Found | None:
        if isinstance(v, dict):
            return None
        return [("", "wrong_type", f"must be an object, got {json_kind(v)}")]


# A field table: (name, required, kind), checked in this order; the first problem's reason is the
# DLQ reason, so the envelope comes first.
Fields = tuple[tuple[str, bool, Any], ...]
_MISSING = object()


def check_fields(obj: dict, fields: Fields) -> Found | None:
    """Every problem of the fields of ``obj`` that ``fields`` lists, in table order; None if none."""
    found: Found | None = None
    for name, required, kind in fields:
        value = obj.get(name, _MISSING)
        if value is _MISSING:
            if required:
                found = found or []
                found.append((name, "missing_field", "is required"))
            continue
        bad = kind.check(value)
        if bad is not None:
            found = found or []
            found.extend((name + sub, reason, message) for sub, reason, message in bad)
    return found

ID = Id()
# Epoch seconds; how far ahead of the clock is ``validation``'s to check (it depends on the clock).
TS = Number(0.0, MAX_TS, high_open=True)
ITEM: Fields = (
    ("item_id", True, ID),
    ("position", True, Position()),
    ("propensity", True, Number(0.0, 1.0, low_open=True)),
    ("score", False, Number()),
)


class Slate:
    """The shown items: 1..MAX_SLATE objects with unique positions (gaps allowed: a logged slate
    may record only some positions, as the Open Bandit logs record one per row)."""

    def check(self, v: Any) -> Found | None:
        if not isinstance(v, list):
            return [("", "wrong_type", f"must be an array of items, got {json_kind(v)}")]
        if not 0 < len(v) <= MAX_SLATE:
            return [("", "invalid_value", f"must hold 1..{MAX_SLATE} items, got {len(v)}")]
        found: Found | None = None
        seen: set[int] = set()
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                found = found or []
                found.append((f"[{i}]", "wrong_type", f"must be an object, got {json_kind(item)}"))
                continue
            bad = check_fields(item, ITEM)
            if bad is not None:
                found = found or []
                found.extend((f"[{i}].{sub}", reason, message) for sub, reason, message in bad)
            position = item.get("position")
            if is_integer(position):
                if position in seen:
                    found = found or []
                    found.append((f"[{i}].position", "invalid_value", f"{position} is used by an earlier item"))
                seen.add(position)
        return found


COMMON: Fields = (
    ("schema_version", True, SchemaVersion()),
    ("type", True, Enum(EVENT_TYPES, reason="unknown_type")),
    ("event_id", True, ID),
    ("user_id", True, ID),
    ("ts", True, TS),
)
BY_TYPE: dict[str, Fields] = {
    "impression": (
        ("request_id", True, ID),
        ("model_version", True, ID),
        ("policy", True, Enum(POLICIES)),
        ("items", True, Slate()),
        ("surface", False, ID),
        ("context", False, Object()),
        ("variant", False, ID),  # the A/B variant that served the slate (serving.variants)
    ),
    "click": (
        ("request_id", True, ID),
        ("item_id", True, ID),
        ("position", False, Position()),
    ),
    "rating": (
        ("item_id", True, ID),
        ("value", True, Number()),
    ),
}
# The fields whose every value the field rules check, per type (``context`` is an object of
# anything, so it is not one of them): the values of any other field (``context``, unknown fields)
# are checked only for finite numbers, and ``encode`` picks its fast path by them.
CHECKED_FIELDS = {
    event_type: frozenset(name for name, _, kind in COMMON + fields if not isinstance(kind, Object))
    for event_type, fields in BY_TYPE.items()
}
CHECKED_ITEM_FIELDS = frozenset(name for name, _, _ in ITEM)
