"""Serving latency under concurrent load, against the same lookups in process, and model freshness.

One run, side by side:

- ``inprocess``: ``Recommender.recommend`` (scoring, policy, response) called one at a time in
  this process, on the same model and the same kind of request (greedy, k=10, random known users);
- ``http``: a ``streamrec serve`` replica (``python -m serving``) in a subprocess, loaded from
  the same snapshot, under a closed-loop load generator in another process (``bench/loadgen``,
  a small Go program on the standard library, built here with ``go build`` into ``bench/.build``:
  16 keep-alive connections over loopback, each sending its next request when the previous one
  answered), bounded by a request count and a duration. The generator used to be Python
  (aiohttp), which took most of a core of this 2-core machine away from the replica;
- ``floor``: the same load generator against a bare aiohttp server that answers every request
  with a fixed response of the same size: what the HTTP stack, loopback and the client cost on
  this machine with no recommendation work at all;
- ``recall``: the replica finds a known user's candidates with an IVF index (``serving.index``,
  ``--retrieval ivf``, the default from 50,000 items) and scores them exactly; ``recall_at_10``
  is the share of the exact top 10 (every item scored) that the index's top 10 holds, over
  random users of the served model, measured in process with the replica's settings. The served
  catalogue is ``clustered`` by default: item and user vectors around topic centres (half of
  the variance), users mixing two topics, as a learned factor model is structured. On an
  ``isotropic`` catalogue (i.i.d. normal vectors, what this benchmark served before) no index
  can beat scoring everything; ``recall_at_10_isotropic`` is measured on one of the same size
  with the same settings, as the worst case;
- ``freshness``: with the replica idle, a delta that puts one item on top of every slate is
  published to ``model.updates`` (kafka-python, as the learner does), and the time from the send
  to that item showing up in ``GET /recommendations`` is measured, several times.

The load generator shares the machine with the replica (2 cores here), so ``p50_ratio`` =
HTTP p50 / in-process p50 says what the HTTP path and the queueing of 16 concurrent clients cost,
and ``p99_floor_ratio`` = HTTP p99 / floor p99 what serving adds over an empty aiohttp handler.
``cpu_stolen_share`` is the share of the machine's CPU time the hypervisor gave to other guests
during the HTTP load (``steal`` in /proc/stat): the latencies are only comparable between runs
with similar shares.
Both processes score with one BLAS thread, as ``streamrec serve`` does.
The broker is ``KAFKA_BOOTSTRAP_SERVERS`` or a local one started for the run.

    python -m bench.serving            # 100,000 items x 64 factors
    python -m bench.serving --quick    # 10,000 items (below the index's threshold: exact scoring)

It needs ``go`` (any recent version; nothing is downloaded) to build the load generator.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: as in ``streamrec serve``

import argparse  # noqa: E402
import asyncio
import http.client
import json
import multiprocessing
import shutil
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

from bench.common import StolenCpu, emit
from learner.updates import Delta, ModelRows, delta_messages, read_snapshot, write_snapshot
from serving.index import IndexSettings
from serving.live import LiveModel
from serving.metrics import ServingMetrics
from serving.model import ServingModel
from serving.policies import top_indices
from serving.popularity import Popularity
from serving.recommend import Recommender
from serving.scorer import BatchScorer
from serving.seen import SeenItems
from serving.settings import RETRIEVAL_MODES, ServeSettings
from stream.topics import Topics
from stream.tools.kafka_local import broker_for_run, free_port
from stream.topics import ensure_topics

P99_TARGET_MS = 20.0
FRESHNESS_TARGET_S = 2.0
LOADGEN_SOURCE = Path(__file__).resolve().parent / "loadgen" / "main.go"
LOADGEN_BINARY = Path(__file__).resolve().parent / ".build" / "loadgen"
CATALOGUES = ("clustered", "isotropic")


def random_model(n_users: int, n_items: int, k: int, seed: int, catalogue: str) -> tuple[ModelRows, ModelRows]:
    """Users and items of the requested size; every coordinate has standard deviation 0.3.

    ``isotropic``: i.i.d. normal vectors. ``clustered``: ``n_items // 500`` topic centres carry
    half the variance; an item sits near one topic, a user near the mix of two.
    """
    rng = np.random.default_rng(seed)
    if catalogue == "isotropic":
        user_vectors, item_vectors = rng.normal(0, 0.3, (n_users, k)), rng.normal(0, 0.3, (n_items, k))
    else:
        centres = rng.normal(0, 0.3 * np.sqrt(0.5), (max(2, n_items // 500), k))
        noise = 0.3 * np.sqrt(0.5)
        item_vectors = centres[rng.integers(0, len(centres), n_items)] + rng.normal(0, noise, (n_items, k))
        mix = centres[rng.integers(0, len(centres), (n_users, 2))].sum(axis=1) / np.sqrt(2)
        user_vectors = mix + rng.normal(0, noise, (n_users, k))
    users = ModelRows([f"u{j}" for j in range(n_users)], user_vectors,
                      rng.normal(0, 0.1, n_users), rng.normal(0, 0.1, n_users))
    items = ModelRows([f"i{j}" for j in range(n_items)], item_vectors,
                      rng.normal(0, 0.1, n_items), rng.normal(0, 0.1, n_items))
    return users, items


def make_model(store: Path, n_users: int, n_items: int, k: int, seed: int,
               catalogue: str = "clustered") -> tuple[ModelRows, ModelRows]:
    """A random model of the requested size, written to ``store`` as snapshot ``mf-1``."""
    users, items = random_model(n_users, n_items, k, seed, catalogue)
    write_snapshot(store, "mf", 1, 3.5, -2.0, users, items)
    return users, items


def index_settings(retrieval: str) -> IndexSettings:
    """The replica's index settings (``streamrec serve`` defaults, environment included)."""
    return IndexSettings.of(ServeSettings(bootstrap_servers="-", retrieval=retrieval))


