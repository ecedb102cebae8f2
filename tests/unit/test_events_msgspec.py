"""The compiled validator (msgspec Structs, ``stream.events.model``): valid events take its path,
the rules a Struct cannot hold are checked after it, and the JSON Schema comes from the Structs."""
from __future__ import annotations

import dataclasses
import enum
import json

import msgspec
import pytest

from stream import events
from stream.events import InvalidEvent, ValidationError, codec, decode, encode, validate
from stream.events.__main__ import main as events_cli
from stream.events.model import Event, Impression
from stream.events.validation import accepts

NOW = 1.8e9


def make_impression(n_items: int = 3) -> dict:
    items = [{"item_id": f"i{k}", "position": k + 1, "propensity": 0.5} for k in range(n_items)]
    return events.impression("u1", "r1", "m1", "softmax", items, context={"hour": 3}, variant="b", ts=1.7e9)


def test_a_valid_event_is_decoded_by_the_compiled_path_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the detailed path taken away, valid events still decode, context and variant kept; a
    valid event with unknown fields takes the detailed path and decodes without them."""
    def no_slow_path(*args: object) -> dict:
        raise AssertionError("the detailed path ran for a valid event")

    monkeypatch.setattr(codec, "_decode_slow", no_slow_path)
    impression = make_impression()
    for event in (impression, events.click("u1", "r1", "i1", ts=1.7e9), events.rating("u1", "i1", 4, ts=1.7e9)):
        assert msgspec.to_builtins(decode(json.dumps(event).encode(), now=NOW)) == event
    with_unknown = json.dumps(impression | {"experiment": {"arm": 2}}).encode()
    with pytest.raises(AssertionError, match="the detailed path ran"):
        decode(with_unknown, now=NOW)
    monkeypatch.undo()
    assert msgspec.to_builtins(decode(with_unknown, now=NOW)) == impression


def test_the_structs_type_every_event_and_ignore_unknown_fields() -> None:
    raw = json.dumps(make_impression() | {"experiment": "x"}).encode()
    decoded = msgspec.json.decode(raw, type=Event)
    assert isinstance(decoded, Impression) and decoded.variant == "b" and decoded.items[2].position == 3


@pytest.mark.parametrize(
    ("change", "reason", "path"),
    [
        (lambda e: e["items"][2].update(position=1), "invalid_value", "items[2].position"),
        (lambda e: e.update(ts=NOW + 301.0), "ts_in_future", "ts"),
    ],
)
def test_rules_a_struct_cannot_hold_are_checked_after_it(change, reason: str, path: str) -> None:
    """msgspec accepts duplicate positions and a future ts; ``accepts`` and the worker's decode do not."""
    event = make_impression()
    change(event)
    raw = json.dumps(event).encode()
    msgspec.json.decode(raw, type=Event)  # the Structs alone let it through
    assert not accepts(raw, event, NOW + events.DEFAULT_MAX_FUTURE_S)
    with pytest.raises(InvalidEvent) as err:
        decode(raw, now=NOW)
    assert err.value.reason == reason and [p.path for p in err.value.problems] == [path]


def test_an_int_enum_position_is_an_integer_everywhere() -> None:
    class Slot(enum.IntEnum):
        TOP = 1

    event = make_impression(1)
    event["items"][0]["position"] = Slot.TOP
    assert validate(event, now=NOW) == []
    assert json.loads(encode(event, now=NOW))["items"][0]["position"] == 1
    event["items"][0]["propensity"] = 2.0  # with another problem, the detailed path names only that one
    assert [(p.path, p.reason) for p in validate(event, now=NOW)] == [("items[0].propensity", "invalid_value")]


def test_an_object_that_is_not_a_dict_is_not_an_event() -> None:
    """orjson writes a dataclass as a JSON object; the SDK still refuses it as ``not_object``."""
    @dataclasses.dataclass
    class Rating:
        event_id: str = "e1"
        type: str = "rating"
        schema_version: int = 1
        user_id: str = "u1"
        ts: float = 1.7e9
        item_id: str = "i1"
        value: float = 4.0

    with pytest.raises(ValidationError) as err:
        encode(Rating(), now=NOW)  # type: ignore[arg-type]
    assert [(p.path, p.reason) for p in err.value.problems] == [("", "not_object")]


def test_the_cli_prints_the_schema_generated_from_the_structs(capsys: pytest.CaptureFixture[str]) -> None:
    events_cli([])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(events.SCHEMA_PATH.read_text(encoding="utf-8"))
    assert printed["$defs"]["Impression"]["properties"]["items"]["maxItems"] == events.MAX_SLATE
    assert printed["$defs"]["Rating"]["properties"]["value"]["type"] == "number"


def test_the_structs_and_the_field_tables_name_the_same_fields() -> None:
    """The Structs decide validity and the tables explain it: a field in one only would go unchecked
    by the other (the agreement tests mutate only the fields their fixtures carry)."""
    from stream.events.model import Click, Item, Rating
    from stream.events.schema import BY_TYPE, COMMON, ITEM

    def names(struct: type) -> set[str]:
        return {f.encode_name for f in msgspec.structs.fields(struct)} | {"type"}

    for event_type, struct in (("impression", Impression), ("click", Click), ("rating", Rating)):
        assert names(struct) == {name for name, _, _ in COMMON + BY_TYPE[event_type]}, event_type
        required = {f.encode_name for f in msgspec.structs.fields(struct) if f.required} | {"type"}
        assert required == {name for name, req, _ in COMMON + BY_TYPE[event_type] if req}, event_type
    assert names(Item) - {"type"} == {name for name, _, _ in ITEM}
