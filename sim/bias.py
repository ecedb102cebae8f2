r"""Display-bias correction measured: one simulated log, learned naively and with IPS.

``bench.bias`` runs it with its targets; ``streamrec demo`` puts one seed of it in its report.

A seeded simulation (``stream/simulator.py``, planted low-rank world, 1000 users, 300 items):
simulated users ask for slates of 10, a logging policy shows them, the users click with position
bias (position $p$ examined with probability $p^{-\eta}$, $\eta = 1$). ``OnlineMF`` models with
the same hyperparameters (the learner's defaults) and seed learn from that *same* log in the same
micro-batches, one ``learn_batch(kind="click")`` call each, every shown item an example (clicked
= 1, not clicked = 0):

- naive: no display-bias arguments;
- IPS: ``positions`` and ``propensities``: each click is divided by the learned examination of
  its position and each example weighted by its inverse (clipped, self-normalised) propensity;
- position_only (ablation): ``positions`` alone, to show which part of the correction does the
  work.

Why a shared log rather than one closed loop per model: if each model served its own traffic,
the runs would differ in what they were shown as well as in how they learn, and each model's
early mistakes would shape its own data; with one log the learning rule is the only difference.
The closed loop is still measured, in expectation: each model's greedy top-10 is scored against
the users' true click model (``ctr_*``), the click-through rate the model would get if it
served.

Logging policy: a legacy "popular items" shelf that knows nothing of the users. Items get
popularity weights $w_i \propto \text{rank}_i^{-\alpha}$ ($\alpha = 1$, Zipf) over a seeded random
permutation, unrelated to the hidden relevance, and each slate is drawn by Plackett-Luce sampling
without replacement; the logged propensity of the item at position $k$ is its exact probability
of being drawn there given the items above, $w_i / \sum_{j \text{ not above}} w_j$ (the
convention of ``sim.sources.synthetic_events``). Display bias is built in: popular items are
shown often and high. The policy is deliberately not personalised: the learner's position-bias
estimator pools each item's attractiveness over all users, which is consistent only when where
an item is shown does not depend on who sees it (``learner/position_bias.py`` says so). Under a
personalised logging policy the items shown high are also the more relevant ones for the users
who see them there, and an item-keyed estimate reads that selection as a steeper position curve.

Phases: warm-up (10 steps of a simulated minute) and steady state (50) train the models; NDCG@10
and CTR are measured at the end of the steady state against the users' hidden relevance (graded,
in [0, 1]), ranking the whole catalogue. The traffic of every step, as contract-shaped
impression and click events in event-time order, also runs through
``stream.anomaly.detector.AnomalyDetector``; during the bot attack (10 steps, 5 bots) it measures
who is flagged.

The worker's feedback protocols measured (``ndcg_wait``, ``ndcg_immediate``, ``ctr_*``): the
models above learn each step's log at once, every shown item labelled (an order no stream
delivers). Two more learners get the normal users' events of the same learning steps as the
service does: in event-time order through ``stream.worker.pipeline.IngestPipeline`` (batches of
1 s of event time; attribution window ``attribution_window_s`` = 60 s, since clicks come 1 s +
Exp(8 s) after the slate, 99.94% within it, the rest late and lost as in the service) under
``feedback="wait"`` or ``"immediate"``; the examples, in the order the worker emits them, train
``learner.service.Learner.learn`` in polls of ``protocol_poll`` = 64 messages (display-bias
correction and, under ``immediate``, the fake-negative weights included), from the same initial
model. Before the evaluation every slate is closed, so each worker has sent its learner every
click of the log but the late ones (``clicks_sent_<protocol>`` of ``clicks_logged``). They draw
nothing from the simulation's random streams: the other figures are those of a run without them.
They add 20-50 s a seed here (140 s with the learner's former 50,000-outcome calibration window).
"""
from __future__ import annotations

import bisect
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from learner.online_mf import OnlineMF
from learner.position_bias import PositionBiasEstimator
from learner.service import Learner
from learner.settings import LearnerSettings
from stream.anomaly import AnomalyDetector
from stream.events import click as click_event
from stream.events import encode, impression
from stream.examples import CLICK, FEEDBACK_PROTOCOLS, POSITIVE, Example, example_batch
from stream.worker.pipeline import IngestPipeline, Record
from sim.simulator import Request, Schedule, Simulation, ndcg_at_k
from sim.sources import obd_events

DETECTOR_BATCH = 1000  # events per AnomalyDetector.observe_batch call, like a worker batch
POLICY_VERSION = "popularity-shelf"  # model_version of the logged impressions
WORKER_BATCH_S = 1.0  # event time per IngestPipeline.process call of the protocol learners (the worker's timeout)


