"""The event contract: every rule and reason code, decode/encode, the committed JSON Schema, and
agreement between the fast path and the detailed validator."""
from __future__ import annotations

import copy
import json
import random

import msgspec
import numpy as np
import pytest

from stream import events
from stream.events import codec, validation
from stream.events import (
    DEFAULT_MAX_FUTURE_S,
    MAX_EVENT_BYTES,
    REASONS,
    InvalidEvent,
    Problem,
    ValidationError,
    decode,
    encode,
    validate,
)


# The validating clock of the tests that pin it: later than every fixture's ts.
NOW = 1.8e9


def make_impression(n_items: int = 3) -> dict:
    items = [{"item_id": f"i{k}", "position": k + 1, "propensity": 0.5, "score": 0.25} for k in range(n_items)]
    return events.impression("u1", "r1", "m1", "epsilon_greedy", items, surface="home", context={"device": "ios"}, ts=1.7e9)


def make_click() -> dict:
    return events.click("u1", "r1", "i1", position=2, ts=1.7e9)


def make_rating() -> dict:
    return events.rating("u1", "i1", 4.5, ts=1.7e9)


def problems_of(event: dict) -> list[tuple[str, str]]:
    return [(p.path, p.reason) for p in validate(event)]


def with_(event: dict, path: str, value: object) -> dict:
    """A copy of ``event`` with ``path`` ("ts", "items.1.propensity") set, or deleted for DELETE."""
    out = copy.deepcopy(event)
    *parents, last = path.split(".")
    target = out
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    key = int(last) if isinstance(target, list) else last
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    return out


DELETE = object()


def decoded(raw: bytes, **kwargs) -> dict:
    """``decode``'s Struct as the dictionary of JSON (``type`` included, fields left out absent)."""
    return msgspec.to_builtins(decode(raw, **kwargs))


@pytest.mark.parametrize("event", [make_impression(), make_impression(1000), make_click(), make_rating()])
def test_valid_events_have_no_problems(event: dict) -> None:
    assert validate(event) == []
    assert decoded(encode(event)) == event


def test_helpers_fill_the_envelope() -> None:
    event = events.rating("u1", "i1", 3.0)
    assert event["schema_version"] == 1 and event["type"] == "rating"
    assert len(event["event_id"]) == 32 and event["event_id"] != events.rating("u1", "i1", 3.0)["event_id"]
    assert isinstance(event["ts"], float)
    assert "position" not in events.click("u1", "r1", "i1")
    assert validate(events.click("u1", "r1", "i1")) == []


def test_optional_fields_may_be_absent_and_unknown_fields_are_ignored() -> None:
    event = make_impression()
    for key in ("surface", "context"):
        del event[key]
    del event["items"][0]["score"]
    event["experiment"] = {"arm": "b"}
    event["items"][1]["extra"] = [1, 2]
    assert validate(event) == []


def test_a_logged_slate_may_skip_positions() -> None:
    event = with_(make_impression(1), "items.0.position", 3)  # OBD: one item at position 3
    assert validate(event) == []


