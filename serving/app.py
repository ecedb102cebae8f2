"""One serving replica: the pieces wired together, started and stopped as a unit.

``ServingApp`` owns everything of one replica (so a test can run several in one process): the
live model, the batch scorer, the monitor, the metrics registry, the HTTP site, and two Kafka
followers (``model.updates`` for the model, ``examples`` for the monitor). The HTTP server comes
up first and answers ``/healthz`` at once; ``/readyz`` turns 200 once the model store has been
read and the update topic caught up with. ``run`` is the blocking entry point of
``streamrec serve``.

Slow clients are bounded three ways: a connection has ``header_timeout_s`` from its start (or
from its previous answer) to send a request's whole header, after which aiohttp closes it (its
``keepalive_timeout``, which also closes idle keep-alive connections: a proxy in front should keep
its own idle timeout shorter); a request has ``body_timeout_s`` to send its body (``serving.api``);
and at most ``max_connections`` are open at once (``serving.connections``).

With A/B variants (``serving.variants``) the pinned store versions they name are loaded before the
replica serves (a version that is missing or does not verify stops the start with
``VariantError``), and the monitor keeps click figures per variant (``serving.ab_monitor``).
"""
from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from learner.updates import SnapshotError
from serving.ab_monitor import VariantQuality
from serving.api import build_app
from serving.connections import ConnectionGate
from serving.index import IndexSettings
from serving.live import LiveModel
from serving.metrics import ServingMetrics
from serving.monitor import Monitor, follow_examples
from serving.popularity import Popularity
from serving.recommend import Recommender
from serving.scorer import BatchScorer
from serving.seen import SeenItems
from serving.settings import ServeSettings
from serving.updates import ModelUpdater, load_snapshot
from serving.model import ServingModel
from serving.variants import Assignment, VariantError, snapshot_folder
from stream.topics import Topics

log = logging.getLogger(__name__)

RETRY_S = 2.0
# How long aiohttp goes on reading (and dropping) the unread body of a request it has answered
# (a 408, a 413) before it closes: its client reads the answer before the close, and a trickling
# client is cut off soon after (aiohttp's default is 10 s).
LINGER_S = 2.0


