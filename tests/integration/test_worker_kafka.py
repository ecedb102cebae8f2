"""The stream worker against the real broker: SDK in, Delta log and ``examples`` out.

Each test runs ``streamrec worker`` as a subprocess on its own topic prefix and log folder.
"""
from __future__ import annotations

import base64
import json
import signal
import time

import pandas as pd
import pytest

from stream import events as ev
from stream.examples import Example
from stream.topics import Topics
from stream.log.export import final_click_labels, obp_frame
from stream.producer import EventProducer
from sim.sources import obd_events, synthetic_events
from stream.topics import ensure_topics
from tests.workerproc import WorkerProcess, read_topic, wait_for

pytestmark = pytest.mark.kafka


@pytest.fixture
def worker_env(kafka_bootstrap, unique_name, tmp_path):
    """A topic namespace with its topics created, and a function that makes its worker."""
    prefix = f"t{unique_name}."
    topics = Topics(prefix)
    ensure_topics(kafka_bootstrap, 2, topics)
    workers: list[WorkerProcess] = []

    def make(*extra: str) -> WorkerProcess:
        w = WorkerProcess(kafka_bootstrap, prefix, tmp_path, *extra)
        workers.append(w)
        return w

    yield topics, make
    for w in workers:
        w.stop(signal.SIGKILL)


def _slate(user: str, request: str, ts: float, items: list[str]) -> dict:
    return ev.impression(user, request, "m1", "epsilon_greedy",
                         [{"item_id": it, "position": i + 1, "propensity": 0.5 / (i + 1), "score": round(0.9 - 0.1 * i, 2)}
                          for i, it in enumerate(items)],
                         ts=ts)


def test_sdk_events_reach_the_log_and_examples(kafka_bootstrap, worker_env):
    """Impressions, clicks and ratings sent through the SDK come out in the log and on `examples`."""
    topics, make = worker_env
    now = time.time()
    imp = _slate("u1", "r1", now, ["a", "b", "c"])
    clk = ev.click("u1", "r1", "b", ts=now + 1)
    rat = ev.rating("u2", "x", 4.5, ts=now + 2)
    with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
        producer.send_many([imp, clk, rat])
    worker = make("--attribution-window-s", "5", "--feedback", "wait").start()  # a slate's negatives in one message
    wait_for(lambda: len(worker.logged_examples()) == 4, 90, "4 examples in the log", worker)

    logged = worker.logged_events()
    assert sorted(logged["event_id"].unique()) == sorted([imp["event_id"], clk["event_id"], rat["event_id"]])
    shown = logged[logged["type"] == "impression"].sort_values("position")
    assert shown["item_id"].tolist() == ["a", "b", "c"]
    assert shown["propensity"].tolist() == [0.5, 0.25, 0.5 / 3]
    assert set(shown["model_version"]) == {"m1"} and set(shown["policy"]) == {"epsilon_greedy"}

    messages = read_topic(kafka_bootstrap, topics.examples, 3)  # one per outcome: clicked, closed, rated
    by_stage = {m["stage"]: m for m in messages}
    assert sorted(by_stage) == ["clicked", "closed", "rated"]
    for m in messages:
        assert set(m) == set(Example.__struct_fields__)
    assert (by_stage["clicked"]["event_id"], by_stage["closed"]["event_id"]) == (clk["event_id"], imp["event_id"])
    assert by_stage["clicked"]["items"] == [{"item_id": "b", "position": 2, "propensity": 0.25, "weight": 4.0, "label": 1.0,
                                             "score": 0.8}]
    assert [(i["item_id"], i["label"]) for i in by_stage["closed"]["items"]] == [("a", 0.0), ("c", 0.0)]
    assert by_stage["rated"] == {**by_stage["rated"], "kind": "rating", "request_id": None,
                                 "items": [{"item_id": "x", "position": None, "propensity": 1.0, "weight": 1.0,
                                            "label": 4.5, "score": None}]}


def test_obd_sample_round_trips_through_kafka(kafka_bootstrap, worker_env, shared_data):
    """Every OBD row comes back from the log with its position, propensity and click unchanged."""
    topics, make = worker_env
    path = shared_data / "obd" / "random" / "men.csv"
    truth = pd.read_csv(path, index_col=0)
    with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
        producer.send_many(obd_events(path))
    worker = make("--attribution-window-s", "60").start()
    wait_for(lambda: worker.caught_up() and len(obp_frame(worker.log_dir)) == len(truth), 240,
             f"{len(truth)} shown items in the log", worker)

    got = obp_frame(worker.log_dir)
    got["row"] = got["request_id"].str.rsplit("-", n=1).str[1].astype(int)
    got = got.set_index("row").sort_index()
    assert got.index.tolist() == truth.index.tolist()
    assert (got["item_id"].astype(int) == truth["item_id"]).all()
    assert (got["position"] == truth["position"]).all()
    assert (got["click"] == truth["click"]).all()
    assert (got["propensity_score"] == truth["propensity_score"]).all()  # exact float equality


