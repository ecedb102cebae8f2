"""Keeps the live model current: bootstrap from the model store, then follow ``model.updates``.

The format is the learner's (``learner/PUBLISHING.md``, ``learner.updates``):

1. **Bootstrap.** The newest snapshot in ``<store>/<model>/`` is verified (sha256 of both files)
   and loaded off the event loop. One that cannot be served, for whatever reason (``read_snapshot``
   and ``_load`` turn every failure into a SnapshotError), is refused, logged with its reason and
   counted (``streamrec_serving_snapshots_total{result="corrupt"}`` and
   ``streamrec_serving_snapshot_refusals_total{reason}``), and the next older one is tried.
2. **Deltas.** ``model.updates`` has one partition; every replica assigns it and reads it from
   offset 0 (no consumer group), reassembles each publish from its parts (``DeltaAssembler``),
   skips publishes with ``seq`` <= the served one, and applies the rest in order. The records of
   one fetch are applied as one build (a catching-up replica copies each table once per fetch,
   not once per delta), built off to the side and swapped in whole (``serving.live``).
   A publish that is invalid or of another shape (factor count, non-finite values) is refused
   and counted; a jump in ``seq`` (deltas lost to compaction or refused) is counted as a gap and
   the following deltas still apply, since each carries the full value of its rows.
3. **Snapshots announced on the topic** (key ``snapshot/<model>``) newer than the served seq,
   or at the served seq when deltas were missed, are loaded from the store, verified, and
   promoted only if they pass the shadow check against recent outcomes (``serving.shadow``: RMSE,
   then the CTR the logged slates give evidence of; a refusal is counted by reason in
   ``streamrec_serving_shadow_refusals_total{reason}``).
   The store path in the announcement must stay inside the store. A refused announcement is
   passed over like any other record: what follows it on the topic still applies.

4. **The item index** (``serving.index``), when the settings want one, is built with the model
   when a snapshot loads (off the event loop, before the swap) and carried through deltas. When
   it has gone stale (many fresh items), or a catalogue built from deltas has grown large enough
   to want one, a background task rebuilds it: k-means off the event loop, warm-started from the
   current centroids, then every row of the version live by then assigned, and that version
   replaced by the same version with the new index (``LiveModel.refresh``). Every swap holds one
   lock from reading the base version to swapping, so a rebuild never undoes a delta.

The follower keeps its place: after a failure (the broker gone) it goes on from the next record
it has not handled, not from offset 0, and a batch that fails to apply is logged and passed over
(a snapshot at the served seq is then accepted to repair what it missed).

The replica is **caught up** once it has read the topic up to where it ended when the replica
started; readiness waits for that, so a new replica joins the load balancer with the same model
as the others and they never stop serving meanwhile. Freshness (newest event time of a delta to
the moment it is served) is only recorded once caught up: replaying an old backlog would
otherwise record its age, not the pipeline's delay.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson

from learner.updates import Delta, DeltaAssembler, SnapshotError, read_snapshot
from serving.index import IndexSettings, ItemIndex, train_centroids
from serving.live import LiveModel
from serving.metrics import ServingMetrics
from serving.model import ServingModel
from serving.shadow import Outcome, shadow_check

log = logging.getLogger(__name__)

MAX_FETCH_BYTES = 16 * 1024 * 1024


class ModelUpdater:
    """Bootstraps the live model and applies what the learner publishes.

    Parameters:
        store_dir: the model store.
        model: the model name (``delta/<model>``, ``snapshot/<model>``, ``<store>/<model>/``).
        live: the live model to keep current.
        metrics: the replica's metrics.
        recent_outcomes: the outcomes a candidate snapshot is shadow-checked on.
        shadow_tolerance: how much worse (relative RMSE) a candidate may be and still be promoted.
        shadow_min_outcomes: outcomes of a kind needed before that kind can refuse a candidate.
        index: how candidates are retrieved (None: exact scoring, no index).
        kind: the logits serving ranks by (the shadow check's CTR evidence ranks by them too).
    """

    def __init__(self, store_dir: Path, model: str, live: LiveModel, metrics: ServingMetrics,
                 recent_outcomes: Callable[[], list[Outcome]], shadow_tolerance: float = 0.05,
                 shadow_min_outcomes: int = 100, index: IndexSettings | None = None, kind: str = "click") -> None:
        self.store_dir = Path(store_dir)
        self.model = model
        self.live = live
        self.metrics = metrics
        self.recent_outcomes = recent_outcomes
        self.shadow_tolerance = shadow_tolerance
        self.shadow_min_outcomes = shadow_min_outcomes
        self.index = index
        self.kind = kind
        self.caught_up = False
        self._swap_lock = asyncio.Lock()
        self._rebuild: asyncio.Task | None = None
        self._assembler = DeltaAssembler()
        self._missed_deltas = False
        self._next_offset: int | None = None  # of model.updates, once read: where a restarted follow resumes
        self._delta_key = f"delta/{model}".encode()
        self._snapshot_key = f"snapshot/{model}".encode()

    # -- the model store ---------------------------------------------------------------------

    async def bootstrap(self) -> bool:
        """Serve the newest snapshot that verifies; False when the store has none."""
        for folder in self._snapshot_folders():
            try:
                candidate = await load_snapshot(folder, index=self.index)
            except SnapshotError as err:
                self._refuse_snapshot(err, "; trying the next older one")
                continue
            async with self._swap_lock:
                self.live.swap(candidate)
            self._missed_deltas = False
            self.metrics.snapshots.labels("loaded").inc()
            log.info("serving snapshot %s (%d users, %d items)", candidate.version, len(candidate.users),
                     len(candidate.items))
            return True
        log.info("no usable snapshot of %r in %s: starting from the deltas on the topic", self.model, self.store_dir)
        return False

    def _snapshot_folders(self) -> list[Path]:
        """Complete snapshot folders, newest (highest seq) first; unreadable manifests last."""
        base = self.store_dir / self.model
        found = []
        for manifest in base.glob("*/manifest.json") if base.is_dir() else ():
            if manifest.parent.name.startswith("."):
                continue
            try:
                seq = int(json.loads(manifest.read_text())["seq"])
            except (OSError, ValueError, KeyError, TypeError):
                seq = -1
            found.append((seq, manifest.parent))
        return [folder for _, folder in sorted(found, key=lambda f: f[0], reverse=True)]

    def _refuse_snapshot(self, err: SnapshotError, then: str = "") -> None:
        """Count and log a snapshot that cannot be served (with the traceback of an unexpected failure)."""
        self.metrics.snapshots.labels("corrupt").inc()
        self.metrics.snapshot_refusals.labels(err.reason).inc()
        log.warning("refused a snapshot (%s): %s%s", err.reason, err, then, exc_info=err.__cause__)

    # -- model.updates -----------------------------------------------------------------------

    async def process(self, records: Sequence[tuple[bytes | None, bytes | None]]) -> None:
        """Handle a batch of (key, value) records of ``model.updates``, in offset order."""
        pending: list[Delta] = []
        for key, value in records:
            if key == self._delta_key:
                delta = self._assemble(value)
                if delta is not None and self._accept(delta, pending):
                    pending.append(delta)
            elif key == self._snapshot_key:
                await self._apply(pending)
                pending = []
                await self._consider_snapshot(value)
        await self._apply(pending)

    async def _process_or_skip(self, first_offset: int,
                              records: Sequence[tuple[bytes | None, bytes | None]]) -> None:
        """``process``, logging a failure and passing over the batch instead of raising: retrying it
        would fail again. Deltas it held are missed, so a snapshot at the served seq repairs them."""
        try:
            await self.process(records)
        except Exception:
            self._missed_deltas = True
            log.exception("could not apply the %d records of model.updates from offset %d; passing over them",
                          len(records), first_offset)

    def _assemble(self, value: bytes | None) -> Delta | None:
        try:
            return self._assembler.add(orjson.loads(value))
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            self.metrics.deltas.labels("invalid").inc()
            log.warning("ignored an invalid delta message: %s", err)
            return None

    def _accept(self, delta: Delta, pending: list[Delta]) -> bool:
        """Whether ``delta`` goes into the next build (counting and logging why not)."""
        base = pending[-1] if pending else self.live.current
        if base is not None and delta.seq <= base.seq:
            self.metrics.deltas.labels("skipped").inc()
            return False
        try:
            (self.live.current or ServingModel.empty(self.model, _factors(delta))).check(delta)
        except ValueError as err:
            self.metrics.deltas.labels("refused").inc()
            self._missed_deltas = True
            log.warning("refused delta %s: %s", delta.version, err)
            return False
        if base is not None and delta.seq != base.seq + 1:
            self.metrics.delta_gaps.inc()
            self._missed_deltas = True
            log.warning("deltas %d..%d never arrived; applying %s (rows they changed stay stale until a snapshot)",
                        base.seq + 1, delta.seq - 1, delta.version)
        return True

    async def _apply(self, pending: list[Delta]) -> None:
        if not pending:
            return
        async with self._swap_lock:
            base = self.live.current or ServingModel.empty(self.model, _factors(pending[0]))
            built = await asyncio.get_running_loop().run_in_executor(None, base.apply, pending)
            now = time.time()
            self.live.swap(built, now)
        self._maybe_rebuild_index()
        self.metrics.deltas.labels("applied").inc(len(pending))
        if self.caught_up:
            for delta in pending:
                if delta.max_event_ts is not None:
                    self.metrics.freshness.observe(max(0.0, now - float(delta.max_event_ts)))

    async def _consider_snapshot(self, value: bytes | None) -> None:
        try:
            manifest = orjson.loads(value)
            seq, path = int(manifest["seq"]), str(manifest["path"])
            announced = manifest["files"]
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as err:
            self._refuse_snapshot(SnapshotError(f"unreadable announcement ({err})", "announcement"))
            return
        live = self.live.current
        if live is not None and (seq < live.seq or (seq == live.seq and not self._missed_deltas)):
            self.metrics.snapshots.labels("stale").inc()
            return
        folder = (self.store_dir / path).resolve()
        if not folder.is_relative_to(self.store_dir.resolve()):
            self._refuse_snapshot(SnapshotError(f"{path!r} is outside the model store", "announcement"))
            return
        try:
            candidate = await load_snapshot(folder, announced, self.index)
        except SnapshotError as err:
            self._refuse_snapshot(err)
            return
        async with self._swap_lock:
            live = self.live.current
            if live is not None:
                # Off the event loop: the CTR evidence scores the catalogue for every recent user.
                verdict = await asyncio.get_running_loop().run_in_executor(
                    None, shadow_check, live, candidate, self.recent_outcomes(), self.shadow_tolerance,
                    self.shadow_min_outcomes, self.kind)
                if not verdict.promote:
                    self.metrics.snapshots.labels("shadow_refused").inc()
                    self.metrics.shadow_refusals.labels(verdict.refused_for).inc()
                    log.warning("kept %s, refused snapshot %s: %s", live.version, candidate.version, verdict.reason)
                    return
                log.info("promoting snapshot %s over %s: %s", candidate.version, live.version, verdict.reason)
            self.live.swap(candidate)
        self._missed_deltas = False
        self.metrics.snapshots.labels("loaded").inc()

    # -- the item index ------------------------------------------------------------------------

    def _index_due(self, model: ServingModel | None) -> bool:
        if self.index is None or model is None or not self.index.wants_index(len(model.items)):
            return False
        return model.index is None or model.index.stale

    def _maybe_rebuild_index(self) -> None:
        """Start a background rebuild of the item index when one is due and none is running."""
        if (self._rebuild is None or self._rebuild.done()) and self._index_due(self.live.current):
            self._rebuild = asyncio.get_running_loop().create_task(self.rebuild_index(), name="item index")

    async def rebuild_index(self) -> bool:
        """Rebuild the live version's item index now (k-means off the event loop); False when
        none is wanted. The version live when the centroids are ready gets them."""
        base = self.live.current
        settings = self.index
        if settings is None or base is None or not settings.wants_index(len(base.items)):
            return False
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        init = base.index.centroids if base.index is not None else None
        try:
            centroids = await loop.run_in_executor(None, train_centroids, base.items.matrix(), settings, init)
            async with self._swap_lock:
                current = self.live.current
                rebuilt = await loop.run_in_executor(None, _with_centroids, current, centroids, settings)
                self.live.refresh(rebuilt)
        except Exception:
            log.exception("rebuilding the item index failed; the current one keeps serving")
            return False
        log.info("rebuilt the item index of %s (%d items, %d clusters) in %.2f s", rebuilt.version,
                 len(rebuilt.items), len(centroids), time.perf_counter() - started)
        return True

    async def stop(self) -> None:
        """Cancel a rebuild in progress."""
        if self._rebuild is not None:
            self._rebuild.cancel()
            await asyncio.gather(self._rebuild, return_exceptions=True)

    async def follow(self, bootstrap_servers: str, topic: str) -> None:
        """Read ``topic`` from offset 0 (or, called again, from where the last call stopped) and
        apply it until cancelled."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=100,
                                    max_partition_fetch_bytes=MAX_FETCH_BYTES, fetch_max_bytes=MAX_FETCH_BYTES)
        await consumer.start()
        try:
            while topic not in await consumer.topics():
                log.warning("topic %s does not exist yet; waiting for it", topic)
                await asyncio.sleep(2.0)
            tp = TopicPartition(topic, 0)  # model.updates has one partition (PUBLISHING.md)
            consumer.assign([tp])
            if self._next_offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, self._next_offset)
            end = (await consumer.end_offsets([tp]))[tp]
            while True:
                if not self.caught_up and await consumer.position(tp) >= end:
                    self.caught_up = True
                    log.info("caught up with %s at offset %d, serving %s", topic, end,
                             self.live.current.version if self.live.current else "nothing yet")
                batches = await consumer.getmany(tp, timeout_ms=500, max_records=100)
                records = batches.get(tp, [])
                if records:
                    self._next_offset = records[-1].offset + 1
                    await self._process_or_skip(records[0].offset, [(r.key, r.value) for r in records])
        finally:
            await consumer.stop()


