"""Builders of valid events for producers: the envelope (a fresh event_id, the time now) filled in."""
from __future__ import annotations

import time
import uuid

from stream.events.schema import SCHEMA_VERSION


def new_event_id() -> str:
    """A fresh, unique event id (32 hex digits)."""
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
    variant: str | None = None,
    ts: float | None = None,
    event_id: str | None = None,
) -> dict:
    """An impression event; ``items`` are ``{item_id, position, propensity[, score]}`` dicts;
    ``variant`` is the A/B variant serving named in its response, if any."""
    event = _envelope("impression", user_id, ts, event_id)
    event.update(request_id=request_id, model_version=model_version, policy=policy, items=items)
    if surface is not None:
        event["surface"] = surface
    if context is not None:
        event["context"] = context
    if variant is not None:
        event["variant"] = variant
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
