"""The event contract (DESIGN.md "Events"): one definition, a fast validator, JSON Schema, codec.

Every event on the ``events`` topic is a UTF-8 JSON object of at most 64 KiB. The field tables
below (``_COMMON``, ``_BY_TYPE``, ``_ITEM``) are the single definition of the contract: the
detailed validator walks them, and ``json_schema()`` renders them as JSON Schema (draft 2020-12),
committed as ``stream/event.schema.json`` (``python -m stream.events --write-schema``).

The validator is on the stream worker's hot path (every event): ``_is_valid`` accepts a valid
event in a few inline comparisons per field (about 1 µs for a click, 4 µs for a 10-item slate);
only an event it does not accept is walked through the tables by ``_explain``, which reports every
problem with a field path (``items[2].propensity``) and a low-cardinality reason code. ``decode``
turns the first problem's reason into the DLQ reason (``streamrec_dlq_total{reason}``).

Unknown top-level and item fields are allowed and ignored (forward compatibility); an unknown
``type`` or ``schema_version`` is rejected, because its rules are not known here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import orjson

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 65536
MAX_ID_CHARS = 256
MAX_SLATE = 1000
MAX_POSITION = 1000
# Epoch seconds below 1e11 (year 5138): a millisecond timestamp is a client bug, not a date.
MAX_TS = 1e11
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
)
SCHEMA_PATH = Path(__file__).with_name("event.schema.json")

_FLOAT_MAX = sys.float_info.max
_MISSING = object()


class Problem(NamedTuple):
    """One violation: where (``items[2].propensity``), a reason code from ``REASONS``, and a message."""

    path: str
    reason: str
    message: str


class ValidationError(ValueError):
    """An event breaks the contract; ``problems`` lists every violation."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("invalid event: " + "; ".join(p.message for p in problems))


class InvalidEvent(ValidationError):
    """A Kafka message value that is not a valid event; ``reason`` is its DLQ reason."""

    def __init__(self, reason: str, detail: str, problems: list[Problem] | None = None) -> None:
        self.reason = reason
        self.detail = detail
        ValueError.__init__(self, f"{reason}: {detail}")  # not ValidationError's "invalid event: ..." text
        self.problems = problems if problems else [Problem("", reason, detail)]