@dataclass(frozen=True)
class BiasConfig:
    """Size and knobs of one simulation (the defaults are the full benchmark's)."""

    n_users: int = 1000
    n_items: int = 300
    world_factors: int = 8
    model_factors: int = 32  # the learner service's default
    slate_size: int = 10
    eta: float = 1.0
    popularity_alpha: float = 1.0
    warmup_steps: int = 10
    steady_steps: int = 50
    attack_steps: int = 10
    requests_per_step: float = 1.0
    n_bots: int = 5
    batch_size: int = 8192
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    # The protocol learners' attribution window: a click comes 1 s + Exp(8 s) after its slate
    # (sim.simulator), so 99.94% come within 60 s; the demo's worker uses 60 s too.
    attribution_window_s: float = 60.0
    # Messages per Learner.learn call of the protocol learners (bench.feedback's poll; live, at this
    # traffic's ~30 messages/s and a 0.2 s poll timeout, the learner would get fewer). ndcg_wait
    # depends on it: seed 0 gave 0.672 at 64, 0.665 at 256, 0.759 at 1024 (ndcg_immediate 0.744-0.750;
    # learner of commit db65ec7).
    protocol_poll: int = 64


# The learners compared; each entry names the learn_batch arguments it gets besides the labels.
LEARNERS = {"naive": (), "ips": ("positions", "propensities"), "position_only": ("positions",)}


