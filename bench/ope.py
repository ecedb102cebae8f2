r"""Off-policy evaluation validated against the truth: the simulator, and the Open Bandit sample.

**Simulator.** Per seed, a planted world (``sim.simulator``, position-based clicks, examination
$k^{-\eta}$) and the logging policy of ``sim.bias``: Plackett-Luce slates over fixed popularity
weights $\text{rank}^{-\alpha}$, a stochastic policy that knows nothing of the users. The first
``train_steps`` of traffic train the naive and the IPS learner (``sim.bias.learn``) and count the
popularity baseline's clicks; the next ``eval_steps`` are the evaluation log. Four candidates are
estimated on it with every estimator of ``serving.ope``: the IPS learner's greedy policy, the naive
learner's, popularity (greedy on the training clicks) and uniform random. ``dr`` uses each learner's
own click model (its logits, calibrated per position on the training log, as the learner service
does); the baselines borrow the IPS learner's. The per-position estimators get the logging
policy's exact marginal probability of each item at each position (the exponential-race integral of
the Plackett-Luce model, by quadrature), ``slate_ips`` the product of the logged conditional ones.

The truth: the simulator knows every user's attraction $r_{ua}$, so a candidate's expected clicks
on a logged request are $\sum_k \theta_k\, r_{u a_k}$ (uniform: $\sum_k \theta_k \bar r_u$); the true
value is their mean over the evaluation requests (the same contexts the log holds).

**Open Bandit sample** (``../shared/data/obd``, ZOZOTOWN men's campaign, 10,000 rows per policy):
the Bernoulli Thompson Sampling policy's CTR estimated from the uniform-random log, against the CTR
BTS actually got (Saito et al. 2021). BTS is not contextual; its probability of item $a$ at position
$k$ is read off its own log (the share of its position-$k$ rows showing $a$). ``dr``'s direct method
is the random log's CTR per position.

Result fields (last stdout line and ``bench/results/ope.json``): for each estimator ``<est>`` in
ips, snips, dr, slate_ips: ``coverage_<est>`` (share of seed x candidate 95% intervals holding the
true value), ``bias_<est>`` (mean of (estimate - truth) / truth) and ``rel_rmse_<est>`` (root mean
square of the same); ``by_candidate`` the same per candidate; ``obd_bts_ctr`` (with
``obd_bts_ctr_ci``), ``obd_bts_est_<est>`` and ``obd_bts_ci_<est>``; ``targets_met``.

    python -m bench.ope [--quick] [--seeds 0 1 ...] [--obd ../shared/data/obd]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.common import emit
from learner.calibration import PositionCalibration
from learner.online_mf import OnlineMF
from learner.updates import Snapshot
from serving.model import ServingModel
from serving.ope.candidates import ModelClickModel, ScoredCandidate, UniformCandidate, model_candidate
from serving.ope.estimators import ESTIMATORS, PER_POSITION, SlateLog, Target, estimate
from serving.ope.logdata import read_obp_csv, slate_log
from sim.bias import LEARNERS, PopularityPolicy, learn, simulate_step
from sim.simulator import Schedule, Simulation

NAME = "ope"
TARGET_COVERAGE = 0.9
TARGET_REL_RMSE = 0.10


@dataclass(frozen=True)
class OpeConfig:
    n_users: int = 1000
    n_items: int = 100
    slate_size: int = 5
    world_factors: int = 8
    model_factors: int = 16
    eta: float = 1.0
    popularity_alpha: float = 0.5
    train_steps: int = 20
    eval_steps: int = 20
    batch_size: int = 8192


def plackett_luce_marginals(log_weights: np.ndarray, k: int, grid: int = 4000) -> np.ndarray:
    r"""$P(\text{item } i \text{ at position } j)$, ``[n_items, k]``, of Plackett-Luce sampling without
    replacement: item $i$ arrives at $T_i \sim \text{Exp}(w_i)$ and is $j$-th when exactly $j-1$ others
    arrived before it, so $\int_0^\infty w_i e^{-w_i t} P(N_{-i}(t) = j - 1)\, dt$, with $N_{-i}(t)$
    Poisson-binomial (its generating polynomial from prefix and suffix products) and the integral
    by the trapezoid rule on a logarithmic grid."""
    w = np.exp(log_weights - log_weights.max())
    t = np.geomspace(1e-6 / w.sum(), 60.0 / w.min(), grid)
    a = np.exp(-np.outer(w, t))  # [n, grid]: not arrived by t
    polys_before = [np.zeros((len(t), k)) for _ in range(len(w) + 1)]
    polys_before[0][:, 0] = 1.0
    for i in range(len(w)):
        polys_before[i + 1] = _times(polys_before[i], a[i])
    after = np.zeros((len(t), k))
    after[:, 0] = 1.0
    out = np.zeros((len(w), k))
    for i in reversed(range(len(w))):
        others = np.stack([np.sum(polys_before[i][:, :m + 1] * after[:, m::-1], axis=1) for m in range(k)], axis=1)
        density = w[i] * a[i]  # [grid]
        out[i] = np.trapezoid(density[:, None] * others * t[:, None], np.log(t), axis=0)
        after = _times(after, a[i])
    return out


def _times(poly: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``poly`` (coefficients of z^0..z^{k-1} per grid point) times (a + (1 - a) z), truncated."""
    out = poly * a[:, None]
    out[:, 1:] += poly[:, :-1] * (1.0 - a)[:, None]
    return out


