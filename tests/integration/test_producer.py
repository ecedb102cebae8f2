"""The producer SDK: validation before any network use, keys, config, counters, and a real round trip."""
from __future__ import annotations

import time

import msgspec
import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import NewTopic

from stream import producer as producer_module
from stream.topics import EVENTS_TOPIC
from stream.events import ValidationError, click, decode, impression, rating
from stream.producer import EventProducer


class FakeFuture:
    def __init__(self) -> None:
        self.errbacks: list = []

    def add_errback(self, errback) -> FakeFuture:
        self.errbacks.append(errback)
        return self


class FakeKafkaProducer:
    """Records what the SDK hands to kafka-python; ``instances`` holds every one created."""

    instances: list[FakeKafkaProducer] = []

    def __init__(self, **config: object) -> None:
        self.config = config
        self.records: list[tuple[str, bytes, bytes | None]] = []
        self.futures: list[FakeFuture] = []
        self.calls: list[str] = []
        FakeKafkaProducer.instances.append(self)

    def send(self, topic: str, value: bytes, key: bytes | None) -> FakeFuture:
        self.records.append((topic, value, key))
        self.futures.append(FakeFuture())
        return self.futures[-1]

    def flush(self, timeout: float | None = None) -> None:
        self.calls.append("flush")

    def close(self, timeout: float | None = None) -> None:
        self.calls.append("close")


@pytest.fixture
def fake_kafka(monkeypatch: pytest.MonkeyPatch) -> type[FakeKafkaProducer]:
    FakeKafkaProducer.instances = []
    monkeypatch.setattr(producer_module, "KafkaProducer", FakeKafkaProducer)
    return FakeKafkaProducer


def test_bootstrap_servers_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    with pytest.raises(ValueError, match="KAFKA_BOOTSTRAP_SERVERS"):
        EventProducer()


def test_an_invalid_event_raises_before_any_network_use() -> None:
    producer = EventProducer("127.0.0.1:1")  # nothing listens there: connecting would fail or hang
    bad = rating("u1", "i1", 4.0)
    bad["value"] = float("nan")
    start = time.monotonic()
    with pytest.raises(ValidationError, match="value"):
        producer.send(bad)
    slate = [{"item_id": "i1", "position": 1, "propensity": 0.0}]
    with pytest.raises(ValidationError, match=r"event 1: items\[0\]\.propensity") as err:
        producer.send_many([rating("u1", "i1", 4.0), impression("u1", "r1", "m1", "greedy", slate)])
    assert [p.path for p in err.value.problems] == ["[1].items[0].propensity"]
    assert time.monotonic() - start < 1.0
    assert producer.sent == 0
    producer.close()  # nothing to flush: never connected


def test_send_keys_by_user_and_configures_kafka(fake_kafka: type[FakeKafkaProducer], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    producer = EventProducer(compression_type="gzip")
    assert fake_kafka.instances == []  # lazily connected
    event = click("ü-7", "r1", "i1", position=1)
    producer.send(event)
    (client,) = fake_kafka.instances
    assert client.config["bootstrap_servers"] == "broker:9092"
    assert client.config["acks"] == "all" and client.config["compression_type"] == "gzip"
    assert client.config["linger_ms"] == 5 and client.config["batch_size"] >= 64 * 1024
    ((topic, value, key),) = client.records
    assert topic == EVENTS_TOPIC and key == "ü-7".encode() and msgspec.to_builtins(decode(value)) == event
    assert producer.sent == 1


def test_send_many_sends_nothing_when_one_event_is_invalid(fake_kafka: type[FakeKafkaProducer]) -> None:
    producer = EventProducer("broker:9092", topic="t")
    good = [rating(f"u{k}", "i1", 3.0) for k in range(3)]
    with pytest.raises(ValidationError) as err:
        producer.send_many([*good, {"type": "rating"}])
    assert err.value.problems[0].path == "[3].schema_version"
    assert producer.sent == 0 and all(not c.records for c in fake_kafka.instances)
    assert len(producer.send_many(good)) == 3 and producer.sent == 3


def test_send_raw_bypasses_validation(fake_kafka: type[FakeKafkaProducer]) -> None:
    producer = EventProducer("broker:9092")
    producer.send_raw(b"\xff not json", key=None)
    assert fake_kafka.instances[0].records == [(EVENTS_TOPIC, b"\xff not json", None)]


def test_delivery_failures_are_counted(fake_kafka: type[FakeKafkaProducer]) -> None:
    producer = EventProducer("broker:9092")
    producer.send(rating("u1", "i1", 2.0))
    error = TimeoutError("no ack")
    for errback in fake_kafka.instances[0].futures[0].errbacks:
        errback(error)
    assert producer.failed == 1 and producer.last_error is error


def test_context_manager_flushes_and_closes(fake_kafka: type[FakeKafkaProducer]) -> None:
    with EventProducer("broker:9092") as producer:
        producer.send(rating("u1", "i1", 5.0))
    assert fake_kafka.instances[0].calls == ["flush", "close"]


@pytest.mark.kafka
def test_events_round_trip_through_a_real_broker(kafka_bootstrap: str, unique_name: str) -> None:
    topic = f"test-producer-{unique_name}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        admin.close()
    sent = [
        impression("alice", "r1", "m1", "softmax", [{"item_id": "i1", "position": 1, "propensity": 0.3}]),
        click("alice", "r1", "i1", position=1),
        rating("bob", "i2", 4.0),
        rating("carol", "i3", 1.5),
        rating("alice", "i4", 2.0),
    ]
    with EventProducer(kafka_bootstrap, topic=topic) as producer:
        producer.send_many(sent)
    assert producer.sent == 5 and producer.failed == 0

    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
        consumer_timeout_ms=1000,
    )
    received = []
    deadline = time.monotonic() + 60
    try:
        while len(received) < len(sent) and time.monotonic() < deadline:
            received += list(consumer)
    finally:
        consumer.close()
    assert len(received) == len(sent)
    for record in received:
        assert record.key == decode(record.value).user_id.encode()
    assert sorted((msgspec.to_builtins(decode(r.value)) for r in received), key=lambda e: e["event_id"]) == sorted(
        sent, key=lambda e: e["event_id"])
    alice = [r for r in received if r.key == b"alice"]
    assert len({r.partition for r in alice}) == 1  # one user, one partition, in order
    assert [decode(r.value).event_id for r in alice] == [e["event_id"] for e in sent if e["user_id"] == "alice"]
