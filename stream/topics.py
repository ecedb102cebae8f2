"""The topics (contract, DESIGN.md "Kafka"): their names, and their explicit creation (the broker
does not auto-create them).

``model.updates`` has one partition so that every replica sees deltas in publish order, and is
compacted per key: snapshot manifests share a key per model, so the newest always survives.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)

# Topic names (contract, DESIGN.md "Kafka").
EVENTS_TOPIC = "events"
DLQ_TOPIC = "events.dlq"
EXAMPLES_TOPIC = "examples"
ANOMALIES_TOPIC = "anomalies"
MODEL_UPDATES_TOPIC = "model.updates"
ALL_TOPICS = (EVENTS_TOPIC, DLQ_TOPIC, EXAMPLES_TOPIC, ANOMALIES_TOPIC, MODEL_UPDATES_TOPIC)


@dataclass(frozen=True)
class Topics:
    """The topic names one deployment uses: DESIGN.md's names, behind an optional namespace prefix.

    The prefix (``STREAMREC_TOPIC_PREFIX``, empty by default) lets several deployments, or
    several tests, share one cluster without sharing topics.
    """

    prefix: str = ""

    @property
    def events(self) -> str:
        return self.prefix + EVENTS_TOPIC

    @property
    def dlq(self) -> str:
        return self.prefix + DLQ_TOPIC

    @property
    def examples(self) -> str:
        return self.prefix + EXAMPLES_TOPIC

    @property
    def anomalies(self) -> str:
        return self.prefix + ANOMALIES_TOPIC

    @property
    def model_updates(self) -> str:
        return self.prefix + MODEL_UPDATES_TOPIC

    def all(self) -> tuple[str, ...]:
        return tuple(self.prefix + name for name in ALL_TOPICS)



def topic_specs(partitions: int, topics: Topics = Topics()) -> list[NewTopic]:
    """The topics of DESIGN.md with their partition counts and configs."""
    specs = []
    for name in topics.all():
        if name == topics.model_updates:
            specs.append(NewTopic(name, 1, 1, topic_configs={"cleanup.policy": "compact"}))
        else:
            specs.append(NewTopic(name, partitions, 1))
    return specs


def ensure_topics(bootstrap_servers: str, partitions: int = 4, topics: Topics = Topics()) -> list[str]:
    """Create whichever of streamrec's topics do not exist yet; return the names created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="streamrec-admin")
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topic_specs(partitions, topics) if t.name not in existing]
        created = []
        for spec in missing:
            try:
                admin.create_topics([spec])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s with %d partitions", ", ".join(created), partitions)
        return created
    finally:
        admin.close()


def end_offsets(bootstrap_servers: str, topic: str) -> dict[int, int]:
    """The end offset of every partition of ``topic`` (empty when it does not exist)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return {tp.partition: offset for tp, offset in consumer.end_offsets(partitions).items()}
    finally:
        consumer.close()
