"""Bytes to events and back: ``decode`` for the worker (every Kafka message), ``encode`` for the SDK.

Both validate with ``validation`` and both have a fast path for the common, valid event
(msgspec's compiled Structs of ``model``: the worker's parse, the SDK's check of orjson's text) and
a strict path through the standard library that decides every other case, so that a dead letter's
reason never depends on which parser saw the message first. ``decode`` turns the first problem's
reason into the DLQ reason (``streamrec_dlq_total{reason}``).
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import msgspec
from msgspec import UNSET

from stream.events.errors import InvalidEvent, Problem, ValidationError
from stream.events.model import ClosedEvent, Event, ClosedImpression
from stream.events.schema import DEFAULT_MAX_FUTURE_S, MAX_EVENT_BYTES
from stream.events.validation import (
    NOT_AN_EVENT,
    _all_finite,
    _explain,
    _finite_outside_tables,
    accepts,
    holds_only_table_fields,
    to_json,
    validate,
)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decode_json = json.JSONDecoder(parse_constant=_reject_constant).decode


def decode(raw: bytes | None, *, now: float | None = None, max_future_s: float = DEFAULT_MAX_FUTURE_S) -> Event:
    """Parse and validate one Kafka message value into its ``Event`` Struct; raises ``InvalidEvent``
    with its DLQ reason.

    ``now`` and ``max_future_s`` are the validating clock and tolerance of ``validate``; the worker
    reads its clock once per batch and passes it.

    The common case, a valid event without unknown fields, is parsed once: msgspec decodes the
    bytes into the Structs (every per-field rule, UTF-8, finite numbers, in C) and
    ``_holds_struct_rules`` checks the rest. Anything else is parsed again by the standard library
    and explained; a valid event with unknown fields is kept without them (the contract ignores
    them). The Struct's optional fields are ``UNSET`` where the event left them out, and an
    integer in a float field reads as a float, as the log stores it.
    """
    if raw is None:
        raise InvalidEvent("not_json", "the message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"{len(raw)} bytes, at most {MAX_EVENT_BYTES} allowed")
    if now is None:
        now = time.time()
    try:
        event = _PARSE(raw)
    except NOT_AN_EVENT:
        pass
    else:
        if _holds_struct_rules(event, now + max_future_s):
            return event
    return msgspec.convert(_decode_slow(raw, now, max_future_s), Event)


_PARSE = msgspec.json.Decoder(ClosedEvent).decode


def to_event(event: dict) -> Event:
    """An event built in Python (``builders``, a test's dictionary) as the Struct ``decode`` gives,
    after ``encode``'s validation; raises ``ValidationError``."""
    return decode(encode(event, max_future_s=math.inf), max_future_s=math.inf)


def _holds_struct_rules(event: Event, ts_limit: float) -> bool:
    """The rules a Struct cannot hold (``validation.holds_clock_and_slate_rules``) for a parsed event,
    and finite numbers in ``context``."""
    if not event.ts <= ts_limit:
        return False
    if type(event) is not ClosedImpression:  # the parse gives these classes; ``isinstance`` costs 6x more
        return True
    items = event.items
    if len({item.position for item in items}) != len(items):
        return False
    return event.context is UNSET or _all_finite(event.context)


def _decode_slow(raw: bytes, now: float, max_future_s: float) -> dict:
    """The authoritative decode: the standard library's parser, then every rule with its reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidEvent("not_utf8", str(err)) from None
    try:
        event = _decode_json(text)
    except (ValueError, RecursionError) as err:
        raise InvalidEvent("not_json", str(err)) from None
    problems = validate(event, now=now, max_future_s=max_future_s)
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


def encode(event: dict, *, now: float | None = None, max_future_s: float = DEFAULT_MAX_FUTURE_S) -> bytes:
    """Validate ``event`` and serialise it as compact UTF-8 JSON; raises ``ValidationError``.

    ``now`` and ``max_future_s`` are the validating clock and tolerance of ``validate``.

    orjson writes the event and msgspec's Struct check reads that text back (``accepts``). An
    event it accepts that holds nothing but table fields has had every value checked (strings,
    finite numbers, lists and dicts of them), so orjson's text is exactly what the standard
    library would write, several times faster; the producer SDK encodes every event it sends.
    Anything else (``context``, unknown fields) is validated in full and may hold values the two
    libraries treat differently (orjson serialises datetimes), so it takes the standard library's
    strict path.
    """
    if now is None:
        now = time.time()
    fast = to_json(event)
    if fast is None or not accepts(fast, event, now + max_future_s):
        problems = _explain(event, now, max_future_s)  # empty for valid subclasses of str, float, ...
        if problems:
            raise ValidationError(problems)
        raw = _encode_strict(event)
    elif holds_only_table_fields(event):
        raw = fast
    elif _finite_outside_tables(event):
        raw = _encode_strict(event)
    else:
        raise ValidationError(_explain(event, now, max_future_s))
    if len(raw) > MAX_EVENT_BYTES:
        raise ValidationError([Problem("", "too_large", f"{len(raw)} bytes encoded, at most {MAX_EVENT_BYTES} allowed")])
    return raw


def _encode_strict(event: dict) -> bytes:
    try:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except TypeError as err:  # a value JSON cannot hold, e.g. a datetime inside ``context``
        raise ValidationError([Problem("", "wrong_type", f"not JSON-serialisable: {err}")]) from None
    except ValueError as err:  # an unpaired surrogate (non-finite numbers are refused by ``validate``)
        raise ValidationError([Problem("", "invalid_value", f"not valid JSON text: {err}")]) from None
