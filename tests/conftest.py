"""Shared fixtures: the real Kafka broker for integration tests, and the shared datasets.

When ``KAFKA_BOOTSTRAP_SERVERS`` is set the tests use that cluster; otherwise one local KRaft
broker is started for the whole session (``stream.tools.kafka_local``) and stopped at the end.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from stream.tools import kafka_local
from stream.config import SHARED_DATA



@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Bootstrap servers of a real broker: the one named by KAFKA_BOOTSTRAP_SERVERS, or a local one."""
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