def measure_recall(model: ServingModel, n_users: int, queries: int, seed: int, k: int = 10) -> dict:
    """recall@k of the index's top k against every item scored, and the mean candidate count."""
    if model.index is None:
        return {"recall": 1.0, "candidates": len(model.items)}
    matrix = model.items.matrix()
    nothing = np.zeros(0, np.int64)
    hits, sizes = [], []
    for user in np.random.default_rng(seed).integers(0, n_users, queries):
        query, _ = model.query(int(user), "rating")
        exact = top_indices(matrix @ query, k)
        rows, scores = model.index.search(query, nothing, need=k)
        found = rows[top_indices(scores, k)]
        hits.append(len(np.intersect1d(exact, found)) / k)
        sizes.append(len(rows))
    return {"recall": round(float(np.mean(hits)), 4), "candidates": round(float(np.mean(sizes)), 1)}


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(seconds) * 1000.0, q)), 3)


def measure_in_process(model: ServingModel, n_users: int, n: int, k: int, seed: int) -> list[float]:
    """Latencies (s) of ``n`` sequential recommendations called in process."""
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


def build_loadgen() -> Path:
    """The Go load generator, built from ``bench/loadgen/main.go`` when missing or older."""
    if LOADGEN_BINARY.exists() and LOADGEN_BINARY.stat().st_mtime >= LOADGEN_SOURCE.stat().st_mtime:
        return LOADGEN_BINARY
    go = shutil.which("go")
    if go is None:
        raise SystemExit("bench.serving needs the Go toolchain (`go` on PATH) to build its load generator "
                         f"({LOADGEN_SOURCE.relative_to(Path.cwd()) if LOADGEN_SOURCE.is_relative_to(Path.cwd()) else LOADGEN_SOURCE}); "
                         "install Go (standard library only, nothing is downloaded)")
    LOADGEN_BINARY.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-buildvcs=false", "CGO_ENABLED": "0"}
    print("building the load generator (go build; the first build compiles the standard library)", file=sys.stderr)
    done = subprocess.run([go, "build", "-trimpath", "-o", str(LOADGEN_BINARY), str(LOADGEN_SOURCE)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"go build of the load generator failed:\n{done.stderr}")
    return LOADGEN_BINARY


def request_paths(n_users: int, n: int, k: int, policy: str, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"/recommendations?user_id=u{u}&k={k}&policy={policy}" for u in rng.integers(0, n_users, n)]


def run_load(url: str, n_users: int, concurrency: int, max_requests: int, max_seconds: float, k: int,
             policy: str, seed: int) -> tuple[list[float], float, int]:
    """Closed-loop load from the Go generator: (latencies in s, elapsed s, errors)."""
    binary = build_loadgen()
    with tempfile.TemporaryDirectory(prefix="streamrec-loadgen-") as folder:
        paths, out = Path(folder) / "paths.txt", Path(folder) / "result.json"
        paths.write_text("\n".join(request_paths(n_users, max_requests, k, policy, seed)) + "\n")
        subprocess.run([str(binary), "-url", url, "-paths", str(paths), "-c", str(concurrency),
                        "-n", str(max_requests), "-d", str(max_seconds), "-o", str(out)], check=True)
        result = json.loads(out.read_text())
    return result["latencies_s"], result["elapsed_s"], result["errors"]


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
    parser.add_argument("--retrieval", default="ivf", choices=RETRIEVAL_MODES,
                        help="the replica's --retrieval (default ivf: the index from 50,000 items)")
    parser.add_argument("--catalogue", default="clustered", choices=CATALOGUES,
                        help="structure of the served model's vectors (default clustered; see above)")
    parser.add_argument("--recall-queries", type=int, default=500, help="users in the recall measurement")
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
        build_loadgen()
        settings = index_settings(args.retrieval)
        _, items = make_model(store, args.users, n_items, args.factors, args.seed, args.catalogue)
        started = time.perf_counter()
        model = ServingModel.from_snapshot(read_snapshot(store / "mf" / "mf-1"), settings)
        build_s = time.perf_counter() - started
        model_indexed = model.index is not None
        n_clusters = len(model.index.centroids) if model_indexed else None
        recall = measure_recall(model, args.users, args.recall_queries, args.seed)
        if args.catalogue == "isotropic" or model.index is None:
            worst = recall
        else:
            iso_users, iso_items = random_model(args.users, n_items, args.factors, args.seed, "isotropic")
            iso = ServingModel.empty("mf", args.factors).apply(
                [Delta("mf", 1, "mf-1", 3.5, -2.0, iso_users, iso_items, time.time(), None)]).with_index(settings)
            worst = measure_recall(iso, args.users, args.recall_queries, args.seed)
            del iso
        print(f"model loaded (index included) in {build_s:.2f} s, recall@10 {recall['recall']} ({recall['candidates']:.0f} candidates), "
              f"isotropic {worst['recall']}", file=sys.stderr)
        inprocess = measure_in_process(model, args.users, n_inprocess, args.k, args.seed)
        del model
        print(f"in process: p50 {percentile_ms(inprocess, 50)} ms over {len(inprocess)} calls", file=sys.stderr)
        topics = Topics(f"bench{uuid.uuid4().hex[:8]}.")
        ensure_topics(bootstrap, 1, topics)
        port = free_port()
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        replica_log = store / "replica.log"
        with open(replica_log, "w") as log_file:
            replica = subprocess.Popen(
                [sys.executable, "-m", "serving", "--bootstrap-servers", bootstrap, "--topic-prefix", topics.prefix,
                 "--store-dir", str(store), "--port", str(port), "--seed", str(args.seed),
                 "--retrieval", args.retrieval],
                env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            try:
                wait_ready(port, replica)
            except RuntimeError:
                print(replica_log.read_text()[-4000:], file=sys.stderr)
                raise
            url = f"http://127.0.0.1:{port}"
            run_load(url, args.users, args.concurrency, 500, 5.0, args.k, args.policy, args.seed + 1)  # warm-up
            with StolenCpu() as stolen:
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
        "policy": args.policy, "k": args.k, "quick": quick, "loadgen": "go",
        "retrieval": args.retrieval if model_indexed else "exact", "catalogue": args.catalogue,
        "ivf_clusters": n_clusters, "ivf_probe": settings.probe if model_indexed else None,
        "candidates_mean": recall["candidates"], "recall_at_10": recall["recall"],
        "recall_at_10_isotropic": worst["recall"], "model_load_s": round(build_s, 2),
        "requests": len(latencies), "errors": errors, "duration_s": round(elapsed, 2),
        "rps": round(len(latencies) / elapsed, 1), "p50_ms": p50, "p99_ms": p99,
        "inprocess_p50_ms": inprocess_p50, "inprocess_p99_ms": percentile_ms(inprocess, 99),
        "p50_ratio": round(p50 / inprocess_p50, 2),
        "floor_rps": round(len(floor) / floor_elapsed, 1), "floor_p50_ms": percentile_ms(floor, 50),
        "floor_p99_ms": percentile_ms(floor, 99), "p99_floor_ratio": round(p99 / percentile_ms(floor, 99), 2),
        "cpu_stolen_share": stolen.share,
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