@pytest.mark.parametrize(
    ("make", "path", "value", "expected"),
    [
        # envelope
        (make_rating, "event_id", DELETE, ("event_id", "missing_field")),
        (make_rating, "event_id", "", ("event_id", "invalid_value")),
        (make_rating, "event_id", "x" * 257, ("event_id", "invalid_value")),
        (make_rating, "event_id", 17, ("event_id", "wrong_type")),
        (make_rating, "user_id", None, ("user_id", "wrong_type")),
        (make_rating, "user_id", "", ("user_id", "invalid_value")),
        (make_rating, "type", DELETE, ("type", "missing_field")),
        (make_rating, "type", "purchase", ("type", "unknown_type")),
        (make_rating, "type", ["rating"], ("type", "wrong_type")),
        (make_rating, "schema_version", DELETE, ("schema_version", "missing_field")),
        (make_rating, "schema_version", 2, ("schema_version", "unsupported_schema_version")),
        (make_rating, "schema_version", "1", ("schema_version", "wrong_type")),
        (make_rating, "schema_version", True, ("schema_version", "wrong_type")),
        (make_rating, "schema_version", 1.0, ("schema_version", "wrong_type")),
        (make_rating, "ts", DELETE, ("ts", "missing_field")),
        (make_rating, "ts", "1700000000", ("ts", "wrong_type")),
        (make_rating, "ts", True, ("ts", "wrong_type")),
        (make_rating, "ts", float("nan"), ("ts", "invalid_value")),
        (make_rating, "ts", float("inf"), ("ts", "invalid_value")),
        (make_rating, "ts", -1.0, ("ts", "invalid_value")),
        (make_rating, "ts", 1.7e12, ("ts", "invalid_value")),  # milliseconds
        (make_rating, "ts", 10**400, ("ts", "invalid_value")),
        # rating
        (make_rating, "item_id", DELETE, ("item_id", "missing_field")),
        (make_rating, "value", DELETE, ("value", "missing_field")),
        (make_rating, "value", False, ("value", "wrong_type")),
        (make_rating, "value", "4", ("value", "wrong_type")),
        (make_rating, "value", float("-inf"), ("value", "invalid_value")),
        (make_rating, "value", 10**400, ("value", "invalid_value")),
        # click
        (make_click, "request_id", DELETE, ("request_id", "missing_field")),
        (make_click, "item_id", 5, ("item_id", "wrong_type")),
        (make_click, "position", 0, ("position", "invalid_value")),
        (make_click, "position", 1001, ("position", "invalid_value")),
        (make_click, "position", 2.0, ("position", "wrong_type")),
        (make_click, "position", True, ("position", "wrong_type")),
        (make_click, "position", None, ("position", "wrong_type")),
        # impression
        (make_impression, "request_id", "r" * 300, ("request_id", "invalid_value")),
        (make_impression, "model_version", DELETE, ("model_version", "missing_field")),
        (make_impression, "policy", "random", ("policy", "invalid_value")),
        (make_impression, "policy", 3, ("policy", "wrong_type")),
        (make_impression, "surface", "", ("surface", "invalid_value")),
        (make_impression, "surface", None, ("surface", "wrong_type")),
        (make_impression, "context", [], ("context", "wrong_type")),
        (make_impression, "items", DELETE, ("items", "missing_field")),
        (make_impression, "items", [], ("items", "invalid_value")),
        (make_impression, "items", {"0": {}}, ("items", "wrong_type")),
        (make_impression, "items.1", "i1", ("items[1]", "wrong_type")),
        (make_impression, "items.2.item_id", DELETE, ("items[2].item_id", "missing_field")),
        (make_impression, "items.2.item_id", "", ("items[2].item_id", "invalid_value")),
        (make_impression, "items.2.position", DELETE, ("items[2].position", "missing_field")),
        (make_impression, "items.2.position", 0, ("items[2].position", "invalid_value")),
        (make_impression, "items.2.position", 1001, ("items[2].position", "invalid_value")),
        (make_impression, "items.2.position", "3", ("items[2].position", "wrong_type")),
        (make_impression, "items.2.position", 1, ("items[2].position", "invalid_value")),  # duplicate
        (make_impression, "items.2.propensity", DELETE, ("items[2].propensity", "missing_field")),
        (make_impression, "items.2.propensity", 0, ("items[2].propensity", "invalid_value")),
        (make_impression, "items.2.propensity", 0.0, ("items[2].propensity", "invalid_value")),
        (make_impression, "items.2.propensity", -0.1, ("items[2].propensity", "invalid_value")),
        (make_impression, "items.2.propensity", 1.0000001, ("items[2].propensity", "invalid_value")),
        (make_impression, "items.2.propensity", True, ("items[2].propensity", "wrong_type")),
        (make_impression, "items.2.propensity", float("nan"), ("items[2].propensity", "invalid_value")),
        (make_impression, "items.2.score", None, ("items[2].score", "wrong_type")),
        (make_impression, "items.2.score", float("inf"), ("items[2].score", "invalid_value")),
    ],
)
def test_each_rule(make, path: str, value: object, expected: tuple[str, str]) -> None:
    event = with_(make(), path, value)
    assert problems_of(event) == [expected]
    message = validate(event)[0].message
    assert message.startswith(f"{expected[0]}: ")
    try:
        raw = json.dumps(event, allow_nan=False).encode()
    except ValueError:
        return  # NaN and infinities have no JSON form; decode's not_json cases cover their literals
    with pytest.raises(InvalidEvent) as err:
        decode(raw)
    assert err.value.reason == expected[1]