def _describe(value: Any) -> str:
    """A short rendering of a bad value for messages (bounded, whatever the value is)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return _json_kind(value)


def _json_kind(value: Any) -> str:
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
# ``schema`` renders the same rule as JSON Schema.
_Found = list[tuple[str, str, str]]


class _Id:
    """A non-empty string of at most MAX_ID_CHARS characters."""

    def check(self, v: Any) -> _Found | None:
        if isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS:
            return None
        if not isinstance(v, str):
            return [("", "wrong_type", f"must be a string, got {_json_kind(v)}")]
        if not v:
            return [("", "invalid_value", "must not be empty")]
        return [("", "invalid_value", f"has {len(v)} characters, at most {MAX_ID_CHARS} allowed")]

    def schema(self) -> dict:
        return {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}


class _Number:
    """A finite JSON number (int or float, never bool) within optional bounds."""

    def __init__(
        self, low: float = -_FLOAT_MAX, high: float = _FLOAT_MAX, low_open: bool = False, high_open: bool = False
    ) -> None:
        # ``*_open`` makes that bound exclusive. The default bounds are the float range, so the
        # range test also rejects NaN, infinities and ints too large for a float.
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def _in_range(self, v: float) -> bool:
        return (self.low < v if self.low_open else self.low <= v) and (v < self.high if self.high_open else v <= self.high)

    def check(self, v: Any) -> _Found | None:
        t = type(v)
        if (t is float or t is int) and self._in_range(v):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return [("", "wrong_type", f"must be a number, got {_json_kind(v)}")]
        if self._in_range(v):  # an int or float subclass, e.g. numpy.float64
            return None
        return [("", "invalid_value", f"must be {self._range_text()}, got {_describe(v)}")]

    def _range_text(self) -> str:
        low = None if self.low == -_FLOAT_MAX else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high == _FLOAT_MAX else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(["a finite number"] + [bound for bound in (low, high) if bound])

    def schema(self) -> dict:
        out: dict[str, Any] = {"type": "number"}
        if self.low != -_FLOAT_MAX:
            out["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high != _FLOAT_MAX:
            out["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        return out


class _Position:
    """A slate position: an integer (not bool, not 2.0) in 1..MAX_POSITION."""

    def check(self, v: Any) -> _Found | None:
        if type(v) is int and 1 <= v <= MAX_POSITION:
            return None
        if type(v) is not int:
            return [("", "wrong_type", f"must be an integer, got {_describe(v)}")]
        return [("", "invalid_value", f"must be in 1..{MAX_POSITION}, got {v}")]

    def schema(self) -> dict:
        return {"type": "integer", "minimum": 1, "maximum": MAX_POSITION}


class _Enum:
    """One of a fixed set of strings; ``reason`` is the code for a string outside the set."""

    def __init__(self, values: tuple[str, ...], reason: str = "invalid_value") -> None:
        self.values, self.allowed, self.reason = values, frozenset(values), reason

    def check(self, v: Any) -> _Found | None:
        if isinstance(v, str) and v in self.allowed:
            return None
        if not isinstance(v, str):
            return [("", "wrong_type", f"must be a string, got {_json_kind(v)}")]
        return [("", self.reason, f"must be one of {', '.join(self.values)}, got {_describe(v)}")]

    def schema(self) -> dict:
        return {"type": "string", "enum": list(self.values)}


class _SchemaVersion:
    """The integer SCHEMA_VERSION; another integer is a version this code cannot read."""

    def check(self, v: Any) -> _Found | None:
        if type(v) is int and v == SCHEMA_VERSION:
            return None
        if type(v) is not int:
            return [("", "wrong_type", f"must be an integer, got {_describe(v)}")]
        return [("", "unsupported_schema_version", f"{v} is not supported (this reader knows {SCHEMA_VERSION})")]

    def schema(self) -> dict:
        return {"type": "integer", "const": SCHEMA_VERSION}


class _Object:
    """A JSON object with free-form content."""

    def check(self, v: Any) -> _Found | None:
        if isinstance(v, dict):
            return None
        return [("", "wrong_type", f"must be an object, got {_json_kind(v)}")]

    def schema(self) -> dict:
        return {"type": "object"}


# A field table: (name, required, kind), checked in this order; the first problem's reason is the
# DLQ reason, so the envelope comes first.
_Fields = tuple[tuple[str, bool, Any], ...]


def _check_fields(obj: dict, fields: _Fields) -> _Found | None:
    found: _Found | None = None
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


def _fields_schema(fields: _Fields) -> dict:
    return {
        "type": "object",
        "required": [name for name, required, _ in fields if required],
        "properties": {name: kind.schema() for name, _, kind in fields},
    }


_ID = _Id()
_POLICY_SET = frozenset(POLICIES)
_ITEM: _Fields = (
    ("item_id", True, _ID),
    ("position", True, _Position()),
    ("propensity", True, _Number(0.0, 1.0, low_open=True)),
    ("score", False, _Number()),
)


class _Slate:
    """The shown items: 1..MAX_SLATE objects with unique positions (gaps allowed: a logged slate
    may record only some positions, as the Open Bandit logs record one per row)."""

    def check(self, v: Any) -> _Found | None:
        if not isinstance(v, list):
            return [("", "wrong_type", f"must be an array of items, got {_json_kind(v)}")]
        if not 0 < len(v) <= MAX_SLATE:
            return [("", "invalid_value", f"must hold 1..{MAX_SLATE} items, got {len(v)}")]
        found: _Found | None = None
        seen: set[int] = set()
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                found = found or []
                found.append((f"[{i}]", "wrong_type", f"must be an object, got {_json_kind(item)}"))
                continue
            bad = _check_fields(item, _ITEM)
            if bad is not None:
                found = found or []
                found.extend((f"[{i}].{sub}", reason, message) for sub, reason, message in bad)
            position = item.get("position")
            if type(position) is int:
                if position in seen:
                    found = found or []
                    found.append((f"[{i}].position", "invalid_value", f"{position} is used by an earlier item"))
                seen.add(position)
        return found

    def schema(self) -> dict:
        return {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_SLATE,
            "items": _fields_schema(_ITEM),
            "description": "Shown items; positions are unique within the slate (not expressible in JSON Schema).",
        }


_COMMON: _Fields = (
    ("schema_version", True, _SchemaVersion()),
    ("type", True, _Enum(EVENT_TYPES, reason="unknown_type")),
    ("event_id", True, _ID),
    ("user_id", True, _ID),
    ("ts", True, _Number(0.0, MAX_TS, high_open=True)),
)
_BY_TYPE: dict[str, _Fields] = {
    "impression": (
        ("request_id", True, _ID),
        ("model_version", True, _ID),
        ("policy", True, _Enum(POLICIES)),
        ("items", True, _Slate()),
        ("surface", False, _ID),
        ("context", False, _Object()),
    ),
    "click": (
        ("request_id", True, _ID),
        ("item_id", True, _ID),
        ("position", False, _Position()),
    ),
    "rating": (
        ("item_id", True, _ID),
        ("value", True, _Number()),
    ),
}
# The fields whose every value the validator checks, per type (``context`` is an object of
# anything, so it is not one of them); ``encode`` uses them to pick its fast path.
_CHECKED_FIELDS = {
    event_type: frozenset(name for name, _, kind in _COMMON + fields if not isinstance(kind, _Object))
    for event_type, fields in _BY_TYPE.items()
}
_CHECKED_ITEM_FIELDS = frozenset(name for name, _, _ in _ITEM)


def _problems(found: _Found) -> list[Problem]:
    return [Problem(path, reason, f"{path}: {message}") for path, reason, message in found]


def validate(event: Any) -> list[Problem]:
    """Every way ``event`` breaks the contract, in field order; an empty list when it is valid."""
    return [] if _is_valid(event) else _explain(event)


def _explain(event: Any) -> list[Problem]:
    """The authoritative check: walks the field tables and names every problem."""
    if not isinstance(event, dict):
        return [Problem("", "not_object", f"an event must be a JSON object, got {_json_kind(event)}")]
    found = _check_fields(event, _COMMON)
    if found is not None and found[0][1] == "unsupported_schema_version":
        return _problems(found[:1])  # the other rules belong to a version this code does not know
    event_type = event.get("type")
    fields = _BY_TYPE.get(event_type) if isinstance(event_type, str) else None
    if fields is not None:
        more = _check_fields(event, fields)
        if more is not None:
            found = (found or []) + more
    return _problems(found) if found is not None else []


def _is_id(v: Any) -> bool:
    return type(v) is str and 0 < len(v) <= MAX_ID_CHARS


def _is_valid(e: Any) -> bool:
    """The hot path: True only for a valid event, in a few comparisons per field.

    It is the field tables' rules written out inline (exact builtin types only); whatever it does
    not accept goes to ``_explain``, which decides. tests/test_events.py checks both agree.
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
            return _is_id(e["item_id"]) and (type(value) is float or type(value) is int) and -_FLOAT_MAX <= value <= _FLOAT_MAX
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
            if not ((type(score) is float or type(score) is int) and -_FLOAT_MAX <= score <= _FLOAT_MAX):
                return False
        positions.add(position)
    return len(positions) == len(items)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decode_json = json.JSONDecoder(parse_constant=_reject_constant).decode


