"""The impression x click join: a ``clicked`` message at once with the slate's position,
propensity, model and policy; one ``closed`` message of the unclicked items exactly when the
event-time watermark passes ts + window; every reason a click is not joined; and restore() after
a restart."""
from __future__ import annotations

import msgspec
import pytest

from stream.events import Click, Impression, Item, to_event
from stream.examples import CLICKED, CLOSED, click_example, example_rows
from stream.worker.join import (
    DUPLICATE,
    LATE,
    MATCHED,
    NOT_SHOWN,
    ORPHAN,
    ImpressionJoiner,
)

T = 1_700_000_000.0
WINDOW = 60.0


def impression(request_id="r1", ts=T, items=(("a", 0.5), ("b", 0.25), ("c", 0.01)), user_id="u1",
               event_id=None, model_version="m7", policy="epsilon_greedy") -> Impression:
    """An impression (the Struct ``decode`` gives); ``items`` are (item_id, propensity) at positions 1..n."""
    return to_event({
        "event_id": event_id or f"imp-{request_id}-{ts}",
        "type": "impression",
        "schema_version": 1,
        "user_id": user_id,
        "ts": ts,
        "request_id": request_id,
        "model_version": model_version,
        "policy": policy,
        "items": [{"item_id": i, "position": k + 1, "propensity": p} for k, (i, p) in enumerate(items)],
    })


def click(item_id, request_id="r1", ts=T + 5.0, user_id="u1", event_id=None, position=None) -> Click:
    """A click (the Struct ``decode`` gives); ``position`` is the one the click reports, if any."""
    event = {
        "event_id": event_id or f"clk-{request_id}-{item_id}-{ts}",
        "type": "click",
        "schema_version": 1,
        "user_id": user_id,
        "ts": ts,
        "request_id": request_id,
        "item_id": item_id,
    }
    if position is not None:
        event["position"] = position
    return to_event(event)


def labels(examples) -> list[tuple[str, str, float]]:
    """(request_id, item_id, label) of every labelled item of ``examples``, sorted."""
    return sorted((r["request_id"], r["item_id"], r["label"]) for r in example_rows(examples).to_pylist())


def closed_items(examples) -> dict[str, list[str]]:
    """request_id -> the item ids of its ``closed`` message; every message is ``closed`` and a
    slate has at most one."""
    assert all(e.stage == CLOSED for e in examples), [e.stage for e in examples]
    out = {e.request_id: [i.item_id for i in e.items] for e in examples}
    assert len(out) == len(examples), "more than one closed message for a slate"
    return out


def only_item(example) -> dict:
    """The one item of a ``clicked`` message, as a dictionary."""
    assert example.stage == CLICKED
    (item,) = msgspec.to_builtins(example.items)
    return item


@pytest.fixture
def joiner() -> ImpressionJoiner:
    return ImpressionJoiner(window_s=WINDOW, max_weight=50.0)


# -- positives ------------------------------------------------------------------------------------


def test_matched_click_is_positive_with_slate_fields(joiner):
    """A click on a shown item is a positive carrying the impression's position, propensity, model and policy."""
    joiner.on_impression(impression())
    outcome, ex = joiner.on_click(click("b", ts=T + 7.5, event_id="c1"))
    assert outcome == MATCHED
    assert msgspec.to_builtins(ex) == {
        "kind": "click",
        "stage": "clicked",
        "user_id": "u1",
        "request_id": "r1",
        "model_version": "m7",
        "policy": "epsilon_greedy",
        "variant": None,
        "ts": T + 7.5,
        "anomalous": False,
        "event_id": "c1",
        "items": [{"item_id": "b", "position": 2, "propensity": 0.25, "weight": 4.0, "label": 1.0, "score": None}],
    }


def test_click_position_comes_from_impression_not_click(joiner):
    """A click reporting a different position still gets the position the impression logged."""
    joiner.on_impression(impression())
    c = click("c", position=1)
    assert c.position == 1
    outcome, ex = joiner.on_click(c)
    assert outcome == MATCHED
    item = only_item(ex)
    assert item["item_id"] == "c"
    assert item["position"] == 3
    assert item["propensity"] == 0.01


def test_weight_is_inverse_propensity_clipped(joiner):
    """weight = min(1/propensity, max_weight): 1/0.01 = 100 is clipped to 50."""
    joiner.on_impression(impression())
    _, ex_a = joiner.on_click(click("a"))
    _, ex_c = joiner.on_click(click("c"))
    assert only_item(ex_a)["weight"] == 2.0
    assert only_item(ex_c)["weight"] == 50.0


