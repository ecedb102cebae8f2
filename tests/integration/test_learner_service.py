"""``streamrec learner`` against the real broker: trains, publishes, checkpoints, resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
from kafka import KafkaProducer

from learner.updates import DeltaAssembler, latest_snapshot, read_snapshot
from stream.events import Rating
from stream.examples import Example, example_batch, rating_example
from stream.topics import Topics
from stream.tools.kafka_local import free_port
from stream.tools.scrape import scrape
from stream.topics import ensure_topics
from tests.workerproc import read_topic, wait_for

pytestmark = pytest.mark.kafka


def _examples(n: int, seed: int = 0) -> list[Example]:
    """Ratings of a planted rank-2 matrix, plus every 10th example flagged anomalous."""
    rng = np.random.default_rng(seed)
    pu, qi = rng.normal(size=(60, 2)), rng.normal(size=(40, 2))
    out = []
    for j in range(n):
        u, i = int(rng.integers(60)), int(rng.integers(40))
        example = rating_example(Rating(schema_version=1, event_id=f"e{seed}-{j}", user_id=f"u{u}",
                                        ts=1_700_000_000.0 + j, item_id=f"i{i}",
                                        value=float(np.clip(3 + pu[u] @ qi[i], 1, 5))))
        out.append(msgspec.structs.replace(example, anomalous=j % 10 == 9))
    return out


class LearnerProcess:
    def __init__(self, bootstrap: str, prefix: str, root: Path) -> None:
        self.bootstrap, self.prefix, self.root = bootstrap, prefix, root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> "LearnerProcess":
        self.runs += 1
        self.port = free_port()
        out = open(self.root / f"learner-{self.runs}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "learner", "--bootstrap-servers", self.bootstrap,
             "--topic-prefix", self.prefix, "--store-dir", str(self.root / "store"),
             "--checkpoint-dir", str(self.root / "ckpt"), "--web-port", str(self.port), "--n-factors", "8",
             "--batch-size", "200", "--publish-interval-s", "0.3", "--checkpoint-interval-s", "0.5",
             "--snapshot-interval-s", "1", "--device", "cpu"],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        return self

    def metric(self, name: str, **labels: str) -> float:
        samples = scrape(f"http://127.0.0.1:{self.port}/metrics")
        return sum(v for (n, lab), v in samples.items() if n == name and all((k, l) in lab for k, l in labels.items()))

    def checkpoint_state(self) -> dict | None:
        pointer = self.root / "ckpt" / "LATEST"
        if not pointer.exists():
            return None
        return json.loads((self.root / "ckpt" / pointer.read_text() / "learner.json").read_text())

    def output(self) -> str:
        return "\n".join((self.root / f"learner-{i}.log").read_text(errors="replace") for i in range(1, self.runs + 1))

    def kill(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)


def _checkpointed(learner: LearnerProcess) -> int:
    state = learner.checkpoint_state()
    return sum(state["offsets"].values()) if state else 0


def test_learner_trains_publishes_and_resumes_from_its_offsets(kafka_bootstrap, unique_name, tmp_path):
    """SIGKILL the learner mid-stream: the restart resumes at the checkpointed offsets, loses nothing."""
    topics = Topics(f"t{unique_name}.")
    ensure_topics(kafka_bootstrap, 2, topics)
    examples = _examples(6000)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")

    def send(part: list[Example]) -> None:
        for e in part:
            producer.send(topics.examples, key=e.user_id.encode(), value=msgspec.json.encode(e))
        producer.flush()

    send(examples[:3000])

    learner = LearnerProcess(kafka_bootstrap, topics.prefix, tmp_path).start()
    try:
        wait_for(lambda: _checkpointed(learner) >= 3000, 120, "a checkpoint of the first 3000 examples")
        # The last quarter is produced only after the kill, so the kill always lands mid-stream
        # (a fast learner used to checkpoint all 6000 before it).
        send(examples[3000:4500])
        wait_for(lambda: 3000 < _checkpointed(learner), 120, "a checkpoint inside the second half")
        learner.kill(signal.SIGKILL)
        resumed_from = _checkpointed(learner)
        assert resumed_from < 6000, "the kill must land before the end for this test to mean anything"
        send(examples[4500:])

        learner.start()
        wait_for(lambda: _checkpointed(learner) == 6000, 120, "the rest of the stream")
        second_run = learner.metric("streamrec_learner_examples_total") + learner.metric(
            "streamrec_learner_skipped_total", reason="anomalous")
        assert second_run == 6000 - resumed_from          # only what came after the checkpoint
        assert learner.metric("streamrec_learner_skipped_total", reason="anomalous") > 0
        rmse = learner.metric("streamrec_prequential_rmse", kind="rating")
        assert 0 < rmse < 0.9                                # learned: the labels' std is about 1.4
    finally:
        learner.kill(signal.SIGTERM)
        producer.close()

    snapshot = read_snapshot(latest_snapshot(tmp_path / "store", "mf"))
    assert snapshot.manifest["n_users"] == 60 and snapshot.items.vectors.shape == (40, 8)
    updates = read_topic(kafka_bootstrap, topics.model_updates, 5, timeout=30)
    assembler = DeltaAssembler()
    deltas = [d for d in (assembler.add(v) for v in updates if v["type"] == "delta") if d is not None]
    assert deltas and [d.seq for d in deltas] == sorted(d.seq for d in deltas)
    assert any(v["type"] == "snapshot" for v in updates)


def test_the_learner_publishes_its_rating_range_with_deltas_and_snapshots(tmp_path, monkeypatch):
    """``STREAMREC_RATING_RANGE`` sets a new model's range, and both kinds of publish carry it.
    No broker: a stand-in producer records what the learner sends."""
    from learner.service import Learner
    from learner.settings import LearnerSettings

    class Recorder:
        def __init__(self) -> None:
            self.sent: list[tuple[str, dict]] = []

        def send(self, topic: str, key: bytes, value: bytes) -> None:
            self.sent.append((key.decode(), json.loads(value)))

        def flush(self, timeout: float | None = None) -> None:
            pass

    monkeypatch.setenv("STREAMREC_RATING_RANGE", "1,5")
    learner = Learner(LearnerSettings(bootstrap_servers="unused:9092", model="mf", n_factors=4, device="cpu",
                                      store_dir=tmp_path / "store", checkpoint_dir=tmp_path / "ckpt"))
    assert learner.model.rating_range == (1.0, 5.0)
    learner.learn(example_batch(_examples(300)))
    producer = Recorder()
    assert learner.publish_delta(producer) > 0
    learner.publish_snapshot(producer)
    assembler = DeltaAssembler()
    deltas = [d for key, value in producer.sent if key == "delta/mf" and (d := assembler.add(value))]
    assert [d.rating_range for d in deltas] == [(1.0, 5.0)]
    assert [value["rating_range"] for key, value in producer.sent if key == "snapshot/mf"] == [[1.0, 5.0]]
    assert read_snapshot(latest_snapshot(tmp_path / "store", "mf")).rating_range == (1.0, 5.0)
