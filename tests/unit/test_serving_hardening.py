"""Serving against what tried to break it (issue 19, items 3-5): broken snapshots, slow clients,
clients that leave mid-request and ids that are not valid Unicode. No broker: the model follower
runs on a stand-in consumer, the HTTP tests on real loopback sockets."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import orjson
import pytest

from learner.updates import ModelRows, SnapshotError, delta_messages, read_snapshot, write_snapshot
from serving import app as serving_app
from serving.api import BadRequest, parse_recommendation_query
from serving.live import LiveModel
from serving.metrics import ServingMetrics
from serving.updates import ModelUpdater
from tests.unit.test_serving_api import first_model, model_rows, replica

pytestmark = pytest.mark.hardening
K = 4


def rows(prefix: str, n: int, k: int = K, seed: int = 0) -> ModelRows:
    rng = np.random.default_rng(seed)
    return ModelRows([f"{prefix}{j}" for j in range(n)], rng.normal(size=(n, k)), rng.normal(size=n) * 0.1,
                     np.zeros(n))


def snapshot(store: Path, seq: int, **sides) -> Path:
    """A valid snapshot ``mf-<seq>``; its folder."""
    users, items = sides.get("users", rows("u", 5)), sides.get("items", rows("i", 7))
    return store / write_snapshot(store, "mf", seq, 3.5, -1.0, users, items)["path"]


def rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace a file of a snapshot and its digest in the manifest: a damage the digest cannot see
    (the learner wrote a short file, then hashed it)."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def truncate(folder: Path) -> None:
    data = (folder / "rows.safetensors").read_bytes()
    rewrite(folder, "rows.safetensors", data[: len(data) // 2])


def bad_ids(folder: Path, ids: dict) -> None:
    rewrite(folder, "ids.json", json.dumps(ids).encode())


def edit_manifest(folder: Path, **fields) -> None:
    path = folder / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def unreadable(folder: Path) -> None:
    (folder / "ids.json").unlink()
    (folder / "ids.json").mkdir()  # reading it fails with an OSError other than "missing"


FAULTS = {
    "truncated, digest matching": (truncate, "tensors"),
    "not safetensors": (lambda f: rewrite(f, "rows.safetensors", b"\x08" + b"\0" * 7 + b"{}garbage"), "tensors"),
    "ids not strings": (lambda f: bad_ids(f, {"users": list(range(5)), "items": [f"i{j}" for j in range(7)]}), "ids"),
    "a repeated id": (lambda f: bad_ids(f, {"users": ["u0"] * 5, "items": [f"i{j}" for j in range(7)]}), "ids"),
    "a lone surrogate": (lambda f: bad_ids(f, {"users": ["\ud800"] + [f"u{j}" for j in range(1, 5)],
                                               "items": [f"i{j}" for j in range(7)]}), "ids"),
    "fewer ids than rows": (lambda f: bad_ids(f, {"users": ["u0"], "items": [f"i{j}" for j in range(7)]}), "shape"),
    "not the manifest's row count": (lambda f: edit_manifest(f, n_items=8), "shape"),
    "an unreadable file": (unreadable, "io"),
    "no manifest fields": (lambda f: (f / "manifest.json").write_text("[1, 2]"), "manifest"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_any_fault_in_a_snapshot_is_a_refusal_with_its_reason(tmp_path, fault):
    damage, reason = FAULTS[fault]
    folder = snapshot(tmp_path, 1)
    damage(folder)
    with pytest.raises(SnapshotError) as refused:
        read_snapshot(folder)
    assert refused.value.reason == reason, str(refused.value)


def test_users_and_items_of_different_factor_counts_are_a_shape_refusal(tmp_path):
    folder = snapshot(tmp_path, 1, items=rows("i", 7, k=K + 1))
    with pytest.raises(SnapshotError) as refused:
        read_snapshot(folder)
    assert refused.value.reason == "shape" and "factors" in str(refused.value)


def refusals(metrics: ServingMetrics) -> dict[str, float]:
    return {s.labels["reason"]: s.value for family in metrics.registry.collect()
            if family.name == "streamrec_serving_snapshot_refusals" for s in family.samples
            if s.name.endswith("_total")}


def updater(store: Path) -> ModelUpdater:
    metrics = ServingMetrics()
    return ModelUpdater(store, "mf", LiveModel(4, metrics), metrics, lambda: [])


def test_startup_serves_the_newest_valid_snapshot_and_logs_why_it_passed_over_the_newer(tmp_path, caplog):
    for seq in (7, 8):
        snapshot(tmp_path, seq)
    truncate(snapshot(tmp_path, 9))
    bad_ids(snapshot(tmp_path, 10), {"users": ["u0"] * 5, "items": [f"i{j}" for j in range(7)]})
    u = updater(tmp_path)
    with caplog.at_level(logging.WARNING, logger="serving.updates"):
        assert asyncio.run(u.bootstrap()) is True
    assert u.live.current.version == "mf-8"
    assert refusals(u.metrics) == {"tensors": 1.0, "ids": 1.0}
    logged = [r.getMessage() for r in caplog.records]
    assert any("mf-9" in m and "tensors" in m for m in logged) and any("mf-10" in m and "ids" in m for m in logged)


def delta_records(seq: int, users: ModelRows, items: ModelRows) -> list[tuple[bytes, bytes]]:
    return [(key.encode(), orjson.dumps(value)) for key, value in delta_messages("mf", seq, 3.5, -1.0, users, items)]


def announcement(store: Path, folder: Path) -> tuple[bytes, bytes]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return b"snapshot/mf", orjson.dumps({**manifest, "path": str(folder.relative_to(store))})


def test_the_follower_passes_over_a_bad_announcement_and_applies_what_follows(tmp_path):
    snapshot(tmp_path, 7)
    bad = snapshot(tmp_path, 8)
    truncate(bad)
    u = updater(tmp_path)

    async def body():
        assert await u.bootstrap()  # mf-8 refused, mf-7 served
        await u.process([announcement(tmp_path, bad), *delta_records(9, rows("u", 2, seed=3), rows("i", 2, seed=4))])
    asyncio.run(body())
    assert u.live.current.version == "mf-9"
    assert refusals(u.metrics) == {"tensors": 2.0}  # at start-up, then announced


class FakeRecord:
    def __init__(self, offset: int, key: bytes, value: bytes) -> None:
        self.offset, self.key, self.value = offset, key, value


class FakeConsumer:
    """A one-partition ``model.updates`` for ``ModelUpdater.follow``: hands out ``log`` two records
    per fetch, and loses the broker once, after ``fail_after`` records."""

    log: list[tuple[bytes, bytes]] = []
    fail_after = 0
    failed = False

    def __init__(self, **_) -> None:
        self._position = 0

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def topics(self) -> set[str]: return {"model.updates"}
    def assign(self, _) -> None: ...
    async def seek_to_beginning(self, _) -> None: self._position = 0
    def seek(self, _, offset: int) -> None: self._position = offset
    async def end_offsets(self, tps) -> dict: return {tp: len(self.log) for tp in tps}
    async def position(self, _) -> int: return self._position

    async def getmany(self, tp, timeout_ms: int, max_records: int) -> dict:
        cls = type(self)
        if self._position >= cls.fail_after and not cls.failed:
            cls.failed = True
            raise ConnectionError("the broker went away")
        batch = [FakeRecord(o, *self.log[o]) for o in range(self._position, min(self._position + 2, len(self.log)))]
        self._position += len(batch)
        if not batch:
            await asyncio.sleep(timeout_ms / 1000)
        return {tp: batch} if batch else {}


def test_a_restarted_follower_resumes_after_what_it_handled(tmp_path, monkeypatch):
    """The broker fails after a bad announcement: the follower starts again where it stopped, so
    the announcement is refused once and the delta before it is not read twice."""
    import aiokafka

    bad = snapshot(tmp_path, 2)
    truncate(bad)
    FakeConsumer.log = [*delta_records(1, rows("u", 2), rows("i", 3)), announcement(tmp_path, bad),
                        *delta_records(3, rows("u", 2, seed=1), rows("i", 3, seed=2))]
    FakeConsumer.fail_after, FakeConsumer.failed = 2, False
    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", FakeConsumer)
    monkeypatch.setattr(serving_app, "RETRY_S", 0.01)
    u = updater(tmp_path)

    async def body():
        follower = asyncio.create_task(serving_app._retrying("model.updates", lambda: u.follow("x", "model.updates")))
        try:
            async with asyncio.timeout(30):
                while u.live.current is None or u.live.current.version != "mf-3":
                    await asyncio.sleep(0.01)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
    asyncio.run(body())
    assert FakeConsumer.failed
    assert refusals(u.metrics) == {"tensors": 1.0}
    assert u.metrics.registry.get_sample_value("streamrec_serving_deltas_total", {"result": "skipped"}) is None


# -- slow clients ------------------------------------------------------------------------------

async def stalled(port: int, partial: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(partial)
    await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, timeout_s: float = 30.0) -> bytes:
    """What the server sent until it closed the connection (TimeoutError if it never does)."""
    async with asyncio.timeout(timeout_s):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def until(condition, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def sample(app, name: str, **labels) -> float:
    return app.metrics.registry.get_sample_value(name, labels) or 0.0


def test_half_open_connections_are_closed_after_the_header_timeout_while_requests_are_answered(tmp_path):
    async def body():
        async with replica(tmp_path, first_model(*model_rows()), header_timeout_s=3.0, max_connections=400) \
                as (app, session):
            held = [await stalled(app.port, b"GET /recommendations?user_id=u1 HTTP/1.1\r\nHost: 127")
                    for _ in range(200)]
            await until(lambda: sample(app, "streamrec_serving_connections") >= 200)

            async def ask(j):
                async with session.get("/recommendations", params={"user_id": f"u{j % 50}", "k": "5"},
                                       timeout=30) as response:
                    return response.status, len((await response.json())["items"])
            answers = await asyncio.gather(*(ask(j) for j in range(40)))
            assert answers == [(200, 5)] * 40
            leftovers = await asyncio.gather(*(closed_by_server(reader) for reader, _ in held))
            assert leftovers == [b""] * 200  # closed without an answer: the request never arrived
            for _, writer in held:
                writer.close()
            assert sample(app, "streamrec_serving_requests_total", route="recommendations", status="2xx") == 40
    asyncio.run(body())


def test_past_the_connection_cap_a_new_connection_gets_a_503_that_says_why(tmp_path, caplog):
    async def body():
        async with replica(tmp_path, first_model(*model_rows()), max_connections=5) as (app, session):
            held = [await stalled(app.port, b"GET /healthz HTTP/1.1\r\n") for _ in range(5)]
            await until(lambda: sample(app, "streamrec_serving_connections") == 5)
            reader, writer = await stalled(app.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await closed_by_server(reader)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer
            assert sample(app, "streamrec_serving_connections_refused_total") == 1
            for _, w in held:
                w.close()
            await until(lambda: sample(app, "streamrec_serving_connections") == 0)
            async with session.get("/healthz", timeout=30) as response:
                assert response.status == 200
    with caplog.at_level(logging.INFO, logger="serving.connections"):
        asyncio.run(body())
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]  # the spell began, and ended


def test_a_body_slower_than_the_body_timeout_gets_408_and_the_connection_closes(tmp_path):
    async def body():
        async with replica(tmp_path, first_model(*model_rows()), body_timeout_s=1.0) as (app, _):
            reader, writer = await stalled(app.port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                                     b"application/json\r\nContent-Length: 100\r\n\r\n{\"user_id\"")
            answer = await closed_by_server(reader)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in answer
    asyncio.run(body())


# -- honest 5xx counts and strict ids ----------------------------------------------------------

def test_a_client_that_leaves_mid_body_is_counted_apart_and_not_logged_as_a_failure(tmp_path, caplog):
    async def body():
        async with replica(tmp_path, first_model(*model_rows())) as (app, _):
            _, writer = await stalled(app.port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            writer.close()
            await until(lambda: sample(app, "streamrec_serving_client_aborts_total", route="predict") == 1)
            assert sample(app, "streamrec_serving_requests_total", route="predict", status="5xx") == 0
    with caplog.at_level(logging.INFO, logger="serving"):
        asyncio.run(body())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def raw_get(port: int, target: bytes) -> tuple[int, dict]:
    reader, writer = await stalled(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await closed_by_server(reader)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(payload)


@pytest.mark.parametrize("query, name", [
    (b"user_id=%ff%fe", "user_id"),             # not UTF-8
    (b"user_id=%ED%A0%80", "user_id"),          # a lone surrogate, as CESU-8 would write it
    (b"user_id=u%C0%AF", "user_id"),            # an overlong encoding of "/"
    (b"user_id=u1&policy=%E2%82", "policy"),    # cut in the middle of a character
])
def test_ids_that_are_not_valid_unicode_get_a_400_naming_the_parameter(tmp_path, query, name):
    async def body():
        async with replica(tmp_path, first_model(*model_rows())) as (app, _):
            status, data = await raw_get(app.port, b"/recommendations?" + query)
            assert status == 400 and data["error"] == f"{name} is not valid UTF-8 once percent-decoded"
            status, data = await raw_get(app.port, b"/recommendations?user_id=%EF%BF%BD")  # U+FFFD itself is valid
            assert status == 200 and data["user_id"] == "\ufffd"
    asyncio.run(body())


def test_a_lone_surrogate_given_as_a_string_is_refused():
    with pytest.raises(BadRequest, match="user_id is not valid Unicode"):
        parse_recommendation_query({"user_id": "u\udc80"})