def decode(raw: bytes | None) -> dict:
    """Parse and validate one Kafka message value; raises ``InvalidEvent`` with its DLQ reason.

    The common case, a valid event, takes the fast path: orjson parses the bytes (UTF-8 checked,
    NaN, Infinity and unpaired surrogates refused) and ``_is_valid`` accepts the result. Anything
    else is parsed again by the standard library and explained by ``_explain``, so the dead-letter
    reasons do not depend on which parser saw the message first.
    """
    if raw is None:
        raise InvalidEvent("not_json", "the message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"{len(raw)} bytes, at most {MAX_EVENT_BYTES} allowed")
    try:
        event = orjson.loads(raw)
    except ValueError:  # orjson.JSONDecodeError: the exact reason comes from the slow path
        pass
    else:
        if _is_valid(event):
            return event
    return _decode_slow(raw)


def _decode_slow(raw: bytes) -> dict:
    """The authoritative decode: the standard library's parser, then every rule with its reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidEvent("not_utf8", str(err)) from None
    try:
        event = _decode_json(text)
    except (ValueError, RecursionError) as err:
        raise InvalidEvent("not_json", str(err)) from None
    problems = validate(event)
    if not problems and "\\u" in text and _has_lone_surrogate(event):
        problems = [Problem("", "invalid_value", "a string holds an unpaired \\u surrogate escape (not Unicode)")]
    if problems:
        raise InvalidEvent(problems[0].reason, "; ".join(p.message for p in problems), problems)
    return event


def _has_lone_surrogate(event: dict) -> bool:
    """JSON may escape half a UTF-16 pair ("\\ud800"); such a string cannot be written as UTF-8."""
    try:
        json.dumps(event, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def encode(event: dict) -> bytes:
    """Validate ``event`` and serialise it as compact UTF-8 JSON; raises ``ValidationError``.

    An event that holds only contract fields has had every value checked (strings, finite
    numbers, lists and dicts of them), and orjson writes it exactly as the standard library
    would, several times faster: the producer SDK encodes every event it sends. Anything else
    (``context``, unknown fields) may hold values the two libraries treat differently (orjson
    writes NaN as null and serialises datetimes), so it takes the standard library's strict path.
    """
    problems = validate(event)
    if problems:
        raise ValidationError(problems)
    raw = _encode_fast(event) or _encode_strict(event)
    if len(raw) > MAX_EVENT_BYTES:
        raise ValidationError([Problem("", "too_large", f"{len(raw)} bytes encoded, at most {MAX_EVENT_BYTES} allowed")])
    return raw


def _holds_only_contract_fields(event: dict) -> bool:
    if not event.keys() <= _CHECKED_FIELDS[event["type"]]:
        return False
    items = event.get("items")
    return items is None or all(map(_CHECKED_ITEM_FIELDS.issuperset, items))


def _encode_fast(event: dict) -> bytes | None:
    """orjson's encoding of an event that holds only contract fields; None for any other."""
    if not _holds_only_contract_fields(event):
        return None
    try:
        return orjson.dumps(event)
    except TypeError:  # a subclass of float, an int beyond 64 bits: the strict path decides
        return None


def _encode_strict(event: dict) -> bytes:
    try:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except TypeError as err:  # a value JSON cannot hold, e.g. a datetime inside ``context``
        raise ValidationError([Problem("", "wrong_type", f"not JSON-serialisable: {err}")]) from None
    except ValueError as err:  # NaN/Infinity inside ``context``, or an unpaired surrogate
        raise ValidationError([Problem("", "invalid_value", f"not valid JSON text: {err}")]) from None


def json_schema() -> dict:
    """The contract as JSON Schema (draft 2020-12), rendered from the same field tables."""
    common = _fields_schema(_COMMON)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:streamrec:event:1",
        "title": "streamrec event",
        "description": (
            f"One event on the events topic: a UTF-8 JSON object of at most {MAX_EVENT_BYTES} bytes. "
            "Unknown fields are allowed and ignored; numbers are finite and never booleans."
        ),
        **common,
        "allOf": [
            {
                "if": {"properties": {"type": {"const": event_type}}, "required": ["type"]},
                "then": _fields_schema(fields),
            }
            for event_type, fields in _BY_TYPE.items()
        ],
    }