def test_propensity_one_and_integer_values_are_valid() -> None:
    event = with_(make_impression(1), "items.0.propensity", 1)
    assert validate(event) == []
    assert validate(with_(make_rating(), "value", 4)) == []
    assert validate(with_(make_rating(), "ts", 1_700_000_000)) == []


def test_ids_of_exactly_256_characters_are_valid() -> None:
    assert validate(with_(make_rating(), "user_id", "é" * 256)) == []


def test_a_slate_of_more_than_1000_items_is_invalid() -> None:
    assert problems_of(make_impression(1001)) == [("items", "invalid_value")]


def test_every_problem_is_reported_in_field_order() -> None:
    event = make_impression()
    del event["user_id"]
    event["ts"] = float("nan")
    event["policy"] = "best"
    event["items"][0]["propensity"] = 0
    event["items"][2]["position"] = 2
    event["items"][2]["item_id"] = 7
    assert problems_of(event) == [
        ("user_id", "missing_field"),
        ("ts", "invalid_value"),
        ("policy", "invalid_value"),
        ("items[0].propensity", "invalid_value"),
        ("items[2].item_id", "wrong_type"),
        ("items[2].position", "invalid_value"),
    ]
    with pytest.raises(ValidationError) as err:
        encode(event)
    text = str(err.value)
    for field in ("user_id", "ts", "policy", "items[0].propensity", "items[2].item_id", "items[2].position"):
        assert field in text
    assert len(err.value.problems) == 6 and all(isinstance(p, Problem) for p in err.value.problems)


def test_decode_reports_the_first_reason_and_every_problem() -> None:
    event = make_click()
    event["type"] = "tap"
    del event["user_id"]
    with pytest.raises(InvalidEvent) as err:
        decode(json.dumps(event).encode())
    assert err.value.reason == "unknown_type"
    assert "type: must be one of" in err.value.detail and "user_id: is required" in err.value.detail
    assert [p.path for p in err.value.problems] == ["type", "user_id"]


def test_an_unknown_type_still_gets_its_envelope_checked_but_not_type_fields() -> None:
    assert problems_of({"type": "view", "schema_version": 1, "event_id": "e", "user_id": "u", "ts": 1.0}) == [
        ("type", "unknown_type")
    ]