class PopularityPolicy:
    """Plackett-Luce slates over fixed popularity weights, with exact per-position propensities."""

    def __init__(self, n_items: int, alpha: float, seed: int) -> None:
        rank = np.random.default_rng((seed, 101)).permutation(n_items) + 1
        self.log_weights = -alpha * np.log(rank)

    def slates(self, n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` slates of ``size`` item rows (Gumbel top-k = sequential sampling without
        replacement) and the probability of each pick given the items above it."""
        keys = self.log_weights + rng.gumbel(size=(n, len(self.log_weights)))
        top = np.argpartition(-keys, size - 1, axis=1)[:, :size]
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
        items = np.take_along_axis(top, order, axis=1)
        weights = np.exp(self.log_weights)
        picked = weights[items]
        remaining = weights.sum() - (np.cumsum(picked, axis=1) - picked)
        return items, np.minimum(picked / remaining, 1.0)


def run(config: BiasConfig, progress: bool = True) -> dict:
    """One simulation: the learners on the shared log and through the worker's two feedback
    protocols, then the attack through the detector.

    Runs torch on ``config.threads`` threads (restored afterwards): the batches are small and the
    machines shared, and one thread is several times faster than two contending ones here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="streamrec-bias-") as root:
            return _run(config, progress, Path(root))
    finally:
        torch.set_num_threads(threads)


def _run(config: BiasConfig, progress: bool, root: Path) -> dict:
    schedule = Schedule(warmup=config.warmup_steps, steady=config.steady_steps,
                        attack=config.attack_steps, shift=0)
    sim = Simulation.planted(config.n_users, config.n_items, config.world_factors, config.seed,
                             eta=config.eta, schedule=schedule, requests_per_step=config.requests_per_step,
                             n_bots=config.n_bots)
    policy = PopularityPolicy(config.n_items, config.popularity_alpha, config.seed)
    rng = np.random.default_rng((config.seed, 102))
    models = {name: OnlineMF(config.model_factors, seed=config.seed, device=config.device) for name in LEARNERS}
    detector = AnomalyDetector(seed=config.seed)
    watch = AttackWatch(sim)
    protocols = ProtocolLearners(sim, config, root)
    clicks_logged = 0
    pending: list[dict] = []
    result: dict = {}
    learn_until = schedule.start("attack")
    for step in tqdm(range(schedule.n_steps), desc=f"bias simulation, seed {config.seed}", unit="step",
                     file=sys.stderr, disable=not progress):
        requests = sim.requests(step)
        items, propensities = policy.slates(len(requests), config.slate_size, rng)
        events, log = simulate_step(sim, requests, items, propensities)
        if step < learn_until:
            learn(models, log, config.batch_size)
            clicks_logged += int(log["labels"].sum())
            last = step == learn_until - 1  # then every slate of the learning steps closes
            protocols.observe(events, until=None if last else schedule.step_ts(step + 1))
        if step == learn_until - 1:
            result.update(evaluate(sim, {**models, **protocols.models()}, policy, rng, step, config.slate_size))
            result.update(clicks_logged=clicks_logged, **protocols.clicks())
        end = schedule.step_ts(step + 1)
        pending += events
        pending.sort(key=lambda e: e["ts"])
        due = [e for e in pending if e["ts"] < end]
        pending = pending[len(due):]
        for start in range(0, len(due), DETECTOR_BATCH):
            watch.record(detector.observe_batch(due[start:start + DETECTOR_BATCH]))
        if sim.phase(step) == "attack":
            watch.checkpoint(detector, requests)
    result.update(watch.summary())
    return result


def simulate_step(sim: Simulation, requests: list[Request], items: np.ndarray, propensities: np.ndarray
                  ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Show each request its slate and collect the clicks: the contract-shaped events (for the
    detector) and the normal users' examples (for the learners)."""
    catalogue = sim.item_ids
    slate_size = items.shape[1]
    positions = np.arange(1, slate_size + 1)
    events: list[dict] = []
    labels = np.zeros(items.shape)
    for j, request in enumerate(requests):
        request_id = f"bias-{sim.seed}-{request.step}-{request.index}"
        slate = [{"item_id": catalogue[i], "position": int(p), "propensity": float(q)}
                 for i, p, q in zip(items[j].tolist(), positions, propensities[j].tolist())]
        events.append(impression(request.user_id, request_id, POLICY_VERSION, "softmax", slate, ts=request.ts,
                                 event_id=f"{request_id}-imp"))
        for click in sim.respond(request, slate):
            events.append(click_event(request.user_id, request_id, click.item_id, position=click.position,
                                      ts=click.ts, event_id=f"{request_id}-click-{click.position}"))
            labels[j, click.position - 1] = 1.0
    normal = np.array([not r.is_bot for r in requests], dtype=bool)
    users = np.array([r.user_id for r in requests], dtype=object)[normal]
    log = {
        "users": np.repeat(users, slate_size),
        "items": np.array(catalogue, dtype=object)[items[normal]].ravel(),
        "labels": labels[normal].ravel(),
        "positions": np.tile(positions, len(users)),
        "propensities": propensities[normal].ravel(),
    }
    return events, log


def learn(models: dict[str, OnlineMF], log: dict[str, np.ndarray], batch_size: int) -> None:
    """Every model learns the same examples in the same micro-batches; only the display-bias
    arguments differ (``LEARNERS``)."""
    for lo in range(0, len(log["labels"]), batch_size):
        part = {key: value[lo:lo + batch_size] for key, value in log.items()}
        for name, model in models.items():
            extra = {key: part[key] for key in LEARNERS[name]}
            model.learn_batch(part["users"], part["items"], part["labels"], kind="click", **extra)


class ProtocolLearners:
    """The learner service behind the worker, once per feedback protocol (module docstring).

    Feeds the normal users' events of the learning steps, in event-time order, to one
    ``IngestPipeline`` per protocol in worker batches of ``WORKER_BATCH_S`` of event time, and
    each pipeline's examples, in the order it emits them, to its ``Learner`` in polls of
    ``config.protocol_poll`` messages. Draws nothing random: it only reads the events it is given."""

    def __init__(self, sim: Simulation, config: BiasConfig, root: Path) -> None:
        self.bots = frozenset(sim.bot_ids)
        self.window_s = config.attribution_window_s
        self.runs = {feedback: _ProtocolRun(feedback, config, root / feedback) for feedback in FEEDBACK_PROTOCOLS}
        self.pending: list[dict] = []
        self.offset = 0
        self.newest = float("-inf")

    def observe(self, events: list[dict], until: float | None) -> None:
        """Take a step's events (the bots' left out, as from the log) and process those before
        ``until`` in event-time order; with ``until=None`` all of them, then close every slate
        and train every example left."""
        self.pending += [e for e in events if e["user_id"] not in self.bots]
        self.pending.sort(key=lambda e: e["ts"])
        cut = len(self.pending) if until is None else bisect.bisect_left([e["ts"] for e in self.pending], until)
        due, self.pending = self.pending[:cut], self.pending[cut:]
        start = 0
        for end in range(1, len(due) + 1):
            if end == len(due) or due[end]["ts"] - due[start]["ts"] >= WORKER_BATCH_S:
                records = [Record(encode(e), partition=0, offset=self.offset + n) for n, e in enumerate(due[start:end])]
                self.offset += len(records)
                for protocol in self.runs.values():
                    protocol.process(records)
                start = end
        if due:
            self.newest = due[-1]["ts"]
        if until is None:
            for protocol in self.runs.values():
                protocol.close(self.newest + 2 * self.window_s)

    def models(self) -> dict[str, OnlineMF]:
        """Each protocol's learner's model, by protocol name."""
        return {feedback: protocol.learner.model for feedback, protocol in self.runs.items()}

    def clicks(self) -> dict[str, int]:
        """``clicks_sent_<protocol>``: the clicks (label-1 click rows) each worker sent its learner."""
        return {f"clicks_sent_{feedback}": protocol.clicks for feedback, protocol in self.runs.items()}


class _ProtocolRun:
    """One protocol's worker pipeline and learner."""

    def __init__(self, feedback: str, config: BiasConfig, root: Path) -> None:
        window = config.attribution_window_s
        self.pipeline = IngestPipeline(attribution_window_s=window, feedback=feedback)
        self.learner = Learner(LearnerSettings(bootstrap_servers="unused:9092", n_factors=config.model_factors,
                                               device=config.device, store_dir=root / "store",
                                               checkpoint_dir=root / "ckpt", attribution_window_s=window))
        # The same initial model as the log-trained ones (a new Learner seeds its model with 0).
        self.learner.model = OnlineMF(config.model_factors, seed=config.seed, device=config.device)
        self.poll = config.protocol_poll
        self.queue: list[Example] = []
        self.clicks = 0

    def process(self, records: list[Record]) -> None:
        self.queue += self.pipeline.process(records).examples
        self._train(everything=False)

    def close(self, watermark: float) -> None:
        """Move event time to ``watermark`` (closing the slates whose window ended before it), then
        train every example queued, the last poll partial."""
        self.queue += self.pipeline.partition(0).joiner.advance(watermark)
        self._train(everything=True)

    def _train(self, everything: bool) -> None:
        poll = self.poll
        end = len(self.queue) if everything else len(self.queue) - len(self.queue) % poll
        for start in range(0, end, poll):
            batch = example_batch(self.queue[start:min(start + poll, end)])
            rows = batch.rows
            self.learner.learn(batch)
            kinds, labels = rows["kind"].to_numpy(zero_copy_only=False), rows["label"].to_numpy()
            self.clicks += int(((kinds == CLICK) & (labels == POSITIVE)).sum())
        del self.queue[:end]


def evaluate(sim: Simulation, models: dict[str, OnlineMF], policy: PopularityPolicy,
             rng: np.random.Generator, step: int, k: int) -> dict:
    """NDCG@k and expected CTR of each model's greedy top-k, of the logging policy's slates and
    of the best possible slates, against the users' relevance at ``step``."""
    users = np.array(sim.user_ids, dtype=object)
    relevance = sim.preferences_at(step).relevance(np.arange(len(users)))
    theta = sim.examination(np.arange(1, k + 1))
    rankings = {}
    for name, model in models.items():
        scores = model.predict(np.repeat(users, len(sim.item_ids)),
                               np.tile(np.array(sim.item_ids, dtype=object), len(users)), kind="click")
        rankings[name] = np.argsort(-scores.reshape(relevance.shape), axis=1, kind="stable")[:, :k]
    rankings["logging"] = policy.slates(len(users), k, rng)[0]
    rankings["oracle"] = np.argsort(-relevance, axis=1, kind="stable")[:, :k]
    out = {}
    for name, top in rankings.items():
        gains = np.take_along_axis(relevance, top, axis=1)
        if name != "oracle":
            out[f"ndcg_{name}"] = float(ndcg_at_k(gains, relevance, k).mean())
        out[f"ctr_{name}"] = float((gains * theta).mean())
    out["gain"] = out["ndcg_ips"] / out["ndcg_naive"] - 1.0
    out["examination_fitted"] = models["ips"].position_bias.examination(np.arange(1, k + 1)).round(3).tolist()
    out["examination_true"] = theta.round(3).tolist()
    return out


class AttackWatch:
    """Who the detector flags during the attack phase, from its records and its flag set."""

    def __init__(self, sim: Simulation) -> None:
        self.bots = frozenset(sim.bot_ids)
        self.attack_start = sim.schedule.step_ts(sim.schedule.start("attack"))
        self.bot_shares: list[float] = []
        self.normal_shares: list[float] = []
        self.first_request: dict[str, float] = {}
        self.first_alarm: dict[str, float] = {}
        self.normal_active: set[str] = set()
        self.normal_alarmed: set[str] = set()

    def record(self, records: list[dict]) -> None:
        """Note the users alarmed (records of ``AnomalyDetector.observe_batch``) during the attack."""
        for r in records:
            if r["kind"] == "user" and r["ts"] >= self.attack_start:
                self.first_alarm.setdefault(r["entity"], r["ts"])
                if r["entity"] not in self.bots:
                    self.normal_alarmed.add(r["entity"])

    def checkpoint(self, detector: AnomalyDetector, requests: list[Request]) -> None:
        """At the end of an attack step: flagged shares of bots and of this step's normal users."""
        flagged = detector.flagged_users
        for r in requests:
            self.first_request.setdefault(r.user_id, r.ts)
        normal = {r.user_id for r in requests if not r.is_bot}
        self.normal_active |= normal
        self.normal_alarmed |= flagged & normal  # includes flags raised before the attack began
        self.bot_shares.append(len(flagged & self.bots) / len(self.bots))
        self.normal_shares.append(len(flagged & normal) / max(len(normal), 1))

    def summary(self) -> dict:
        """The shares (None without attack steps), detection delay and bots never caught."""
        delays = [self.first_alarm[b] - self.first_request[b] for b in self.bots if b in self.first_alarm]
        return {
            "attack_flagged_share": float(np.mean(self.bot_shares)) if self.bot_shares else None,
            "normal_flagged_share": float(np.mean(self.normal_shares)) if self.normal_shares else None,
            "normal_ever_flagged_share": len(self.normal_alarmed) / max(len(self.normal_active), 1),
            "attack_detection_delay_s": float(np.median(delays)) if delays else None,
            "bots_never_flagged": len(self.bots) - len(delays),
        }


def obd_position_curves(root: Path, resamples: int = 2000) -> dict:
    """Relative examination per position: CTR by position on the uniform-random OBD log (the
    ground truth, with a 95% parametric-bootstrap interval: its clicks are few) next to the PBM
    estimator fitted on the Thompson-sampling log."""
    random_path, bts_path = root / "random" / "men.csv", root / "bts" / "men.csv"
    missing = [str(p) for p in (random_path, bts_path) if not p.is_file()]
    if missing:
        return {"obd_note": f"skipped: Open Bandit sample not found ({', '.join(missing)})"}
    positions, clicks, _ = _obd_rows(random_path)
    n_pos = int(positions.max())
    shown = np.bincount(positions, minlength=n_pos + 1)[1:]
    clicked = np.bincount(positions, weights=clicks, minlength=n_pos + 1)[1:]
    ctr = clicked / shown
    draws = np.random.default_rng(0).binomial(shown, ctr, size=(resamples, n_pos)) / shown
    ratios = draws[draws[:, 0] > 0] / draws[draws[:, 0] > 0, :1]
    estimator = PositionBiasEstimator()
    estimator.update(*_obd_rows(bts_path))
    exam = estimator.examination(np.arange(1, n_pos + 1))
    truth, fitted = ctr / ctr[0], exam / exam[0]
    return {
        "obd_position_ctr_random": truth.round(4).tolist(),
        "obd_position_ctr_random_ci95": np.percentile(ratios, [2.5, 97.5], axis=0).T.round(3).tolist(),
        "obd_examination_bts": fitted.round(4).tolist(),
        "obd_max_abs_diff": round(float(np.abs(truth - fitted).max()), 4),
        "obd_random_clicks": clicked.astype(int).tolist(),
        "obd_random_impressions": shown.tolist(),
    }


def _obd_rows(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Positions, 0/1 clicks and item ids of an OBD log, one row per impression."""
    shown: dict[str, tuple[int, str]] = {}
    clicked: set[str] = set()
    for event in obd_events(path):
        if event["type"] == "impression":
            entry = event["items"][0]
            shown[event["request_id"]] = (entry["position"], entry["item_id"])
        else:
            clicked.add(event["request_id"])
    positions = np.array([p for p, _ in shown.values()], dtype=np.int64)
    clicks = np.array([request_id in clicked for request_id in shown], dtype=np.float64)
    return positions, clicks, [item for _, item in shown.values()]


def summarize(runs: list[dict]) -> dict:
    """Means over the seeds' runs (``gain`` from the mean NDCGs) and the per-seed figures."""
    out = {key: float(np.mean([r[key] for r in runs])) for key, value in runs[0].items()
           if isinstance(value, (int, float)) and all(r[key] is not None for r in runs)}
    out["gain"] = out["ndcg_ips"] / out["ndcg_naive"] - 1.0
    out["examination_fitted"] = np.mean([r["examination_fitted"] for r in runs], axis=0).round(3).tolist()
    out["examination_true"] = runs[0]["examination_true"]
    out["per_seed"] = {key: [r[key] for r in runs] for key in (
        "gain", "ndcg_naive", "ndcg_ips", "ndcg_position_only", "ndcg_wait", "ndcg_immediate", "ctr_wait",
        "ctr_immediate", "attack_flagged_share", "normal_flagged_share")}
    return out
