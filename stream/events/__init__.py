"""The event contract (DESIGN.md "Events"): one definition, one validator, JSON Schema, codec, builders.

Every event on the ``events`` topic is a UTF-8 JSON object of at most 64 KiB. The package's
modules, one job each:

- ``model``: the contract as msgspec Structs (a tagged union on ``type``), the compiled validator
  of the hot paths and the source of ``event.schema.json`` (``python -m stream.events
  --write-schema``);
- ``schema``: the constants, the DLQ reason codes and the field tables of the detailed validator;
- ``validation``: ``validate``, msgspec's check for valid events and a detailed path that names
  every problem with its field path and reason;
- ``codec``: ``decode`` (the worker, every message, into the Structs) and ``encode`` (the producer
  SDK, every send);
- ``builders``: ``impression``, ``click``, ``rating`` with the envelope filled in.

Unknown top-level and item fields are allowed and ignored (forward compatibility); an unknown
``type`` or ``schema_version`` is rejected, because its rules are not known here.

>>> from stream import events as ev
>>> raw = ev.encode(ev.rating("u1", "i1", 4.0, ts=0.0, event_id="e1"))
>>> event = ev.decode(raw)
>>> isinstance(event, ev.Rating), event.item_id, event.value
(True, 'i1', 4.0)
"""
from stream.events.builders import click, impression, new_event_id, rating
from stream.events.codec import decode, encode, to_event
from stream.events.errors import InvalidEvent, Problem, ValidationError
from stream.events.schema import (
    DEFAULT_MAX_FUTURE_S,
    EVENT_TYPES,
    MAX_EVENT_BYTES,
    MAX_ID_CHARS,
    MAX_POSITION,
    MAX_SLATE,
    MAX_TS,
    POLICIES,
    REASONS,
    SCHEMA_PATH,
    SCHEMA_VERSION,
)
from stream.events.model import EVENT_TYPE, Click, Event, Impression, Item, Rating, json_schema, schema_text
from stream.events.validation import validate

__all__ = [
    "DEFAULT_MAX_FUTURE_S", "EVENT_TYPES", "MAX_EVENT_BYTES", "MAX_ID_CHARS", "MAX_POSITION", "MAX_SLATE",
    "MAX_TS", "POLICIES", "REASONS", "SCHEMA_PATH", "SCHEMA_VERSION",
    "InvalidEvent", "Problem", "ValidationError", "EVENT_TYPE", "Click", "Event", "Impression", "Item", "Rating",
    "to_event",
    "click", "decode", "encode", "impression", "json_schema", "new_event_id", "rating", "schema_text", "validate",
]