def test_an_unsupported_schema_version_is_the_only_problem_reported() -> None:
    assert problems_of({"type": "view", "schema_version": 2}) == [("schema_version", "unsupported_schema_version")]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "not_json"),
        (b"x" * (MAX_EVENT_BYTES + 1), "too_large"),
        (b'{"user_id": "\xff"}', "not_utf8"),
        ("{}".encode("utf-16"), "not_utf8"),
        (b"", "not_json"),
        (b'{"a": 1', "not_json"),
        (b'{"ts": NaN}', "not_json"),
        (b'{"ts": Infinity}', "not_json"),
        (b'{"ts": -Infinity}', "not_json"),
        (b"[" * MAX_EVENT_BYTES, "not_json"),  # nested beyond the recursion limit
        (b"[1, 2]", "not_object"),
        (b'"event"', "not_object"),
        (b"null", "not_object"),
        (b"{}", "missing_field"),
    ],
)
def test_decode_reasons(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        decode(raw)
    assert err.value.reason == reason
    assert err.value.problems and err.value.problems[0].reason == reason
    assert reason in str(err.value)


def test_decode_rejects_an_unpaired_surrogate_but_accepts_an_escaped_pair() -> None:
    raw = encode(make_rating())
    lone = raw.replace(b'"u1"', b'"u\\ud800"')
    with pytest.raises(InvalidEvent) as err:
        decode(lone)
    assert err.value.reason == "invalid_value"
    assert decode(raw.replace(b'"u1"', b'"u\\ud83d\\ude00"')).user_id == "u\U0001F600"


def test_every_reason_is_in_the_fixed_set() -> None:
    assert len(set(REASONS)) == 10
    seen = {"too_large", "not_utf8", "not_json", "not_object", "unknown_type", "unsupported_schema_version"}
    seen |= {"missing_field", "wrong_type", "invalid_value", "ts_in_future"}
    assert seen == set(REASONS)


def test_an_event_of_exactly_max_bytes_decodes() -> None:
    event = make_rating()
    event["note"] = ""
    event["note"] = "x" * (MAX_EVENT_BYTES - len(encode(event)))
    raw = encode(event)
    assert len(raw) == MAX_EVENT_BYTES
    assert decoded(raw) == {k: v for k, v in event.items() if k != "note"}  # the unknown field is ignored
    event["note"] += "x"
    with pytest.raises(ValidationError) as err:
        encode(event)
    assert err.value.problems[0].reason == "too_large"


def test_encode_is_compact_utf8_json() -> None:
    event = events.rating("ü", "i1", 1.0, ts=2.0, event_id="e1")
    assert encode(event) == '{"event_id":"e1","type":"rating","schema_version":1,"user_id":"ü","ts":2.0,"item_id":"i1","value":1.0}'.encode()


@pytest.mark.parametrize(
    ("context", "reason"),
    [({"x": float("nan")}, "invalid_value"), ({"at": object()}, "wrong_type"), ({"s": "\ud800"}, "invalid_value")],
)
def test_encode_rejects_context_that_is_not_json(context: dict, reason: str) -> None:
    event = make_impression()
    event["context"] = context
    with pytest.raises(ValidationError) as err:
        encode(event)
    assert err.value.problems[0].reason == reason


def test_subclasses_of_builtin_types_are_accepted() -> None:
    class Label(str):
        pass

    event = make_impression()
    event["user_id"] = Label("u1")
    event["items"][0]["propensity"] = np.float64(0.25)
    assert validate(event) == []
    assert problems_of(with_(make_rating(), "value", np.int64(4))) == [("value", "wrong_type")]  # not JSON


# -- hardening (issue 19): timestamps from the future, non-finite numbers anywhere --------------


@pytest.mark.hardening
@pytest.mark.parametrize("make", [make_impression, make_click, make_rating])
def test_a_ts_beyond_the_tolerance_ahead_of_the_clock_is_ts_in_future(make) -> None:
    at_limit = with_(make(), "ts", NOW + DEFAULT_MAX_FUTURE_S)
    beyond = with_(make(), "ts", NOW + DEFAULT_MAX_FUTURE_S + 1.0)
    assert validate(at_limit, now=NOW) == []
    assert decoded(encode(at_limit, now=NOW), now=NOW) == at_limit
    assert [(p.path, p.reason) for p in validate(beyond, now=NOW)] == [("ts", "ts_in_future")]
    with pytest.raises(InvalidEvent) as err:
        decode(json.dumps(beyond).encode(), now=NOW)
    assert err.value.reason == "ts_in_future" and err.value.detail.startswith("ts: ")
    with pytest.raises(ValidationError) as err:
        encode(beyond, now=NOW)
    assert err.value.problems[0].reason == "ts_in_future"
    assert validate(beyond, now=NOW, max_future_s=3600.0) == []  # the tolerance is the caller's setting


@pytest.mark.hardening
def test_by_default_the_year_5107_is_refused_and_old_data_is_not() -> None:
    future = with_(make_impression(), "ts", 9.9e10)  # the event that disabled dedupe (issue 19)
    with pytest.raises(InvalidEvent) as err:
        decode(json.dumps(future).encode())
    assert err.value.reason == "ts_in_future"
    assert problems_of(future) == [("ts", "ts_in_future")]
    for ts in (0, 0.0, 874_965_758.0, 1.7e9):  # the epoch, MovieLens 1997, 2023
        event = with_(make_rating(), "ts", ts)
        assert validate(event) == []
        assert decoded(encode(event)) == event


@pytest.mark.hardening
def test_the_future_rule_comes_after_the_range_rule_and_names_every_other_problem() -> None:
    assert problems_of(with_(make_rating(), "ts", 1.7e12)) == [("ts", "invalid_value")]  # milliseconds
    event = with_(with_(make_click(), "ts", NOW + 1e6), "item_id", "")
    assert [(p.path, p.reason) for p in validate(event, now=NOW)] == [("ts", "ts_in_future"), ("item_id", "invalid_value")]


@pytest.mark.hardening
@pytest.mark.parametrize(
    ("make", "json_text", "path"),
    [
        (make_impression, '"context": {"x": 1e400}', "context.x"),
        (make_impression, '"context": {"a": [1, {"b": -1e999}]}', "context.a[1].b"),
        (make_impression, '"context": {"n": 1' + "0" * 400 + ".0}", "context.n"),
        (make_impression, '"context": {"n": 1' + "0" * 400 + "}", "context.n"),  # an int no float can hold
        (make_rating, '"note": 1e400', "note"),
        (make_click, '"extra": [[1e400]]', "extra[0][0]"),
    ],
)
def test_a_number_beyond_a_double_anywhere_is_invalid_value_with_its_path(make, json_text: str, path: str) -> None:
    event = make()
    event.pop("context", None)
    raw = json.dumps(event)[:-1] + ", " + json_text + "}"
    with pytest.raises(InvalidEvent) as err:
        decode(raw.encode())
    assert err.value.reason == "invalid_value"
    assert [(p.path, p.reason) for p in err.value.problems] == [(path, "invalid_value")]
    assert err.value.detail.startswith(f"{path}: must be a finite number")


@pytest.mark.hardening
def test_a_non_finite_number_in_an_unknown_item_field_is_invalid_value() -> None:
    raw = json.dumps(make_impression()).replace('"score": 0.25}', '"score": 0.25, "extra": {"w": 1e400}}', 1)
    with pytest.raises(InvalidEvent) as err:
        decode(raw.encode())
    assert [(p.path, p.reason) for p in err.value.problems] == [("items[0].extra.w", "invalid_value")]


@pytest.mark.hardening
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10**400])
def test_encode_names_the_non_finite_number_in_context(value: float) -> None:
    event = make_impression()
    event["context"] = {"device": "ios", "geo": [0.5, {"lat": value}]}
    assert problems_of(event) == [("context.geo[1].lat", "invalid_value")]
    with pytest.raises(ValidationError) as err:
        encode(event)
    assert [(p.path, p.reason) for p in err.value.problems] == [("context.geo[1].lat", "invalid_value")]