def _factors(delta: Delta) -> int:
    return (delta.users if len(delta.users) else delta.items).vectors.shape[1]


def _with_centroids(model: ServingModel, centroids: np.ndarray, settings: IndexSettings) -> ServingModel:
    return replace(model, index=ItemIndex.from_centroids(model.items.matrix(), centroids, settings))


def read_serving_model(folder: Path, announced: dict | None = None, index: IndexSettings | None = None) -> ServingModel:
    """Verify and load a snapshot (and build its item index when ``index`` wants one);
    SnapshotError says why it cannot be served."""
    snapshot = read_snapshot(folder)
    if announced is not None and snapshot.manifest.get("files") != announced:
        raise SnapshotError(f"{folder}: the files in the store are not the ones announced on the topic",
                            "announcement")
    try:
        return ServingModel.from_snapshot(snapshot, index)
    except ValueError as err:  # values that are not finite
        raise SnapshotError(f"{folder}: {err}", "values") from None
    except Exception as err:
        raise SnapshotError(f"{folder}: building the model failed ({type(err).__name__}: {err})",
                            "unexpected") from err


async def load_snapshot(folder: Path, announced: dict | None = None, index: IndexSettings | None = None) -> ServingModel:
    """``read_serving_model`` off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, read_serving_model, folder, announced, index)
