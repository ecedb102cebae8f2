"""The event-id dedupe window: duplicates dropped within the window, forgotten after it (in event
time, against the newest timestamp seen), and seeding from the log that does not count as new."""
from __future__ import annotations

import pytest

from stream.worker.dedupe import DedupeWindow


def test_first_sighting_is_new_and_repeat_is_duplicate():
    """An id is new once; every repeat within the window is a duplicate."""
    d = DedupeWindow(window_s=60)
    assert d.add("a", ts=100.0) is True
    assert d.add("a", ts=100.0) is False
    assert d.add("a", ts=130.0) is False
    assert d.add("b", ts=130.0) is True
    assert len(d) == 2
    assert "a" in d and "b" in d and "c" not in d


def test_duplicate_detected_up_to_the_window_edge():
    """An id is still remembered when the newest timestamp is exactly ts + window."""
    d = DedupeWindow(window_s=60)
    assert d.add("a", ts=100.0)
    assert d.add("b", ts=160.0)  # newest - window == 100: "a" is on the edge, kept
    assert "a" in d
    assert d.add("a", ts=160.0) is False


def test_id_forgotten_once_newest_passes_ts_plus_window():
    """Once an event newer than ts + window arrives, the old id is forgotten and counts as new again."""
    d = DedupeWindow(window_s=60)
    assert d.add("a", ts=100.0)
    assert d.add("b", ts=160.5)
    assert "a" not in d
    assert len(d) == 1
    assert d.add("a", ts=161.0) is True


def test_window_is_event_time_not_arrival_count():
    """Many events inside the window do not push an id out; only event time does."""
    d = DedupeWindow(window_s=60)
    d.add("a", ts=100.0)
    for k in range(1000):
        assert d.add(f"x{k}", ts=100.0 + k * 0.05)  # all within 50 s
    assert d.add("a", ts=150.0) is False
    assert len(d) == 1001


def test_older_event_does_not_expire_anything():
    """A straggler with an old timestamp neither advances time nor forgets ids."""
    d = DedupeWindow(window_s=60)
    d.add("a", ts=100.0)
    d.add("b", ts=1000.0)  # forgets "a"
    assert "a" not in d
    assert d.add("old", ts=10.0) is True  # older than the horizon: accepted, newest unchanged
    assert d.add("c", ts=1000.0) is True
    assert "b" in d and "c" in d


def test_seed_remembers_ids_without_counting_them_as_new():
    """Seeded ids are duplicates afterwards; seeding itself returns nothing and accepts nothing twice."""
    d = DedupeWindow(window_s=60)
    assert d.seed([("a", 100.0), ("b", 110.0)]) is None
    assert len(d) == 2
    assert d.add("a", ts=120.0) is False
    assert d.add("b", ts=120.0) is False
    assert d.add("c", ts=120.0) is True


def test_seed_out_of_order_keeps_ids_inside_window():
    """Seeding sorts by time, so ids inside the window survive whatever order the log returned them in."""
    d = DedupeWindow(window_s=60)
    d.seed([("late", 200.0), ("early", 100.0), ("mid", 150.0)])
    # newest is 200; horizon 140: "early" forgotten, the others kept.
    assert "early" not in d
    assert "mid" in d and "late" in d
    assert d.add("mid", ts=201.0) is False
    assert d.add("early", ts=201.0) is True


def test_seeded_ids_expire_like_added_ones():
    """A seeded id is forgotten when event time moves past its ts + window."""
    d = DedupeWindow(window_s=60)
    d.seed([("a", 100.0)])
    assert d.add("b", ts=170.0) is True
    assert "a" not in d
    assert d.add("a", ts=171.0) is True


@pytest.mark.parametrize("window", [0, -1.0])
def test_non_positive_window_rejected(window):
    """A zero or negative window is a configuration error."""
    with pytest.raises(ValueError):
        DedupeWindow(window_s=window)