def schema_text() -> str:
    """The exact contents of ``stream/event.schema.json``."""
    return json.dumps(json_schema(), indent=2) + "\n"


def new_event_id() -> str:
    return uuid.uuid4().hex


def impression(
    user_id: str,
    request_id: str,
    model_version: str,
    policy: str,
    items: list[dict],
    *,
    surface: str | None = None,
    context: dict | None = None,
    ts: float | None = None,
    event_id: str | None = None,
) -> dict:
    """An impression event; ``items`` are ``{item_id, position, propensity[, score]}`` dicts."""
    event = _envelope("impression", user_id, ts, event_id)
    event.update(request_id=request_id, model_version=model_version, policy=policy, items=items)
    if surface is not None:
        event["surface"] = surface
    if context is not None:
        event["context"] = context
    return event


def click(
    user_id: str,
    request_id: str,
    item_id: str,
    *,
    position: int | None = None,
    ts: float | None = None,
    event_id: str | None = None,
) -> dict:
    """A click on an item shown by impression ``request_id``."""
    event = _envelope("click", user_id, ts, event_id)
    event.update(request_id=request_id, item_id=item_id)
    if position is not None:
        event["position"] = position
    return event


def rating(user_id: str, item_id: str, value: float, *, ts: float | None = None, event_id: str | None = None) -> dict:
    """An explicit rating of an item."""
    event = _envelope("rating", user_id, ts, event_id)
    event.update(item_id=item_id, value=value)
    return event


def _envelope(event_type: str, user_id: str, ts: float | None, event_id: str | None) -> dict:
    return {
        "event_id": event_id if event_id is not None else new_event_id(),
        "type": event_type,
        "schema_version": SCHEMA_VERSION,
        "user_id": user_id,
        "ts": time.time() if ts is None else ts,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stream.events", description="Print or write the event JSON Schema.")
    parser.add_argument("--write-schema", action="store_true", help=f"write it to {SCHEMA_PATH}")
    args = parser.parse_args(argv)
    if args.write_schema:
        SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
        print(f"wrote {SCHEMA_PATH}")
    else:
        sys.stdout.write(schema_text())


if __name__ == "__main__":
    main()