def serving_model(model: OnlineMF, name: str, calibration: PositionCalibration | None) -> ServingModel:
    """The ``ServingModel`` a snapshot of ``model`` would load as."""
    users, items = model.export_rows(None, None)
    manifest = {"model": "ope", "version": name, "seq": 1, "created_ts": 0.0}
    cal = None if calibration is None else (tuple(calibration.intercepts.tolist()), calibration.slope)
    return ServingModel.from_snapshot(Snapshot(manifest, model.global_mean, model.click_intercept, users, items,
                                               model.rating_range, cal))


def calibrated(model: OnlineMF, name: str, train: dict[str, np.ndarray], k: int) -> ServingModel:
    """``model`` as served, its click probability calibrated per position on the training log."""
    plain = serving_model(model, name, None)
    p = plain.click_probability_at(plain.users.rows(list(train["users"])), plain.items.rows(list(train["items"])),
                                   train["positions"])
    p = np.clip(p, 1e-9, 1 - 1e-9)
    calibration = PositionCalibration(max_position=k, window=len(p), refit_every=len(p))
    calibration.update(np.log(p / (1 - p)), train["positions"], train["labels"])
    return serving_model(model, name, calibration)


def run_seed(config: OpeConfig, seed: int) -> list[dict]:
    """Every candidate's truth and estimates on one seed's evaluation log."""
    k = config.slate_size
    schedule = Schedule(warmup=0, steady=config.train_steps + config.eval_steps, attack=0, shift=0)
    sim = Simulation.planted(config.n_users, config.n_items, config.world_factors, seed, eta=config.eta,
                             schedule=schedule, n_bots=0)
    policy = PopularityPolicy(config.n_items, config.popularity_alpha, seed)
    marginals = plackett_luce_marginals(policy.log_weights, k)
    rng = np.random.default_rng((seed, 103))
    models = {name: OnlineMF(config.model_factors, seed=seed) for name in LEARNERS if name != "position_only"}
    train: list[dict] = []
    evaluation: list[tuple] = []
    for step in range(schedule.n_steps):
        requests = sim.requests(step)
        items, propensities = policy.slates(len(requests), k, rng)
        _, logged = simulate_step(sim, requests, items, propensities)
        if step < config.train_steps:
            learn(models, logged, config.batch_size)
            train.append(logged)
        else:
            evaluation.append((step, requests, items, propensities, logged["labels"].reshape(len(requests), k)))
    train_log = {key: np.concatenate([t[key] for t in train]) for key in train[0]}
    log, truth_inputs = _slate_log(sim, evaluation, marginals, k)
    served = {name: calibrated(m, name, train_log, k) for name, m in models.items()}
    clicked = train_log["items"][train_log["labels"] > 0]
    catalogue = list(sim.item_ids)
    counts = np.array([np.sum(clicked == item) for item in catalogue], dtype=np.float64)
    ips_clicks = ModelClickModel(served["ips"])
    candidates = {
        "ips_greedy": model_candidate(served["ips"]),
        "naive_greedy": model_candidate(served["naive"]),
        "popularity": ScoredCandidate("popularity", catalogue, lambda user: np.log1p(counts), click_model=ips_clicks),
        "uniform": UniformCandidate(catalogue, click_model=ips_clicks),
    }
    out = []
    for name, candidate in candidates.items():
        truth = _truth(sim, candidate, truth_inputs, k)
        estimates = estimate(log, candidate.target(log))
        out.append({"seed": seed, "candidate": name, "truth": truth, "logged": log.logged_value() / k,
                    **{est: (e.ctr, *e.ci, e.ess) for est, e in estimates.items()}})
    return out


