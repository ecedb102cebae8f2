"""The producer SDK: validated events onto the ``events`` topic, keyed by user_id.

``EventProducer`` wraps kafka-python's ``KafkaProducer`` with the event contract: every event is
validated and encoded (``stream.events.encode``, the validator the worker decodes with) before
anything touches the network, so an invalid event raises ``ValidationError`` naming its fields
and nothing is sent (a ``ts`` more than ``DEFAULT_MAX_FUTURE_S`` ahead of this machine's clock
included). Keys are the user_id, so one user's events stay ordered in one partition. Writes use
``acks="all"`` with the idempotent producer, and small linger + large batches for throughput.

The Kafka client is created on the first send, so constructing (and validating with) an
``EventProducer`` needs no broker. Record timestamps are the send time, not the event's ``ts``:
replayed history (MovieLens is from 1997) would otherwise fall outside the topic's retention.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from types import TracebackType

from kafka import KafkaProducer
from kafka.producer.future import FutureRecordMetadata

from stream.topics import EVENTS_TOPIC
from stream.events import ValidationError, encode

DEFAULT_LINGER_MS = 5
DEFAULT_BATCH_SIZE = 256 * 1024


class EventProducer:
    """Sends contract-checked events to Kafka; a context manager that flushes and closes on exit.

    ``overrides`` go to ``KafkaProducer`` as they are (e.g. ``compression_type="gzip"``,
    ``client_id``); ``sent`` counts events handed to the client, ``failed`` those whose delivery
    failed (the cause is in ``last_error``).
    """

    def __init__(
        self,
        bootstrap_servers: str | list[str] | None = None,
        topic: str = EVENTS_TOPIC,
        *,
        linger_ms: int = DEFAULT_LINGER_MS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **overrides: object,
    ) -> None:
        servers = bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not servers:
            raise ValueError(
                "no Kafka bootstrap servers: pass bootstrap_servers='host:port' or set KAFKA_BOOTSTRAP_SERVERS"
            )
        self.topic = topic
        self.sent = 0
        self.failed = 0
        self.last_error: BaseException | None = None
        self._config = {
            "bootstrap_servers": servers,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": linger_ms,
            "batch_size": batch_size,
            **overrides,
        }
        self._client: KafkaProducer | None = None

    def send(self, event: dict) -> FutureRecordMetadata:
        """Validate and send one event; raises ``ValidationError`` (nothing sent) if it is invalid."""
        value = encode(event)
        return self._send(value, event["user_id"].encode("utf-8"))

    def send_many(self, events: Iterable[dict]) -> list[FutureRecordMetadata]:
        """Validate every event first, then send them all; if any is invalid, none is sent.

        The ``ValidationError`` paths are prefixed with the event's index, e.g. ``[3].items[0].propensity``.
        """
        records = []
        for index, event in enumerate(events):
            try:
                records.append((encode(event), event["user_id"].encode("utf-8")))
            except ValidationError as err:
                raise ValidationError([
                    problem._replace(
                        path=f"[{index}]" + (f".{problem.path}" if problem.path else ""),
                        message=f"event {index}: {problem.message}",
                    )
                    for problem in err.problems
                ]) from None
        return [self._send(value, key) for value, key in records]

    def send_raw(self, value: bytes, key: bytes | None = None) -> FutureRecordMetadata:
        """Send bytes as they are, BYPASSING validation: for tests and tools that inject bad input."""
        return self._send(value, key)

    def flush(self, timeout: float | None = None) -> None:
        """Block until every event sent so far is acknowledged (or failed), at most ``timeout`` s."""
        if self._client is not None:
            self._client.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush and release the connection; the producer reconnects if used again."""
        if self._client is not None:
            self._client.flush(timeout=timeout)
            self._client.close(timeout=timeout)
            self._client = None

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, value: bytes, key: bytes | None) -> FutureRecordMetadata:
        if self._client is None:
            self._client = KafkaProducer(**self._config)
        future = self._client.send(self.topic, value=value, key=key)
        future.add_errback(self._on_error)
        self.sent += 1
        return future

    def _on_error(self, error: BaseException) -> None:
        self.failed += 1
        self.last_error = error
