"""Broken snapshots against a replica on the real broker (issue 19, item 3): a truncated snapshot
whose digest matches its manifest is refused once, and what the learner publishes after it
still applies; a replica started with it newest on disk serves the newest valid one."""
from __future__ import annotations

import asyncio
import hashlib
import json

import numpy as np
import pytest

from learner.updates import ModelRows, write_snapshot
from tests.integration.test_serving_kafka import (K, announce, base_model, metric, recommend, replica, rows,
                                                  send_delta, until)
from tests.integration.test_serving_kafka import producer, topics  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.kafka, pytest.mark.hardening]


def truncated_snapshot(store, seq):
    """A snapshot cut short before the learner hashed it: the digest matches, the tensors do not parse."""
    manifest = write_snapshot(store, "mf", seq, 3.5, -1.0, *base_model(seed=seq))
    folder = store / manifest["path"]
    data = (folder / "rows.safetensors").read_bytes()[:100]
    (folder / "rows.safetensors").write_bytes(data)
    manifest["files"]["rows.safetensors"] = hashlib.sha256(data).hexdigest()
    on_disk = {key: value for key, value in manifest.items() if key != "path"}
    (folder / "manifest.json").write_text(json.dumps(on_disk))
    return manifest


def test_a_truncated_snapshot_is_refused_once_and_later_deltas_apply(kafka_bootstrap, topics, producer, tmp_path):
    write_snapshot(tmp_path, "mf", 7, 3.5, -1.0, *base_model())

    async def body():
        async with replica(kafka_bootstrap, topics, tmp_path) as (app, session):
            announce(producer, topics, truncated_snapshot(tmp_path, 8))
            send_delta(producer, topics, 9, rows(["u1"], np.random.default_rng(1)), ModelRows.empty(K))

            async def moved_on():
                return (await recommend(session, "u1"))["model_version"] == "mf-9"
            await until(moved_on, 30, "mf-9 served after the refused mf-8")
            assert metric(app, "streamrec_serving_snapshot_refusals_total", reason="tensors") == 1
            async with session.get("/readyz") as response:
                assert response.status == 200
    asyncio.run(body())


def test_a_replica_started_with_a_truncated_newest_snapshot_serves_the_newest_valid_one(kafka_bootstrap, topics,
                                                                                        tmp_path):
    for seq in (7, 8):
        write_snapshot(tmp_path, "mf", seq, 3.5, -1.0, *base_model(seed=seq))
    truncated_snapshot(tmp_path, 9)

    async def body():
        async with replica(kafka_bootstrap, topics, tmp_path) as (app, session):
            assert (await recommend(session, "u1"))["model_version"] == "mf-8"
            assert metric(app, "streamrec_serving_snapshot_refusals_total", reason="tensors") == 1
    asyncio.run(body())