def _slate_log(sim: Simulation, evaluation: list[tuple], marginals: np.ndarray, k: int
               ) -> tuple[SlateLog, tuple[np.ndarray, np.ndarray]]:
    """The evaluation log with exact marginal propensities; and (user rows, relevance at each request)."""
    users, items, conditional, clicks, relevance = [], [], [], [], []
    catalogue = np.array(sim.item_ids, dtype=object)
    for step, requests, rows, propensities, labels in evaluation:
        user_rows = np.array([sim.user_row(r.user_id) for r in requests])
        users += [r.user_id for r in requests]
        items.append(rows)
        conditional.append(propensities)
        clicks.append(labels)
        relevance.append(sim.preferences_at(step).relevance(user_rows))
    rows = np.concatenate(items)
    slate_conditional = np.concatenate(conditional)
    marginal = marginals[rows, np.arange(k)[None, :]]
    log = SlateLog(np.array(users, dtype=object), catalogue[rows], np.ones(rows.shape, bool),
                   np.concatenate(clicks), marginal, np.prod(slate_conditional, axis=1))
    return log, (np.array(users, dtype=object), np.concatenate(relevance))


def _truth(sim: Simulation, candidate: object, truth_inputs: tuple[np.ndarray, np.ndarray], k: int) -> float:
    """The candidate's true expected CTR per shown item over the evaluation requests."""
    users, relevance = truth_inputs
    theta = sim.examination(np.arange(1, k + 1))
    if isinstance(candidate, UniformCandidate):
        return float(theta.sum() * relevance.mean() / k)
    index = {item: r for r, item in enumerate(sim.item_ids)}
    to_sim = np.array([index[item] for item in candidate.catalogue])
    total = 0.0
    for j, user in enumerate(users):
        slate = to_sim[candidate.draw(np.asarray(candidate.scores(user), np.float64), k, None)[0]]
        total += float(theta @ relevance[j, slate])
    return total / (len(users) * k)


def summarize(rows: list[dict]) -> dict:
    """Coverage, relative bias and relative RMSE per estimator, over all rows and per candidate."""
    def stats(subset: list[dict]) -> dict:
        out = {}
        for est in ESTIMATORS:
            truth = np.array([r["truth"] for r in subset])
            value, low, high = (np.array([r[est][j] for r in subset]) for j in range(3))
            rel = (value - truth) / truth
            out[f"coverage_{est}"] = round(float(np.mean((low <= truth) & (truth <= high))), 4)
            out[f"bias_{est}"] = round(float(np.nanmean(rel)), 4)
            out[f"rel_rmse_{est}"] = round(float(np.sqrt(np.nanmean(rel ** 2))), 4)
            out[f"median_ess_{est}"] = round(float(np.median([r[est][3] for r in subset])), 1)
        return out

    result = stats(rows)
    result["by_candidate"] = {c: {"truth_mean": round(float(np.mean([r["truth"] for r in rows if r["candidate"] == c])), 5),
                                  **stats([r for r in rows if r["candidate"] == c])}
                              for c in dict.fromkeys(r["candidate"] for r in rows)}
    result["logged_ctr_mean"] = round(float(np.mean([r["logged"] for r in rows])), 5)
    return result


