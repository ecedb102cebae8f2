"""Shared fixtures: the real Kafka broker for integration tests, and the shared datasets.

When ``KAFKA_BOOTSTRAP_SERVERS`` is set the tests use that cluster. Otherwise, with
``STREAMREC_TEST_BROKER=testcontainers`` and a reachable Docker engine, testcontainers' Kafka
module starts one in a container; without Docker that choice skips the tests that need a broker.
By default one local KRaft broker is started for the whole session (``stream.tools.kafka_local``)
and stopped at the end.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from stream.tools import kafka_local
from stream.config import SHARED_DATA



TESTCONTAINERS_IMAGE = "confluentinc/cp-kafka:7.6.0"  # the image testcontainers' Kafka module knows, in KRaft mode


@contextmanager
def _testcontainers_broker() -> Iterator[str]:
    """A broker in Docker through testcontainers' Kafka module; skips when Docker is unreachable."""
    try:
        import docker
        from testcontainers.community.kafka import KafkaContainer
    except ImportError as err:
        pytest.skip(f"STREAMREC_TEST_BROKER=testcontainers needs the dev extras (pip install -e '.[dev]'): {err}")
    try:
        docker.from_env().ping()
    except Exception as err:  # noqa: BLE001 (any way of not reaching the engine means: no Docker here)
        pytest.skip(f"STREAMREC_TEST_BROKER=testcontainers but no Docker engine is reachable ({type(err).__name__})")
    with KafkaContainer(TESTCONTAINERS_IMAGE).with_kraft().with_env("KAFKA_NUM_PARTITIONS", "2") as container:
        yield container.get_bootstrap_server()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Bootstrap servers of a real broker: the one named by KAFKA_BOOTSTRAP_SERVERS, one in Docker
    (STREAMREC_TEST_BROKER=testcontainers), or a local one."""
    choice = os.environ.get("STREAMREC_TEST_BROKER", "local")
    if choice not in ("local", "testcontainers"):
        raise pytest.UsageError(f"STREAMREC_TEST_BROKER must be 'local' or 'testcontainers', not {choice!r}")
    if choice == "testcontainers" and not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        with _testcontainers_broker() as bootstrap:
            yield bootstrap
        return
    with kafka_local.broker_for_run(home=tmp_path_factory.mktemp("kafka"), partitions=2) as bootstrap:
        yield bootstrap


@pytest.fixture
def unique_name() -> str:
    """A fresh suffix so that tests sharing the broker never share topics or consumer groups."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip with a clear message when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (clone the project next to ../shared)")
    return SHARED_DATA
