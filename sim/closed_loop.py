"""The closed loop: simulated users ask serving for slates over HTTP and log what they saw and clicked.

For every simulated request (``sim.simulator``) the driver calls
``GET /recommendations?user_id=...&policy=...``, logs the impression through the producer SDK with
exactly the ``request_id``, ``model_version``, positions and propensities (and the A/B ``variant``,
when serving names one) serving returned, lets
the simulated user respond with position-biased clicks and logs those clicks. Before serving has
a model (``503``), the slate is drawn uniformly at random and logged as such (policy ``uniform``,
propensity 1/n per position): the cold start is logged as honestly as the rest.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import numpy as np

from stream import events as ev
from stream.producer import EventProducer
from sim.simulator import Request, Simulation


@dataclass
class StepStats:
    """What one simulation step did."""

    step: int
    phase: str
    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    normal_impressions: int = 0
    normal_clicks: int = 0
    fallback: int = 0
    cold: int = 0
    model_versions: set[str] = field(default_factory=set)
    oracle_clicks: float = 0.0
    popularity_clicks: float = 0.0

    @property
    def ctr(self) -> float:
        """Clicks per shown item of the normal (non-bot) users."""
        return self.normal_clicks / self.normal_impressions if self.normal_impressions else 0.0

    @property
    def ctr_oracle(self) -> float:
        """Expected CTR of the same requests had each got its user's truly best slate."""
        return self.oracle_clicks / self.normal_impressions if self.normal_impressions else 0.0

    @property
    def ctr_popularity(self) -> float:
        """Expected CTR of the same requests had each got the most clicked items so far."""
        return self.popularity_clicks / self.normal_impressions if self.normal_impressions else 0.0


class ClosedLoop:
    """Drives a ``Simulation`` against a serving endpoint, logging through ``producer``.

    Parameters:
        sim: the simulated users.
        serve_url: base URL of ``streamrec serve`` (``http://127.0.0.1:8080``).
        producer: where impressions and clicks go (the ``events`` topic).
        policy: serving's exploration policy for the slates (default ``epsilon_greedy``).
        k: slate size.
    """

    def __init__(self, sim: Simulation, serve_url: str, producer: EventProducer,
                 policy: str = "epsilon_greedy", k: int = 10, seed: int = 0) -> None:
        self.sim = sim
        self.serve_url = serve_url.rstrip("/")
        self.producer = producer
        self.policy = policy
        self.k = k
        self._rng = np.random.default_rng(seed)
        self._item_clicks = np.zeros(len(sim.item_ids))  # normal users' clicks: the popularity reference
        self._item_row = {item: j for j, item in enumerate(sim.item_ids)}

    def _references(self, request: Request, size: int) -> tuple[float, float]:
        """Expected clicks of the oracle's slate and of the popularity slate for ``request``
        (computed from the simulator's truth; they draw no random numbers, so the run is unchanged)."""
        relevance = self.sim.ground_truth_relevance(request.user_id, request.step)
        examination = self.sim.examination(np.arange(1, size + 1))
        best = np.sort(relevance)[::-1][:size]
        popular = np.argsort(-self._item_clicks, kind="stable")[:size]
        return float(examination @ best), float(examination @ relevance[popular])

    def _slate(self, request: Request) -> tuple[dict | None, list[dict]]:
        query = urllib.parse.urlencode({"user_id": request.user_id, "k": self.k, "policy": self.policy,
                                        "exclude_seen": "false"})
        try:
            with urllib.request.urlopen(f"{self.serve_url}/recommendations?{query}", timeout=10) as response:
                body = json.loads(response.read())
            return body, body["items"]
        except urllib.error.HTTPError as err:
            if err.code != 503:
                raise
        except urllib.error.URLError:
            pass
        catalogue = self.sim.item_ids
        picks = self._rng.choice(len(catalogue), size=min(self.k, len(catalogue)), replace=False)
        return None, [{"item_id": catalogue[j], "position": p + 1, "propensity": 1.0 / len(catalogue)}
                      for p, j in enumerate(picks)]

    def run_step(self, step: int) -> StepStats:
        """Play every request of ``step``; returns its statistics."""
        stats = StepStats(step, self.sim.phase(step))
        for request in self.sim.requests(step):
            body, slate = self._slate(request)
            if body is None:
                request_id, version, policy = ev.new_event_id(), "none", "uniform"
                stats.cold += 1
            else:
                request_id, version, policy = body["request_id"], body["model_version"], body["policy"]
                stats.fallback += bool(body.get("fallback"))
                stats.model_versions.add(version)
            items = [{"item_id": it["item_id"], "position": it["position"], "propensity": it["propensity"],
                      **({"score": it["score"]} if "score" in it else {})} for it in slate]
            variant = None if body is None else body.get("variant")  # the A/B variant serving named, if any
            self.producer.send(ev.impression(request.user_id, request_id, version, policy, items, variant=variant,
                                             ts=request.ts))
            clicks = self.sim.respond(request, slate)
            for click in clicks:
                self.producer.send(ev.click(request.user_id, request_id, click.item_id,
                                            position=click.position, ts=click.ts))
            stats.requests += 1
            stats.impressions += len(slate)
            stats.clicks += len(clicks)
            if not request.is_bot:
                stats.normal_impressions += len(slate)
                stats.normal_clicks += len(clicks)
                oracle, popularity = self._references(request, len(slate))
                stats.oracle_clicks += oracle
                stats.popularity_clicks += popularity
                for click in clicks:
                    row = self._item_row.get(click.item_id)
                    if row is not None:
                        self._item_clicks[row] += 1
        self.producer.flush()
        return stats