def test_validate_rejects_non_objects() -> None:
    assert problems_of([make_rating()]) == [("", "not_object")]  # type: ignore[arg-type]


def test_committed_schema_file_is_in_sync() -> None:
    assert events.SCHEMA_PATH.read_text(encoding="utf-8") == events.schema_text(), (
        "stream/events/event.schema.json is stale: run `python -m stream.events --write-schema`"
    )


def test_json_schema_mirrors_the_contract() -> None:
    """The generated schema is a union tagged on ``type`` whose members carry the contract's rules."""
    schema = events.json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    mapping = schema["discriminator"]["mapping"]
    assert schema["discriminator"]["propertyName"] == "type" and set(mapping) == set(events.EVENT_TYPES)
    by_type = {name: schema["$defs"][ref.rsplit("/", 1)[1]] for name, ref in mapping.items()}
    for name, member in by_type.items():
        assert member["properties"]["type"] == {"enum": [name]}
        assert {"event_id", "type", "user_id", "ts", "schema_version"} <= set(member["required"])
        assert member["properties"]["user_id"] == {"type": "string", "maxLength": 256, "minLength": 1}
    assert set(by_type["impression"]["required"]) == {
        "event_id", "type", "user_id", "ts", "schema_version", "request_id", "model_version", "policy", "items"}
    item = schema["$defs"]["Item"]
    assert item["properties"]["propensity"] == {"type": "number", "exclusiveMinimum": 0.0, "maximum": 1.0}
    assert item["properties"]["position"] == {"type": "integer", "minimum": 1, "maximum": 1000}
    assert set(by_type["impression"]["properties"]["policy"]["enum"]) == set(events.POLICIES)
    assert by_type["impression"]["properties"]["variant"]["minLength"] == 1
    assert "position" in by_type["click"]["properties"] and "position" not in by_type["click"]["required"]
    assert by_type["rating"]["properties"]["ts"]["exclusiveMaximum"] == events.MAX_TS


