"""Benchmark of decoding and validating events: msgspec's compiled check against the hand-written one.

``stream.events.decode`` (the worker, every Kafka message) and ``encode`` (the producer SDK, every
send) accept a valid event on a fast path and explain every other one on a detailed path. Since
issue 18 the fast path's verdict is msgspec's typed decoder over the Structs of
``stream.events.model``; before, it was a hand-written Python check (``_old_fields_valid`` below,
a copy kept here only as the peer). Measured on the same realistic mixed batch, in interleaved
rounds, three paths each:

- ``decode``: the new ``decode`` (msgspec parses a valid event once, into the Structs the worker
  reads); ``old``: the hand-written fast path, which returned the event as an orjson dict (the
  detailed path for invalid events is shared); ``raw``: plain ``orjson.loads``, no validation;
  ``structs_only``: msgspec's typed decode alone, without the rules a Struct cannot hold and
  without explaining invalid events (a bound, not a product path);
- ``encode``: the new ``encode`` and the old one, on the valid events as dicts.

The batch: 40% impressions of 10 items (with ``context``), 45% clicks, 10% ratings and 5% invalid
events of every kind (a bad propensity, a missing field, duplicate positions, a future ``ts``,
an unknown type, broken JSON). Before timing, every event must get the same outcome (the same
contract fields, or the same DLQ reason and detail) on both paths. Every figure is events/s, and every ratio
the median over rounds with a 95% bootstrap interval (``*_ci95``). The paths alternate every
250 events (grouped by kind, so ``decode_new_over_old_by_kind`` says where the time goes), which
keeps a neighbour's burst of CPU use from landing on one path only.

    python -m bench.decode [--quick]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any, Callable

import msgspec
import orjson
from tqdm import tqdm

from bench.common import StolenCpu, emit, median_ci
from stream import events as ev
from stream.events import DEFAULT_MAX_FUTURE_S, InvalidEvent, ValidationError
from stream.events.codec import _decode_slow, _encode_strict
from stream.events.model import Event
from stream.events.schema import FLOAT_MAX, MAX_EVENT_BYTES, MAX_ID_CHARS, MAX_POSITION, MAX_SLATE, MAX_TS
from stream.events.schema import POLICIES, SCHEMA_VERSION
from stream.events.validation import _explain, _finite_outside_tables, holds_only_table_fields

NAME = "decode"
NOW = 1.8e9  # the validating clock: after every ts of the batch but the future ones


# -- the peer: the hand-written fast path replaced in issue 18, kept only to measure against --------
_OLD_POLICY_SET = frozenset(POLICIES)


def _old_is_id(v: Any) -> bool:
    return type(v) is str and 0 < len(v) <= MAX_ID_CHARS


def _old_fields_valid(e: Any, ts_limit: float) -> bool:
    """OLD (before issue 18) hand-written check of every field rule; the peer of msgspec's."""
    try:
        version, event_type, ts = e["schema_version"], e["type"], e["ts"]
        if not (type(version) is int and version == SCHEMA_VERSION and _old_is_id(e["event_id"])
                and _old_is_id(e["user_id"]) and (type(ts) is float or type(ts) is int)
                and 0.0 <= ts < MAX_TS and ts <= ts_limit):
            return False
        if event_type == "impression":
            return _old_is_valid_impression(e)
        if event_type == "click":
            position = e.get("position", 1)
            return (_old_is_id(e["request_id"]) and _old_is_id(e["item_id"]) and type(position) is int
                    and 1 <= position <= MAX_POSITION)
        if event_type == "rating":
            value = e["value"]
            return (_old_is_id(e["item_id"]) and (type(value) is float or type(value) is int)
                    and -FLOAT_MAX <= value <= FLOAT_MAX)
        return False
    except (KeyError, TypeError):
        return False


def _old_is_valid_impression(e: dict) -> bool:
    items, policy = e["items"], e["policy"]
    if not (_old_is_id(e["request_id"]) and _old_is_id(e["model_version"]) and type(policy) is str
            and policy in _OLD_POLICY_SET and type(items) is list and 0 < len(items) <= MAX_SLATE
            and ("surface" not in e or _old_is_id(e["surface"]))
            and ("context" not in e or type(e["context"]) is dict)
            and ("variant" not in e or _old_is_id(e["variant"]))):
        return False
    positions = set()
    for item in items:
        if type(item) is not dict:
            return False
        item_id, position, propensity = item["item_id"], item["position"], item["propensity"]
        if not (type(item_id) is str and 0 < len(item_id) <= MAX_ID_CHARS and type(position) is int
                and 1 <= position <= MAX_POSITION and (type(propensity) is float or type(propensity) is int)
                and 0.0 < propensity <= 1.0):
            return False
        if "score" in item:
            score = item["score"]
            if not ((type(score) is float or type(score) is int) and -FLOAT_MAX <= score <= FLOAT_MAX):
                return False
        positions.add(position)
    return len(positions) == len(items)