class ServingApp:
    """A serving replica; ``await start()``, then ``port`` is bound; ``await stop()`` to end.

    ``variants`` splits the users between A/B variants (None: every user gets the live model).
    """

    def __init__(self, settings: ServeSettings, variants: Assignment | None = None) -> None:
        if not settings.bootstrap_servers:
            raise ValueError("no Kafka cluster: set KAFKA_BOOTSTRAP_SERVERS or pass --bootstrap-servers")
        settings.check()
        self.settings = s = settings
        self.topics = Topics(s.topic_prefix)
        self.metrics = ServingMetrics()
        self.live = LiveModel(s.history, self.metrics)
        self.seen = SeenItems(s.seen_users, s.seen_per_user)
        self.popularity = Popularity(s.popularity_half_life_s)
        self.variants = variants
        self.pinned: dict[str, ServingModel] = {}  # filled by start()
        variant_quality = None
        if variants is not None:
            self.metrics.track_variants(variants.names)
            variant_quality = VariantQuality(variants.names, self.metrics, s.rmse_window)
        self.monitor = Monitor(self.live, self.metrics, self.seen, self.popularity, rmse_window=s.rmse_window,
                               drift_window=s.drift_window, shadow_window=s.shadow_window,
                               variants=variant_quality, pinned=self.pinned,
                               slate_hold_s=2.0 * s.attribution_window_s)
        self.scorer = BatchScorer()
        self.recommender = Recommender(self.live, self.scorer, self.seen, self.popularity, self.monitor, kind=s.kind,
                                       candidates=s.candidates, epsilon=s.epsilon, temperature=s.temperature,
                                       seed=s.seed, variants=variants, pinned=self.pinned)
        self.index = IndexSettings.of(s)
        self.updater = ModelUpdater(s.store_dir, s.model, self.live, self.metrics, self.monitor.recent_outcomes,
                                    s.shadow_tolerance, s.shadow_min_outcomes, index=self.index, kind=s.kind)
        self.web = build_app(self.recommender, self.metrics, self.readiness, self.monitor.maybe_refresh_drift,
                             body_timeout_s=s.body_timeout_s)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._gate: ConnectionGate | None = None
        self._tasks: list[asyncio.Task] = []
        self.port: int | None = None

    def readiness(self) -> tuple[bool, str]:
        if self.live.current is None:
            return False, "no model loaded yet"
        if not self.updater.caught_up:
            return False, f"catching up with {self.topics.model_updates}"
        return True, "ready"

    async def start(self, follow: bool = True) -> None:
        """Load the store versions A/B variants pin, serve HTTP, then load the model and follow the
        topics in the background.

        ``follow=False`` serves HTTP only, with whatever is swapped into ``live`` by hand (tests of
        the API that need no broker).
        """
        await self._load_pinned()
        self._runner = web.AppRunner(self.web, access_log=None, handle_signals=False,
                                     keepalive_timeout=self.settings.header_timeout_s, lingering_time=LINGER_S)
        await self._runner.setup()
        self._gate = ConnectionGate(self._runner.server, self.settings.max_connections, self.metrics)
        self._listener = await asyncio.get_running_loop().create_server(self._gate, self.settings.host,
                                                                        self.settings.port, backlog=128)
        self.port = self._listener.sockets[0].getsockname()[1]
        log.info("serving on http://%s:%d", self.settings.host, self.port)
        if not follow:
            return
        s = self.settings
        self._tasks = [
            asyncio.create_task(self._keep_following(), name="model.updates"),
            asyncio.create_task(_retrying("examples", lambda: follow_examples(
                self.monitor, s.bootstrap_servers, self.topics.examples, s.examples_lookback_s)), name="examples"),
        ]

    async def _load_pinned(self) -> None:
        """Load the store versions the variants pin (VariantError when one cannot be served)."""
        for variant in self.variants.variants if self.variants is not None else ():
            if not variant.pinned or variant.source in self.pinned:
                continue
            folder = snapshot_folder(self.settings.store_dir, self.settings.model, variant.source)
            try:
                model = await load_snapshot(folder, index=self.index)
            except SnapshotError as err:
                raise VariantError(f"--variant {variant.name}: snapshot {variant.source} cannot be served: {err}") \
                    from None
            self.pinned[variant.source] = model
            log.info("variant %s serves the pinned snapshot %s (%d users, %d items)", variant.name, model.version,
                     len(model.users), len(model.items))

    async def _keep_following(self) -> None:
        try:
            await self.updater.bootstrap()
        except Exception:  # a refused snapshot does not raise: this is a bug, and the topic may still serve
            log.exception("reading the model store failed; going on with model.updates alone")
        await _retrying("model.updates", lambda: self.updater.follow(self.settings.bootstrap_servers,
                                                                     self.topics.model_updates))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.updater.stop()
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._gate is not None:
            self._gate.close()
        if self._listener is not None:
            await self._listener.wait_closed()

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once ready; TimeoutError after ``timeout_s`` seconds."""
        async with asyncio.timeout(timeout_s):
            while not self.readiness()[0]:
                await asyncio.sleep(0.05)


async def _retrying(name: str, follow) -> None:
    """Run ``follow()`` again after any failure (Kafka down, a bug on one record) until cancelled."""
    while True:
        try:
            await follow()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("following %s failed; retrying in %.0f s", name, RETRY_S)
            await asyncio.sleep(RETRY_S)


def run(settings: ServeSettings, variants: Assignment | None = None) -> None:
    """Run one replica (with A/B ``variants``, if given) until SIGINT or SIGTERM."""
    async def main() -> None:
        app = ServingApp(settings, variants)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await app.start()
        try:
            await stopping.wait()
        finally:
            await app.stop()
    asyncio.run(main())