# Values that each field kind may meet: valid and invalid, of every JSON type.
_MUTATIONS = [DELETE, None, True, False, 0, 1, 2, -1, 1001, 0.5, 1.0, 2.0, 1e300, float("nan"), float("inf"),
              NOW + 3600.0, 10**400, "", "x", "x" * 257, "impression", "click", "rating", "uniform", [], [1], {},
              {"a": 1}, {"a": [1.5, float("inf")]}, [{"b": float("nan")}]]


def make_rating_with_unknown_field() -> dict:
    return with_(make_rating(), "note", {"n": [1.5]})


def make_impression_with_unknown_item_field() -> dict:
    return with_(make_impression(), "items.1.extra", {"n": 2})


def make_click_with_unknown_items() -> dict:
    return with_(make_click(), "items", [{"x": 0.5}])  # only an impression's items are a slate


_MAKERS = (make_impression, make_click, make_rating, make_rating_with_unknown_field,
           make_impression_with_unknown_item_field, make_click_with_unknown_items)


def _paths(event: dict) -> list[str]:
    paths = list(event)
    items = event.get("items")
    for i, item in enumerate(items if isinstance(items, list) else []):
        paths += [f"items.{i}"] + ([f"items.{i}.{key}" for key in item] if isinstance(item, dict) else [])
    return paths


def test_fast_path_agrees_with_the_detailed_validator() -> None:
    """``_is_valid`` must accept exactly what ``_explain`` finds no problem with (plain JSON types)."""
    rng = random.Random(7)
    cases = 0
    for make in _MAKERS:
        base = make()
        for path in _paths(base):
            for value in _MUTATIONS:
                event = with_(base, path, value)
                for _ in range(3):  # and a second, random mutation on top
                    fast = validation._is_valid(event, NOW + DEFAULT_MAX_FUTURE_S)
                    assert fast == (validation._explain(event, NOW, DEFAULT_MAX_FUTURE_S) == []), (path, value, event)
                    cases += 1
                    paths = _paths(event)
                    event = with_(event, rng.choice(paths), rng.choice(_MUTATIONS)) if paths else event
    assert cases > 1000


def _outcome(decoder, raw: bytes):
    try:
        return ("ok", decoder(raw))
    except InvalidEvent as err:
        return (err.reason, err.detail)


