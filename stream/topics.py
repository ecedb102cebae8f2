"""Creates streamrec's topics explicitly (the broker does not auto-create them).

``model.updates`` has one partition so that every replica sees deltas in publish order, and is
compacted per key: snapshot manifests share a key per model, so the newest always survives.
"""
from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from stream.config import Topics

log = logging.getLogger(__name__)


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
