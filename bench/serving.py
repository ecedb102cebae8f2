"""Serving latency under concurrent load, against the same lookups in process, and model freshness.

One run, side by side:

- ``inprocess``: ``Recommender.recommend`` (scoring, policy, response) called one at a time in
  this process, on the same model and the same kind of request (greedy, k=10, random known users);
- ``http``: a ``streamrec serve`` replica (``python -m serving``) in a subprocess, loaded from
  the same snapshot, under a closed-loop load generator in another process (aiohttp, 16
  connections over loopback, each sending its next request when the previous one answered),
  bounded by a request count and a duration;
- ``floor``: the same load generator against a bare aiohttp server that answers every request
  with a fixed response of the same size: what the HTTP stack, loopback and the client cost on
  this machine with no recommendation work at all;
- ``freshness``: with the replica idle, a delta that puts one item on top of every slate is
  published to ``model.updates`` (kafka-python, as the learner does), and the time from the send
  to that item showing up in ``GET /recommendations`` is measured, several times.

The load generator shares the machine with the replica (2 cores here), so ``p50_ratio`` =
HTTP p50 / in-process p50 says what the HTTP path and the queueing of 16 concurrent clients cost,
and ``p99_floor_ratio`` = HTTP p99 / floor p99 what serving adds over an empty aiohttp handler.
Both processes score with one BLAS thread, as ``streamrec serve`` does.
The broker is ``KAFKA_BOOTSTRAP_SERVERS`` or a local one started for the run.

    python -m bench.serving            # 100,000 items x 64 factors
    python -m bench.serving --quick    # 10,000 items
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: as in ``streamrec serve``

import argparse  # noqa: E402
import asyncio
import http.client
import json
import multiprocessing
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import orjson

from bench.common import emit
from learner.updates import ModelRows, delta_messages, read_snapshot, write_snapshot
from serving.live import LiveModel
from serving.metrics import ServingMetrics
from serving.model import ServingModel
from serving.popularity import Popularity
from serving.recommend import Recommender
from serving.scorer import BatchScorer
from serving.seen import SeenItems
from stream.config import Topics
from stream.kafka_local import broker_for_run, free_port
from stream.topics import ensure_topics

P99_TARGET_MS = 20.0
FRESHNESS_TARGET_S = 2.0


def make_model(store: Path, n_users: int, n_items: int, k: int, seed: int) -> tuple[ModelRows, ModelRows]:
    """A random model of the requested size, written to ``store`` as snapshot ``mf-1``."""
    rng = np.random.default_rng(seed)
    users = ModelRows([f"u{j}" for j in range(n_users)], rng.normal(0, 0.3, (n_users, k)),
                      rng.normal(0, 0.1, n_users), rng.normal(0, 0.1, n_users))
    items = ModelRows([f"i{j}" for j in range(n_items)], rng.normal(0, 0.3, (n_items, k)),
                      rng.normal(0, 0.1, n_items), rng.normal(0, 0.1, n_items))
    write_snapshot(store, "mf", 1, 3.5, -2.0, users, items)
    return users, items


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(seconds) * 1000.0, q)), 3)


def measure_in_process(store: Path, n_users: int, n: int, k: int, seed: int) -> list[float]:
    """Latencies (s) of ``n`` sequential recommendations called in process."""
    model = ServingModel.from_snapshot(read_snapshot(store / "mf" / "mf-1"))
    live = LiveModel(1, ServingMetrics())
    live.swap(model)
    recommender = Recommender(live, BatchScorer(), SeenItems(), Popularity(), seed=seed)
    users = [f"u{j}" for j in np.random.default_rng(seed).integers(0, n_users, n)]

    async def run() -> list[float]:
        for user in users[:50]:
            await recommender.recommend(user, k)
        out = []
        for user in users:
            started = time.perf_counter()
            await recommender.recommend(user, k)
            out.append(time.perf_counter() - started)
        return out
    return asyncio.run(run())


def load_generator(url: str, n_users: int, concurrency: int, max_requests: int, max_seconds: float, k: int,
                   policy: str, seed: int, conn) -> None:
    """The client process: closed-loop load; sends (latencies, elapsed, errors) through ``conn``."""
    import aiohttp

    rng = np.random.default_rng(seed)
    paths = [f"/recommendations?user_id=u{u}&k={k}&policy={policy}" for u in rng.integers(0, n_users, max_requests)]

    async def run() -> tuple[list[float], float, int]:
        latencies: list[float] = []
        errors = 0
        next_path = 0
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(url, connector=connector) as session:
            started = time.perf_counter()
            deadline = started + max_seconds

            async def client() -> None:
                nonlocal next_path, errors
                while next_path < len(paths) and time.perf_counter() < deadline:
                    path = paths[next_path]
                    next_path += 1
                    t0 = time.perf_counter()
                    async with session.get(path) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                    latencies.append(time.perf_counter() - t0)
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return latencies, time.perf_counter() - started, errors
    conn.send(asyncio.run(run()))
    conn.close()


def run_load(url: str, n_users: int, concurrency: int, max_requests: int, max_seconds: float, k: int,
             policy: str, seed: int) -> tuple[list[float], float, int]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=load_generator, args=(url, n_users, concurrency, max_requests, max_seconds, k,
                                                       policy, seed, child))
    process.start()
    child.close()
    result = parent.recv()
    process.join()
    return result


def floor_server(port: int, body: bytes) -> None:
    """A bare aiohttp server answering ``body`` to every GET /recommendations (the floor peer)."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")
    app = web.Application()
    app.router.add_get("/recommendations", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def measure_floor(body: bytes, n_users: int, concurrency: int, max_requests: int, max_seconds: float, k: int,
                  policy: str, seed: int) -> tuple[list[float], float, int]:
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(target=floor_server, args=(port, body))
    process.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/recommendations", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or not process.is_alive():
                    raise RuntimeError("the floor server did not start") from None
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        run_load(url, n_users, concurrency, 500, 5.0, k, policy, seed)  # warm-up
        return run_load(url, n_users, concurrency, max_requests, max_seconds, k, policy, seed + 1)
    finally:
        process.terminate()
        process.join()


def measure_freshness(port: int, bootstrap: str, topics: Topics, items: ModelRows, rounds: int,
                      timeout_s: float = 30.0) -> list[float]:
    """Seconds from sending a delta to its effect in ``GET /recommendations``, per round."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    connection = http.client.HTTPConnection("127.0.0.1", port)
    k = items.vectors.shape[1]
    empty_users = ModelRows.empty(k)
    rng = np.random.default_rng(123)
    previous = None
    out = []
    try:
        for r in range(rounds):
            j = int(rng.integers(len(items)))
            while j == previous:
                j = int(rng.integers(len(items)))
            item = items.ids[j]
            # the boosted item tops every slate; the previous one gets its own row back
            rows = [j] if previous is None else [j, previous]
            biases = items.biases[rows].copy()
            biases[0] = 1e4 + r
            changed = ModelRows([items.ids[i] for i in rows], items.vectors[rows], biases, items.click_biases[rows])
            messages = delta_messages("mf", 2 + r, 3.5, -2.0, empty_users, changed, max_event_ts=time.time())
            started = time.perf_counter()
            for key, value in messages:
                producer.send(topics.model_updates, key=key.encode(), value=orjson.dumps(value))
            producer.flush()
            deadline = started + timeout_s
            while True:
                connection.request("GET", "/recommendations?user_id=u0&k=1&exclude_seen=false")
                top = json.loads(connection.getresponse().read())["items"][0]["item_id"]
                if top == item:
                    out.append(time.perf_counter() - started)
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"delta {2 + r} was not visible after {timeout_s} s")
                time.sleep(0.001)
            previous = j
            time.sleep(0.2)
    finally:
        connection.close()
        producer.close()
    return out


def wait_ready(port: int, process: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the replica exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the replica was not ready within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 items, fewer requests and rounds")
    parser.add_argument("--items", type=int, default=None, help="catalogue size (default 100,000; 10,000 with --quick)")
    parser.add_argument("--users", type=int, default=10_000, help="known users (default 10,000)")
    parser.add_argument("--factors", type=int, default=64, help="embedding size (default 64)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent client connections (default 16)")
    parser.add_argument("--requests", type=int, default=None, help="most HTTP requests (default 20,000; 5,000 quick)")
    parser.add_argument("--duration-s", type=float, default=None, help="most seconds of load (default 30; 10 quick)")
    parser.add_argument("--inprocess-requests", type=int, default=None,
                        help="in-process calls (default 2,000; 500 quick)")
    parser.add_argument("--freshness-rounds", type=int, default=None, help="deltas timed (default 30; 10 quick)")
    parser.add_argument("--k", type=int, default=10, help="slate length (default 10)")
    parser.add_argument("--policy", default="greedy", choices=("greedy", "epsilon_greedy", "softmax"),
                        help="policy of the requests (default greedy)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    n_items = args.items or (10_000 if quick else 100_000)
    max_requests = args.requests or (5_000 if quick else 20_000)
    max_seconds = args.duration_s or (10.0 if quick else 30.0)
    n_inprocess = args.inprocess_requests or (500 if quick else 2_000)
    rounds = args.freshness_rounds or (10 if quick else 30)

    with tempfile.TemporaryDirectory(prefix="streamrec-bench-serving-") as folder, broker_for_run() as bootstrap:
        store = Path(folder)
        _, items = make_model(store, args.users, n_items, args.factors, args.seed)
        inprocess = measure_in_process(store, args.users, n_inprocess, args.k, args.seed)
        print(f"in process: p50 {percentile_ms(inprocess, 50)} ms over {len(inprocess)} calls", file=sys.stderr)
        topics = Topics(f"bench{uuid.uuid4().hex[:8]}.")
        ensure_topics(bootstrap, 1, topics)
        port = free_port()
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        replica_log = store / "replica.log"
        with open(replica_log, "w") as log_file:
            replica = subprocess.Popen(
                [sys.executable, "-m", "serving", "--bootstrap-servers", bootstrap, "--topic-prefix", topics.prefix,
                 "--store-dir", str(store), "--port", str(port), "--seed", str(args.seed)],
                env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            try:
                wait_ready(port, replica)
            except RuntimeError:
                print(replica_log.read_text()[-4000:], file=sys.stderr)
                raise
            url = f"http://127.0.0.1:{port}"
            run_load(url, args.users, args.concurrency, 500, 5.0, args.k, args.policy, args.seed + 1)  # warm-up
            latencies, elapsed, errors = run_load(url, args.users, args.concurrency, max_requests, max_seconds,
                                                  args.k, args.policy, args.seed + 2)
            print(f"http: {len(latencies)} requests in {elapsed:.1f} s, p50 {percentile_ms(latencies, 50)} ms, "
                  f"p99 {percentile_ms(latencies, 99)} ms", file=sys.stderr)
            with urllib.request.urlopen(f"{url}/recommendations?user_id=u1&k={args.k}") as response:
                body = response.read()
            floor, floor_elapsed, _ = measure_floor(body, args.users, args.concurrency, max_requests, max_seconds,
                                                    args.k, args.policy, args.seed + 2)
            print(f"floor: {len(floor)} requests in {floor_elapsed:.1f} s, p50 {percentile_ms(floor, 50)} ms, "
                  f"p99 {percentile_ms(floor, 99)} ms", file=sys.stderr)
            freshness = measure_freshness(port, bootstrap, topics, items, rounds)
        finally:
            replica.send_signal(signal.SIGTERM)
            try:
                replica.wait(30)
            except subprocess.TimeoutExpired:
                replica.kill()
    p50, p99 = percentile_ms(latencies, 50), percentile_ms(latencies, 99)
    inprocess_p50 = percentile_ms(inprocess, 50)
    fresh = np.array(freshness)
    result = {
        "items": n_items, "factors": args.factors, "users": args.users, "concurrency": args.concurrency,
        "policy": args.policy, "k": args.k, "quick": quick,
        "requests": len(latencies), "errors": errors, "duration_s": round(elapsed, 2),
        "rps": round(len(latencies) / elapsed, 1), "p50_ms": p50, "p99_ms": p99,
        "inprocess_p50_ms": inprocess_p50, "inprocess_p99_ms": percentile_ms(inprocess, 99),
        "p50_ratio": round(p50 / inprocess_p50, 2),
        "floor_rps": round(len(floor) / floor_elapsed, 1), "floor_p50_ms": percentile_ms(floor, 50),
        "floor_p99_ms": percentile_ms(floor, 99), "p99_floor_ratio": round(p99 / percentile_ms(floor, 99), 2),
        "freshness_rounds": len(freshness),
        "freshness_p50_s": round(float(np.percentile(fresh, 50)), 4),
        "freshness_p99_s": round(float(np.percentile(fresh, 99)), 4),
        "p99_target_ms": P99_TARGET_MS, "freshness_target_s": FRESHNESS_TARGET_S,
        "p99_target_met": p99 <= P99_TARGET_MS,
        "freshness_target_met": float(np.percentile(fresh, 99)) <= FRESHNESS_TARGET_S,
    }
    emit("serving", result)
    return result


if __name__ == "__main__":
    main()