def test_max_weight_is_configurable():
    """A joiner built with max_weight=3 clips 1/0.25 = 4 down to 3."""
    j = ImpressionJoiner(window_s=WINDOW, max_weight=3.0)
    j.on_impression(impression())
    _, ex = j.on_click(click("b"))
    assert only_item(ex)["weight"] == 3.0


@pytest.mark.parametrize("propensity, max_weight, expected", [
    (1.0, 50.0, 1.0), (0.5, 50.0, 2.0), (0.02, 50.0, 50.0), (0.001, 50.0, 50.0), (0.1, 5.0, 5.0),
])
def test_the_weight_is_the_inverse_propensity_clipped_at_max_weight(propensity, max_weight, expected):
    item = Item("a", position=1, propensity=propensity)
    (weighted,) = click_example(impression(), [item], CLOSED, 0.0, "e", max_weight).items
    assert weighted.weight == expected


def test_click_exactly_at_window_edge_is_matched(joiner):
    """A click at impression ts + window (not more) still joins."""
    joiner.on_impression(impression())
    outcome, ex = joiner.on_click(click("a", ts=T + WINDOW))
    assert outcome == MATCHED
    assert only_item(ex)["label"] == 1.0
    assert ex.ts == T + WINDOW


# -- negatives and the watermark ------------------------------------------------------------------


def test_unclicked_items_become_negatives_only_after_watermark_passes_deadline(joiner):
    """The slate's ``closed`` message (its unclicked items, negatives) appears exactly when the
    watermark passes ts + window, never before."""
    joiner.on_impression(impression())
    joiner.on_click(click("b"))
    assert joiner.advance(T + 30.0) == []
    assert joiner.advance(T + WINDOW) == []  # on the deadline: still open
    assert len(joiner) == 1
    negs = joiner.advance(T + WINDOW + 0.001)
    assert closed_items(negs) == {"r1": ["a", "c"]}
    assert labels(negs) == [("r1", "a", 0.0), ("r1", "c", 0.0)]
    assert len(joiner) == 0
    assert joiner.advance(T + 10 * WINDOW) == []  # closed once, emitted once


def test_negative_fields_come_from_impression(joiner):
    """The ``closed`` message carries the impression's ts, event_id, model and policy, and each
    unclicked item its position, propensity and clipped weight, labelled negative."""
    imp = impression(event_id="imp1")
    joiner.on_impression(imp)
    (closed,) = joiner.advance(T + WINDOW + 1)
    assert msgspec.to_builtins(closed) == {
        "kind": "click",
        "stage": "closed",
        "user_id": "u1",
        "request_id": "r1",
        "model_version": "m7",
        "policy": "epsilon_greedy",
        "variant": None,
        "ts": T,
        "anomalous": False,
        "event_id": "imp1",
        "items": [
            {"item_id": "a", "position": 1, "propensity": 0.5, "weight": 2.0, "label": 0.0, "score": None},
            {"item_id": "b", "position": 2, "propensity": 0.25, "weight": 4.0, "label": 0.0, "score": None},
            {"item_id": "c", "position": 3, "propensity": 0.01, "weight": 50.0, "label": 0.0, "score": None},
        ],
    }


def test_watermark_never_moves_back(joiner):
    """An older watermark does not reopen time: the watermark is the max seen."""
    joiner.advance(T + 100.0)
    joiner.advance(T + 10.0)
    assert joiner.watermark == T + 100.0


def test_slates_close_in_deadline_order_independently(joiner):
    """Each slate closes at its own deadline; a later slate stays open."""
    joiner.on_impression(impression("r1", ts=T, items=(("a", 1.0),)))
    joiner.on_impression(impression("r2", ts=T + 30, items=(("x", 1.0),)))
    first = joiner.advance(T + WINDOW + 1)
    assert closed_items(first) == {"r1": ["a"]}
    assert labels(first) == [("r1", "a", 0.0)]
    assert len(joiner) == 1
    second = joiner.advance(T + 30 + WINDOW + 1)
    assert closed_items(second) == {"r2": ["x"]}
    assert labels(second) == [("r2", "x", 0.0)]


def test_slates_closing_together_give_one_closed_message_each(joiner):
    """Two slates closed by the same advance give two ``closed`` messages, each with its own items
    and its own impression's event_id and ts."""
    joiner.on_impression(impression("r1", ts=T, event_id="i1"))
    joiner.on_impression(impression("r2", ts=T + 1, items=(("x", 1.0), ("y", 0.5)), event_id="i2"))
    joiner.on_click(click("a", request_id="r1"))
    closed = joiner.advance(T + 1 + WINDOW + 1)
    assert closed_items(closed) == {"r1": ["b", "c"], "r2": ["x", "y"]}
    assert sorted((e.request_id, e.event_id, e.ts) for e in closed) == [("r1", "i1", T), ("r2", "i2", T + 1)]