BAD_INPUTS = {
    "not_json": b"{not json",
    "not_utf8": b"\xff\xfe\x00garbage",
    "too_large": json.dumps({"pad": "x" * 70_000}).encode(),
    "not_object": b"[1, 2, 3]",
    "unknown_type": json.dumps({"event_id": "q", "type": "purchase", "user_id": "u", "ts": 1.0,
                                "schema_version": 1}).encode(),
    "unsupported_schema_version": json.dumps({**ev.rating("u", "i", 3.0), "schema_version": 9}).encode(),
    "missing_field": json.dumps({k: v for k, v in ev.rating("u", "i", 3.0).items() if k != "item_id"}).encode(),
    "wrong_type": json.dumps({**ev.rating("u", "i", 3.0), "value": "high"}).encode(),
    "invalid_value": json.dumps(_slate("u", "r", 1.0, ["a", "a"]) | {
        "items": [{"item_id": "a", "position": 1, "propensity": 0.0}]}).encode(),
}


def test_bad_input_goes_to_the_dlq_and_the_worker_keeps_going(kafka_bootstrap, worker_env):
    """Each class of bad input lands on events.dlq with its reason; good events around it are logged."""
    topics, make = worker_env
    good = [ev.rating(f"u{i}", f"i{i}", 3.0) for i in range(len(BAD_INPUTS) + 1)]
    with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
        for i, raw in enumerate(BAD_INPUTS.values()):
            producer.send(good[i])
            producer.send_raw(raw, key=b"u")
        producer.send(good[-1])
    worker = make().start()
    dlq = read_topic(kafka_bootstrap, topics.dlq, len(BAD_INPUTS), timeout=90)
    assert sorted(m["reason"] for m in dlq) == sorted(BAD_INPUTS)
    for message in dlq:
        assert base64.b64decode(message["raw"]) == BAD_INPUTS[message["reason"]]
        assert message["detail"] and message["source"]["topic"] == topics.events
        assert message["source"]["offset"] >= 0
    wait_for(lambda: len(worker.logged_events()) == len(good), 60, "the good events in the log", worker)
    assert sorted(worker.logged_events()["event_id"]) == sorted(e["event_id"] for e in good)
    assert worker.alive()


def test_duplicates_are_logged_once_also_across_a_restart(kafka_bootstrap, worker_env):
    """A re-sent event_id is dropped, in the same run and after the worker restarts."""
    topics, make = worker_env
    first = [ev.rating(f"u{i % 7}", f"i{i}", 4.0) for i in range(50)]
    with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
        producer.send_many(first + first[:10])
    worker = make().start()
    wait_for(worker.caught_up, 90, "the first run to process and log all 60 messages", worker)
    assert sorted(worker.logged_events()["event_id"]) == sorted(e["event_id"] for e in first)  # dropped in-run
    worker.stop(signal.SIGTERM)
    second = [ev.rating("u1", f"new{i}", 2.0) for i in range(5)]
    with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
        producer.send_many(first[10:30] + second)
    worker.start()
    wait_for(worker.caught_up, 90, "the second run to process and log the re-sent and the new events", worker)
    logged = worker.logged_events()
    assert logged["event_id"].is_unique
    assert set(logged["event_id"]) == {e["event_id"] for e in first + second}


def test_sigkill_mid_stream_loses_no_accepted_event(kafka_bootstrap, worker_env):
    """Kill -9 the worker while it is logging, restart it: every event is logged exactly once."""
    topics, make = worker_env
    sent = list(synthetic_events(30_000, n_users=300, n_items=100, seed=3))
    with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
        producer.send_many(sent)
    worker = make("--batch-size", "500").start()
    wait_for(lambda: worker.log.data_files("events") >= 3, 120, "the first batches in the log", worker)
    worker.stop(signal.SIGKILL)
    before = worker.logged_events()["event_id"].nunique()
    assert 0 < before < len(sent), "the kill must land mid-stream for this test to mean anything"
    worker.start()
    wanted = {e["event_id"] for e in sent}
    wait_for(lambda: worker.logged_events()["event_id"].nunique() == len(wanted), 240, "all events", worker)
    logged = worker.logged_events()
    assert set(logged["event_id"]) == wanted
    assert not logged.duplicated(["event_id", "item_id", "position"]).any()


def test_orphan_and_late_clicks_make_no_examples(kafka_bootstrap, worker_env):
    """A click without impression, and a click after the window, are logged but never positives."""
    topics, make = worker_env
    t0 = time.time()
    imp = _slate("u1", "r-late", t0, ["a", "b"])
    late = ev.click("u1", "r-late", "a", ts=t0 + 30)       # window is 10 s
    orphan = ev.click("u2", "r-unknown", "z", ts=t0 + 1)
    ontime = ev.click("u1", "r-late", "b", ts=t0 + 2)
    with EventProducer(kafka_bootstrap, topic=topics.events) as producer:
        producer.send_many([imp, orphan, ontime, late])
    worker = make("--attribution-window-s", "10").start()
    wait_for(worker.caught_up, 90, "the worker to process and log all four events", worker)
    examples = final_click_labels(worker.logged_examples()).set_index("item_id")
    assert sorted(examples.index) == ["a", "b"]        # one outcome per shown item, none from the orphan
    assert examples.loc["b", "label"] == 1.0
    assert examples.loc["a", "label"] == 0.0           # the late click did not make it positive
    assert set(worker.logged_events()["event_id"]) == {imp["event_id"], late["event_id"], orphan["event_id"],
                                                      ontime["event_id"]}