def old_decode(raw: bytes | None, now: float = NOW, max_future_s: float = DEFAULT_MAX_FUTURE_S) -> dict:
    """OLD ``decode``: orjson, then the hand-written check; the detailed path is today's."""
    if raw is None:
        raise InvalidEvent("not_json", "the message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"{len(raw)} bytes, at most {MAX_EVENT_BYTES} allowed")
    try:
        event = orjson.loads(raw)
    except ValueError:
        pass
    else:
        if _old_fields_valid(event, now + max_future_s):
            return event
    return _decode_slow(raw, now, max_future_s)


def old_encode(event: dict, now: float = NOW, max_future_s: float = DEFAULT_MAX_FUTURE_S) -> bytes:
    """OLD ``encode``: the hand-written check, then orjson (or the strict path, as today)."""
    if not _old_fields_valid(event, now + max_future_s):
        problems = _explain(event, now, max_future_s)
        if problems:
            raise ValidationError(problems)
        return _encode_strict(event)
    if holds_only_table_fields(event):
        return orjson.dumps(event)
    if _finite_outside_tables(event):
        return _encode_strict(event)
    raise ValidationError(_explain(event, now, max_future_s))
# -- end of the peer -------------------------------------------------------------------------------


def _valid_event(rng: random.Random, n: int) -> dict:
    user, ts = f"u{rng.randrange(50_000)}", 1.75e9 + n * 0.01
    draw = rng.random()
    if draw < 0.42:
        items = [{"item_id": f"i{rng.randrange(20_000)}", "position": p + 1, "propensity": round(rng.uniform(0.01, 1.0), 4),
                  "score": round(rng.gauss(0.0, 1.0), 4)} for p in range(10)]
        return ev.impression(user, f"r{n}", "mf-000042", "softmax", items, surface="home",
                             context={"device": rng.choice(["ios", "android", "web"]), "hour": rng.randrange(24)},
                             ts=ts, event_id=f"e{n}")
    if draw < 0.89:
        return ev.click(user, f"r{rng.randrange(n + 1)}", f"i{rng.randrange(20_000)}", position=rng.randrange(1, 11),
                        ts=ts, event_id=f"e{n}")
    return ev.rating(user, f"i{rng.randrange(20_000)}", rng.choice([1.0, 2.0, 3.0, 4.0, 5.0]), ts=ts, event_id=f"e{n}")


def _invalid_raw(rng: random.Random, valid: dict) -> bytes:
    """One broken message, of a kind drawn at random."""
    kind = rng.randrange(6)
    event = json.loads(json.dumps(valid))
    if kind == 0 and event["type"] == "impression":
        event["items"][rng.randrange(10)]["propensity"] = 0.0
    elif kind == 1 and event["type"] == "impression":
        event["items"][9]["position"] = 1
    elif kind == 2:
        del event["user_id"]
    elif kind == 3:
        event["ts"] = NOW + 3600.0
    elif kind == 4:
        event["type"] = "purchase"
    else:
        return json.dumps(event).encode()[:-3]
    return json.dumps(event).encode()


def make_batch(n: int, seed: int = 0) -> tuple[list[bytes], list[dict]]:
    """``n`` messages (95% valid) and the valid events among them as dicts."""
    rng = random.Random(seed)
    raws, valid = [], []
    for k in range(n):
        event = _valid_event(rng, k)
        if rng.random() < 0.05:
            raws.append(_invalid_raw(rng, event))
        else:
            raws.append(json.dumps(event, separators=(",", ":")).encode())
            valid.append(event)
    return raws, valid


def _outcome(fn: Callable[[Any], Any], arg: Any) -> Any:
    try:
        return ("ok", fn(arg))
    except InvalidEvent as err:
        return (err.reason, err.detail)
    except ValidationError as err:
        return ("error", [(p.path, p.reason) for p in err.problems])


def _check_agreement(raws: list[bytes], valid: list[dict]) -> dict:
    """Every message gets the same outcome on the old and the new path; counts of each outcome."""
    reasons: dict[str, int] = {}
    for raw in raws:  # the new path keeps the contract's fields of an event: compared as such
        new = _outcome(lambda r: msgspec.to_builtins(ev.decode(r, now=NOW)), raw)
        if new != _outcome(lambda r: msgspec.to_builtins(msgspec.convert(old_decode(r), Event)), raw):
            raise AssertionError(f"old and new decode disagree on {raw[:200]!r}")
        reasons[new[0]] = reasons.get(new[0], 0) + 1
    for event in valid:
        if _outcome(lambda e: ev.encode(e, now=NOW), event) != _outcome(old_encode, event):
            raise AssertionError(f"old and new encode disagree on {event}")
    return reasons


CHUNK = 250  # events timed at a time; the paths alternate chunk by chunk, so a noisy neighbour hits all


def _elapsed(fn: Callable[[Any], Any], inputs: list[Any]) -> float:
    """Seconds ``fn`` takes over ``inputs`` (an invalid event's exception counts as done:
    ``InvalidEvent``, ``ValidationError`` and orjson's ``JSONDecodeError`` are ValueErrors)."""
    start = time.perf_counter()
    for x in inputs:
        try:
            fn(x)
        except ValueError:
            pass
    return time.perf_counter() - start


def _kind(raw: bytes) -> str:
    outcome = _outcome(lambda r: ev.decode(r, now=NOW), raw)
    return ev.EVENT_TYPE[type(outcome[1])] if outcome[0] == "ok" else "invalid"


def _chunks(inputs: list[Any], kinds: list[str]) -> list[tuple[str, list[Any]]]:
    """``inputs`` grouped by kind, in chunks of at most CHUNK."""
    out = []
    for kind in sorted(set(kinds)):
        same = [x for x, k in zip(inputs, kinds) if k == kind]
        out += [(kind, same[i:i + CHUNK]) for i in range(0, len(same), CHUNK)]
    return out


def _time_rounds(paths: dict[str, Callable[[Any], Any]], chunks: list[tuple[str, list[Any]]],
                 rounds: int, desc: str) -> list[dict[str, dict[str, float]]]:
    """Per round, per path, the seconds spent on each kind; the order of the paths rotates."""
    names = list(paths)
    out = []
    for r in tqdm(range(rounds), desc=desc, unit="round"):
        spent = {name: dict.fromkeys({kind for kind, _ in chunks}, 0.0) for name in names}
        for c, (kind, inputs) in enumerate(chunks):
            shift = (r + c) % len(names)
            for name in names[shift:] + names[:shift]:
                spent[name][kind] += _elapsed(paths[name], inputs)
        out.append(spent)
    return out


def _ratio(spent: list[dict[str, dict[str, float]]], num: str, den: str, kinds: set[str] | None = None) -> dict:
    """Rate of path ``num`` over rate of ``den`` (on ``kinds``, default all): median over rounds, 95% CI."""
    def seconds(round_: dict[str, dict[str, float]], name: str) -> float:
        return sum(t for kind, t in round_[name].items() if kinds is None or kind in kinds)

    value, ci = median_ci([seconds(r, den) / seconds(r, num) for r in spent])
    return {"value": round(value, 3), "ci95": [round(x, 3) for x in ci]}


def run(n: int, rounds: int) -> dict:
    raws, valid = make_batch(n)
    reasons = _check_agreement(raws, valid)
    structs = msgspec.json.Decoder(Event)
    decoding = _time_rounds({"decode_new": lambda r: ev.decode(r, now=NOW), "decode_old": old_decode,
                             "raw_orjson": orjson.loads, "structs_only": structs.decode},
                            _chunks(raws, [_kind(r) for r in raws]), rounds, "decode")
    encoding = _time_rounds({"encode_new": lambda e: ev.encode(e, now=NOW), "encode_old": old_encode},
                            _chunks(valid, [e["type"] for e in valid]), rounds, "encode")
    with StolenCpu() as stolen:  # a last decode round, only to report the steal of a typical round
        _time_rounds({"decode_new": lambda r: ev.decode(r, now=NOW)}, [("all", raws)], 1, "steal")
    out: dict[str, Any] = {"events": n, "valid_events": len(valid), "rounds": rounds, "outcomes": reasons,
                           "old_new_agree": True,
                           "cpu_stolen_share": None if stolen.share is None else round(stolen.share, 3)}
    for spent, count in ((decoding, n), (encoding, len(valid))):
        for name in spent[0]:
            rates = [count / sum(r[name].values()) for r in spent]
            out[f"{name}_events_per_s"] = round(median_ci(rates)[0], 1)
    for ratio, spent, num, den in (("decode_new_over_old", decoding, "decode_new", "decode_old"),
                                   ("decode_new_over_raw", decoding, "decode_new", "raw_orjson"),
                                   ("decode_old_over_raw", decoding, "decode_old", "raw_orjson"),
                                   ("structs_only_over_old", decoding, "structs_only", "decode_old"),
                                   ("encode_new_over_old", encoding, "encode_new", "encode_old")):
        result = _ratio(spent, num, den)
        out[ratio], out[f"{ratio}_ci95"] = result["value"], result["ci95"]
    out["decode_new_over_old_by_kind"] = {kind: _ratio(decoding, "decode_new", "decode_old", {kind})
                                          for kind in decoding[0]["decode_new"]}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode",
        description="Events/s of decoding and validating events with msgspec's compiled check (the "
                    "worker's decode, the SDK's encode) against the old hand-written check and plain "
                    "orjson.loads, on one mixed batch, in interleaved rounds.")
    parser.add_argument("--quick", action="store_true", help="a smaller batch and fewer rounds (about 10 s)")
    parser.add_argument("--events", type=int, help="events in the batch (default 20,000; 5,000 with --quick)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 15; 7 with --quick)")
    args = parser.parse_args(argv)
    n = args.events or (5_000 if args.quick else 20_000)
    rounds = args.rounds or (7 if args.quick else 15)
    if not 100 <= n <= 1_000_000 or not 2 <= rounds <= 200:
        parser.error("--events must be in 100..1,000,000 and --rounds in 2..200")
    emit(NAME, run(n, rounds))


if __name__ == "__main__":
    main()