def test_fully_clicked_slate_closes_without_negatives(joiner):
    """A slate whose every item was clicked closes with no negatives."""
    joiner.on_impression(impression(items=(("a", 1.0), ("b", 1.0))))
    joiner.on_click(click("a"))
    joiner.on_click(click("b"))
    assert joiner.advance(T + WINDOW + 1) == []
    assert len(joiner) == 0


def test_fully_clicked_slate_emits_no_closed_message(joiner):
    """Every item clicked: one ``clicked`` message per click, and the window's close emits no
    ``closed`` message at all (not even one with no items), while another slate closing at the
    same time still emits its own."""
    joiner.on_impression(impression("r1", items=(("a", 1.0), ("b", 0.5))))
    joiner.on_impression(impression("r2", items=(("x", 1.0),)))
    clicked = [joiner.on_click(click("a")), joiner.on_click(click("b", ts=T + 6))]
    assert [outcome for outcome, _ in clicked] == [MATCHED, MATCHED]
    assert [(e.stage, only_item(e)["item_id"]) for _, e in clicked] == [(CLICKED, "a"), (CLICKED, "b")]
    closed = joiner.advance(T + WINDOW + 1)
    assert closed_items(closed) == {"r2": ["x"]}
    assert all(e.items for e in closed)
    assert len(joiner) == 0
    assert joiner.on_click(click("a", ts=T + 7)) == (LATE, None)  # closed, though it said nothing


# -- clicks that do not join ----------------------------------------------------------------------


def test_orphan_click(joiner):
    """A click whose request_id was never seen is an orphan, with no example."""
    joiner.on_impression(impression("r1"))
    assert joiner.on_click(click("a", request_id="nope")) == (ORPHAN, None)


def test_late_click_by_timestamp_while_slate_open(joiner):
    """A click more than window after the impression is late even if the slate is still open, and the item stays a negative."""
    joiner.on_impression(impression())
    assert joiner.on_click(click("a", ts=T + WINDOW + 0.5)) == (LATE, None)
    assert len(joiner) == 1
    closed = joiner.advance(T + WINDOW + 1)
    assert closed_items(closed) == {"r1": ["a", "b", "c"]}
    assert ("r1", "a", 0.0) in labels(closed)


def test_click_after_slate_closed_is_late_not_orphan(joiner):
    """A click for a slate that already closed is late_click, not orphan_click."""
    joiner.on_impression(impression())
    joiner.advance(T + WINDOW + 1)
    assert joiner.on_click(click("a", ts=T + 10)) == (LATE, None)  # in-window ts, but the slate is closed
    assert joiner.on_click(click("a", ts=T + WINDOW + 2)) == (LATE, None)


def test_closed_slate_forgotten_after_another_window(joiner):
    """A closed slate is remembered for one more window, then its clicks are orphans."""
    joiner.on_impression(impression())
    joiner.advance(T + WINDOW + 1)  # closes at deadline T + WINDOW
    joiner.advance(T + 2 * WINDOW)  # horizon == deadline: still remembered
    assert joiner.on_click(click("a", ts=T + 2 * WINDOW))[0] == LATE
    joiner.advance(T + 2 * WINDOW + 1)
    assert joiner.on_click(click("a", ts=T + 2 * WINDOW + 1))[0] == ORPHAN


def test_click_on_item_not_shown(joiner):
    """A click on an item the slate did not show is item_not_shown, with no example."""
    joiner.on_impression(impression())
    assert joiner.on_click(click("zzz")) == (NOT_SHOWN, None)
    closed = joiner.advance(T + WINDOW + 1)
    assert closed_items(closed) == {"r1": ["a", "b", "c"]}
    assert labels(closed) == [("r1", "a", 0.0), ("r1", "b", 0.0), ("r1", "c", 0.0)]


def test_duplicate_click_gives_one_positive(joiner):
    """A second click on the same item of a slate is duplicate_click; only one positive exists."""
    joiner.on_impression(impression())
    out1, ex1 = joiner.on_click(click("a", ts=T + 1, event_id="c1"))
    out2, ex2 = joiner.on_click(click("a", ts=T + 2, event_id="c2"))
    assert (out1, out2) == (MATCHED, DUPLICATE)
    assert ex1.event_id == "c1" and ex2 is None
    assert labels([ex1]) == [("r1", "a", 1.0)]
    negs = joiner.advance(T + WINDOW + 1)
    assert closed_items(negs) == {"r1": ["b", "c"]}
    assert labels(negs) == [("r1", "b", 0.0), ("r1", "c", 0.0)]


