"""The event contract as msgspec Structs: the compiled validator and the source of the JSON Schema.

A tagged union on ``type`` (``Impression | Click | Rating``) with ``msgspec.Meta`` constraints
holds every per-field rule of DESIGN.md "Events"; msgspec checks them in C, without a Python
call per field or per shown item, so this is the validator of the hot paths (the worker's
``decode``, the SDK's ``encode``). ``validation`` adds what a Struct cannot say (unique
positions, ``ts`` against the clock, finite numbers inside ``context`` and unknown fields), and
``json_schema()`` renders these Structs as the committed ``event.schema.json``.

Unknown fields are ignored (forward compatibility). A Struct is only ever a verdict here:
events travel as the dicts they were, unknown fields included, and a decoded Struct is dropped at
once (``gc=False``: no cycle-collector tracking for objects that never hold a cycle).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from stream.events.schema import (
    DEFAULT_MAX_FUTURE_S,
    FLOAT_MAX,
    MAX_EVENT_BYTES,
    MAX_ID_CHARS,
    MAX_POSITION,
    MAX_SLATE,
    MAX_TS,
    POLICIES,
    REASONS,
    SCHEMA_VERSION,
)


Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
# The float range as bounds: msgspec then refuses NaN and the infinities too.
Finite = Annotated[float, Meta(ge=-FLOAT_MAX, le=FLOAT_MAX)]
Position = Annotated[int, Meta(ge=1, le=MAX_POSITION)]
Propensity = Annotated[float, Meta(gt=0.0, le=1.0)]
Timestamp = Annotated[float, Meta(
    ge=0.0, lt=MAX_TS,
    description=(
        "Epoch seconds. Any time in the past is valid (replays of old data); a time more than a "
        f"configured tolerance (default {DEFAULT_MAX_FUTURE_S:g} s) ahead of the validating clock "
        "is invalid (reason ts_in_future)."
    ),
)]


class Item(Struct, gc=False):
    """One shown item of a slate."""

    item_id: Id
    position: Position
    propensity: Propensity
    score: Finite | UnsetType = UNSET


Slate = Annotated[list[Item], Meta(
    min_length=1, max_length=MAX_SLATE,
    description="Shown items; positions are unique within the slate (not expressible in JSON Schema).",
)]


class _Envelope(Struct, tag_field="type", gc=False):
    schema_version: Literal[SCHEMA_VERSION]  # type: ignore[valid-type]
    event_id: Id
    user_id: Id
    ts: Timestamp


class Impression(_Envelope, tag="impression"):
    """A slate shown to a user."""

    request_id: Id
    model_version: Id
    policy: Literal[POLICIES]  # type: ignore[valid-type]
    items: Slate
    surface: Id | UnsetType = UNSET
    context: dict[str, Any] | UnsetType = UNSET
    variant: Id | UnsetType = UNSET  # the A/B variant that served the slate (serving.variants)


class Click(_Envelope, tag="click"):
    """A click on an item shown by impression ``request_id``."""

    request_id: Id
    item_id: Id
    position: Position | UnsetType = UNSET


class Rating(_Envelope, tag="rating"):
    """An explicit rating of an item."""

    item_id: Id
    value: Finite


Event = Impression | Click | Rating


# The worker's parse (``codec.decode``): the same Structs, refusing unknown fields. An event that
# has some takes the detailed path, which checks that their numbers are finite and then keeps only
# the contract's fields, in the classes above. A parsed event is an instance of a subclass here:
# read it by ``isinstance`` or ``EVENT_TYPE`` and compare events by their fields
# (``msgspec.to_builtins``), since msgspec's ``==`` also compares the class.
class ClosedItem(Item, forbid_unknown_fields=True):
    """A shown item with no field beyond the contract's."""


class ClosedImpression(Impression, tag="impression", forbid_unknown_fields=True):
    """An impression with no field beyond the contract's, in its items too."""

    items: Annotated[list[ClosedItem], Meta(min_length=1, max_length=MAX_SLATE)]


class ClosedClick(Click, tag="click", forbid_unknown_fields=True):
    """A click with no field beyond the contract's."""


class ClosedRating(Rating, tag="rating", forbid_unknown_fields=True):
    """A rating with no field beyond the contract's."""


ClosedEvent = ClosedImpression | ClosedClick | ClosedRating
# The ``type`` of an event by its class (msgspec keeps the tag on the class, not the instance).
EVENT_TYPE: dict[type, str] = {cls: cls.__struct_config__.tag for cls in (
    Impression, Click, Rating, ClosedImpression, ClosedClick, ClosedRating)}


def json_schema() -> dict:
    """The contract as JSON Schema (draft 2020-12), generated from the Structs by msgspec."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:streamrec:event:{SCHEMA_VERSION}",
        "title": "streamrec event",
        "description": (
            f"One event on the events topic: a UTF-8 JSON object of at most {MAX_EVENT_BYTES} bytes. "
            "Unknown fields are allowed and ignored; every number anywhere in the event (context, "
            "unknown fields and their nested values included) is finite, and a contract field's number "
            "is never a boolean. Invalid events go to events.dlq with one of the reasons: "
            f"{', '.join(REASONS)}."
        ),
        **msgspec.json.schema(Event),
    }


def schema_text() -> str:
    """The exact contents of ``stream/events/event.schema.json``."""
    return json.dumps(json_schema(), indent=2) + "\n"