def obd_bts(root: Path) -> dict:
    """BTS's CTR estimated from the uniform-random OBD log, beside the CTR BTS's own log shows."""
    random_path, bts_path = root / "random" / "men.csv", root / "bts" / "men.csv"
    if not (random_path.is_file() and bts_path.is_file()):
        return {"obd_note": f"skipped: {random_path} or {bts_path} not found"}
    log = slate_log(read_obp_csv(random_path))
    bts = read_obp_csv(bts_path)
    n_pos = log.items.shape[1]
    table = {(str(item), int(pos)): count / np.sum(bts["position"] == pos)
             for (item, pos), count in bts.groupby(["item_id", "position"]).size().items()}
    shown_pos = np.argmax(log.shown, axis=1)
    marginal = np.zeros(log.items.shape)
    for i, (pos, item) in enumerate(zip(shown_pos, log.items[np.arange(log.n_slates), shown_pos])):
        marginal[i, pos] = table.get((item, int(pos) + 1), 0.0)
    ctr_k = np.array([log.clicks[log.shown[:, j], j].mean() for j in range(n_pos)])
    q = np.where(log.shown, ctr_k[None, :], 0.0)
    target = Target(marginal, marginal.sum(axis=1), q, q)
    estimates = estimate(log, target)
    ctr = float(bts["click"].mean())
    half = 1.96 * np.sqrt(ctr * (1 - ctr) / len(bts))
    out = {"obd_bts_ctr": round(ctr, 5), "obd_bts_ctr_ci": [round(ctr - half, 5), round(ctr + half, 5)],
           "obd_random_ctr": round(log.logged_value(), 5), "obd_random_clicks": int(log.clicks.sum())}
    for est, e in estimates.items():
        out[f"obd_bts_est_{est}"] = round(e.ctr, 5)
        out[f"obd_bts_ci_{est}"] = [round(e.ci[0], 5), round(e.ci[1], 5)]
        out[f"obd_bts_ess_{est}"] = round(e.ess, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.ope", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 seeds of a smaller world (a minute or two)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0..19 quick, 0..29 full)")
    parser.add_argument("--obd", type=Path, default=Path("../shared/data/obd"),
                        help="Open Bandit sample with random/ and bts/ (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    config = OpeConfig(n_users=500, train_steps=10, eval_steps=20) if args.quick else OpeConfig()
    seeds = args.seeds or list(range(20 if args.quick else 30))
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = [row for seed in tqdm(seeds, desc="ope seeds", file=sys.stderr, disable=args.no_progress)
            for row in run_seed(config, seed)]
    result = {"quick": args.quick, **asdict(config), "seeds": len(seeds), **summarize(rows), **obd_bts(args.obd)}
    best = min(PER_POSITION, key=lambda e: result[f"rel_rmse_{e}"])
    result["best_per_position"] = best
    result["targets"] = {"coverage": TARGET_COVERAGE, "rel_rmse": TARGET_REL_RMSE}
    result["targets_met"] = {"coverage": result[f"coverage_{best}"] >= TARGET_COVERAGE,
                             "rel_rmse": result[f"rel_rmse_{best}"] <= TARGET_REL_RMSE}
    result["seconds"] = round(time.perf_counter() - start, 1)
    emit(NAME, result)
    return result


if __name__ == "__main__":
    main()