def test_repeated_impression_request_id_keeps_first_slate(joiner):
    """A second impression with the same request_id is ignored: the first slate's items and fields stay."""
    joiner.on_impression(impression(items=(("a", 0.5), ("b", 0.25)), model_version="first"))
    joiner.on_impression(impression(ts=T + 20, items=(("x", 1.0), ("b", 1.0)), model_version="second"))
    assert len(joiner) == 1
    assert joiner.on_click(click("x"))[0] == NOT_SHOWN
    _, ex = joiner.on_click(click("b"))
    item = only_item(ex)
    assert (item["propensity"], item["position"], ex.model_version) == (0.25, 2, "first")
    negs = joiner.advance(T + WINDOW + 1)  # the first slate's deadline, not the second's
    assert closed_items(negs) == {"r1": ["a"]}
    assert labels(negs) == [("r1", "a", 0.0)]
    assert all(e.model_version == "first" and e.ts == T for e in negs)


def test_repeated_impression_after_close_does_not_reopen(joiner):
    """An impression repeating a closed slate's request_id neither reopens it nor emits more negatives."""
    joiner.on_impression(impression())
    assert closed_items(joiner.advance(T + WINDOW + 1)) == {"r1": ["a", "b", "c"]}
    joiner.on_impression(impression(ts=T + WINDOW + 1))
    assert len(joiner) == 0
    assert joiner.advance(T + 3 * WINDOW) == []


def test_non_positive_window_rejected():
    """A zero attribution window is a configuration error."""
    with pytest.raises(ValueError):
        ImpressionJoiner(window_s=0)


# -- restore --------------------------------------------------------------------------------------


def test_restore_rebuilds_open_slates_and_clicked_pairs():
    """After restore, a clicked item gives no second positive and no negative; the others close as usual."""
    j = ImpressionJoiner(window_s=WINDOW)
    j.restore([impression("r1"), impression("r2", ts=T + 10, items=(("x", 1.0), ("y", 0.5)))],
              [("r1", "b"), ("r2", "y"), ("gone", "a")], watermark=T + 20)
    assert len(j) == 2
    assert j.watermark == T + 20
    assert j.on_click(click("b", ts=T + 25)) == (DUPLICATE, None)
    outcome, ex = j.on_click(click("a", ts=T + 25))
    assert outcome == MATCHED and only_item(ex)["weight"] == 2.0 and only_item(ex)["position"] == 1
    negs = j.advance(T + 10 + WINDOW + 1)
    assert closed_items(negs) == {"r1": ["c"], "r2": ["x"]}
    assert labels(negs) == [("r1", "c", 0.0), ("r2", "x", 0.0)]


def test_restore_ignores_clicked_pair_for_item_not_in_slate():
    """A clicked pair naming an item the slate did not show changes nothing."""
    j = ImpressionJoiner(window_s=WINDOW)
    j.restore([impression()], [("r1", "zzz")], watermark=T)
    closed = j.advance(T + WINDOW + 1)
    assert closed_items(closed) == {"r1": ["a", "b", "c"]}
    assert labels(closed) == [("r1", "a", 0.0), ("r1", "b", 0.0), ("r1", "c", 0.0)]


def test_restore_does_not_close_slates_by_itself():
    """restore() sets the watermark but emits nothing; the next advance closes what is due."""
    j = ImpressionJoiner(window_s=WINDOW)
    j.restore([impression()], [], watermark=T + WINDOW)
    assert len(j) == 1
    assert j.watermark == T + WINDOW
    closed = j.advance(T + WINDOW + 0.5)
    assert closed_items(closed) == {"r1": ["a", "b", "c"]}
    assert labels(closed) == [("r1", "a", 0.0), ("r1", "b", 0.0), ("r1", "c", 0.0)]


def test_restore_of_a_fully_clicked_slate_closes_without_a_message():
    """A restored slate whose every item was clicked before the restart closes silently."""
    j = ImpressionJoiner(window_s=WINDOW)
    j.restore([impression(items=(("a", 1.0), ("b", 1.0)))], [("r1", "a"), ("r1", "b")], watermark=T + 5)
    assert len(j) == 1
    assert j.advance(T + WINDOW + 1) == []
    assert len(j) == 0