def test_decode_fast_path_agrees_with_the_standard_library_on_raw_bytes() -> None:
    """``decode`` parses with msgspec's Structs first; its event, or its reason and detail, must be
    exactly what the standard library's parser and the detailed validator give (the event as the
    contract's Struct, unknown fields ignored), for mutated events and for byte-level edge cases
    where the two parsers differ (huge numbers, surrogates, NaN)."""
    rng = random.Random(11)
    raws = [b'{"ts": 1e400}', b'{"schema_version": 100000000000000000000000}',
            b'{"a": "\\ud800"}', b'{"a": "\\ud83d\\ude00"}', b"\xef\xbb\xbf{}", b'{"ts": NaN}', b"  {} "]
    for make in _MAKERS:
        base = make()
        raws.append(json.dumps(base).encode())
        for path in _paths(base):
            for value in _MUTATIONS:
                event = with_(base, path, value)
                raws.append(json.dumps(event).encode())  # NaN and Infinity stay as bare tokens
                paths = _paths(event)
                if paths:
                    raws.append(json.dumps(with_(event, rng.choice(paths), rng.choice(_MUTATIONS)), indent=1).encode())
        for field_name in ("event_id", "user_id"):
            for text in ('"\\ud800"', '"\\udc00x"', "1" + "0" * 400, "1e999", '"\\u00e9"'):
                raws.append(json.dumps(base).replace(json.dumps(base[field_name]), text, 1).encode())
        for text in ("1e400", "-1e999", "1" + "0" * 400, "1" + "0" * 400 + ".5", "18446744073709551616", "1e-400"):
            raws.append(json.dumps(base | {"extra": {"a": [0]}}).replace("[0]", f"[{text}]").encode())
    accepted = 0
    for raw in raws:
        fast = _outcome(lambda r: msgspec.to_builtins(decode(r, now=NOW)), raw)
        slow = _outcome(lambda r: msgspec.to_builtins(
            msgspec.convert(codec._decode_slow(r, NOW, DEFAULT_MAX_FUTURE_S), events.Event)), raw)
        assert fast == slow, raw
        accepted += fast[0] == "ok"
    assert accepted >= 3 and len(raws) - accepted > 1000


def _encoded(encoder, event: dict):
    try:
        return ("ok", json.loads(encoder(event)))
    except ValidationError as err:
        return ("error", [(p.path, p.reason) for p in err.problems])


def test_encode_fast_path_agrees_with_the_standard_library() -> None:
    """``encode`` writes contract-only events with orjson; the result (or the error) must be what
    the strict standard-library path gives, for mutated events, values orjson would write
    differently (NaN as null, datetimes, huge ints, float subclasses) and unknown fields."""
    import datetime

    class Ratio(float):
        pass

    def strict(event: dict) -> bytes:
        problems = validate(event)
        if problems:
            raise ValidationError(problems)
        return codec._encode_strict(event)

    rng = random.Random(5)
    cases = []
    for make in _MAKERS:
        base = make()
        base.pop("context", None)
        cases.append(base)
        for path in _paths(base):
            for value in _MUTATIONS:
                event = with_(base, path, value)
                cases.append(event)
                paths = _paths(event)
                if paths:
                    cases.append(with_(event, rng.choice(paths), rng.choice(_MUTATIONS)))
    odd = [float("nan"), datetime.datetime(2026, 1, 1), 10**30, Ratio(0.5), {1: "x"}, (1, 2)]
    for value in odd:
        cases.append(with_(make_rating(), "note", value))  # an unknown top-level field
        cases.append(with_(make_rating(), "value", value))
        impression = make_impression()
        impression.pop("context")
        cases.append(with_(impression, "items.1.extra", value))  # an unknown item field
    fast_taken = 0
    for event in cases:
        outcome = _encoded(encode, event)
        assert outcome == _encoded(strict, event), event
        fast_taken += outcome[0] == "ok" and validation.holds_only_table_fields(event)
    assert fast_taken >= 50
