"""``streamrec evaluate``: the worker's log (through ``stream.log.export``) or an OBP-layout CSV in,
a table or JSON out; a candidate identical to the logging policy estimates the logged CTR; errors
name what is wrong."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from learner.updates import ModelRows, read_snapshot, write_snapshot
from serving.model import ServingModel
from serving.ope.candidates import model_candidate
from serving.ope.logdata import slate_log
from stream.cli import main
from stream.log.table import EXAMPLES, DeltaLog

N_ITEMS, SLATE, N_USERS = 12, 4, 30


def snapshot(store) -> ServingModel:
    rng = np.random.default_rng(0)
    users = ModelRows([f"u{j}" for j in range(N_USERS)], rng.normal(size=(N_USERS, 3)).astype(np.float32),
                      np.zeros(N_USERS, np.float32), rng.normal(0, 0.3, N_USERS).astype(np.float32))
    items = ModelRows([f"i{j}" for j in range(N_ITEMS)], rng.normal(size=(N_ITEMS, 3)).astype(np.float32),
                      np.zeros(N_ITEMS, np.float32), rng.normal(0, 0.3, N_ITEMS).astype(np.float32))
    write_snapshot(store, "mf", 1, 0.0, -1.5, users, items)
    return ServingModel.from_snapshot(read_snapshot(store / "mf" / "mf-1"))


def rows_for(slates: list[tuple[str, list[str], list[float]]], clicks: np.ndarray, policy: str) -> list[dict]:
    out = []
    for s, (user, items, propensities) in enumerate(slates):
        for k, (item, p) in enumerate(zip(items, propensities)):
            out.append({"item_id": item, "position": k + 1, "click": int(clicks[s, k]), "propensity_score": p,
                        "user_id": user, "request_id": f"r{s}", "policy": policy})
    return out


def greedy_log(model: ServingModel, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Slates the model's greedy policy showed (propensity 1), with random clicks."""
    candidate = model_candidate(model)
    slates = []
    for s in range(n):
        user = f"u{rng.integers(N_USERS)}"
        top = candidate.draw(candidate.scores(user), SLATE, rng)[0]
        slates.append((user, [candidate.catalogue[r] for r in top], [1.0] * SLATE))
    clicks = rng.random((n, SLATE)) < np.array([0.4, 0.3, 0.2, 0.1])
    frame = pd.DataFrame(rows_for(slates, clicks, "greedy"))
    # every slate needs a non-click row to count as closed: make sure of it at the last position
    frame.loc[frame["position"] == SLATE, "click"] = 0
    return frame


def uniform_log(n: int, rng: np.random.Generator) -> pd.DataFrame:
    slates = [(f"u{rng.integers(N_USERS)}", [f"i{j}" for j in rng.choice(N_ITEMS, SLATE, replace=False)],
               [1.0 / (N_ITEMS - k) for k in range(SLATE)]) for _ in range(n)]
    clicks = np.zeros((n, SLATE), bool)
    clicks[:, :-1] = rng.random((n, SLATE - 1)) < 0.3
    return pd.DataFrame(rows_for(slates, clicks, "uniform"))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["evaluate", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_logging_policy_itself_estimates_the_logged_ctr(tmp_path, capsys):
    rng = np.random.default_rng(1)
    model = snapshot(tmp_path / "store")
    path = tmp_path / "greedy.csv"
    greedy_log(model, 300, rng).to_csv(path, index=False)
    code, out, _ = run(capsys, "--obp-csv", path, "--store-dir", tmp_path / "store", "--version", "latest", "--json")
    report = json.loads(out)
    assert code == 0 and report["n_slates"] == 300
    for name in ("ips", "snips", "dr", "slate_ips"):
        assert report["estimates"][name]["ctr"] == pytest.approx(report["logged_ctr"]), name
    assert report["estimates"]["ips"]["ess"] == pytest.approx(300)

    path = tmp_path / "uniform.csv"
    uniform_log(500, rng).to_csv(path, index=False)
    code, out, _ = run(capsys, "--obp-csv", path, "--baseline", "uniform", "--json")
    report = json.loads(out)
    assert report["notes"] == []  # uniform's marginal propensities are exact
    for name in ("ips", "snips", "slate_ips"):
        assert report["estimates"][name]["ctr"] == pytest.approx(report["logged_ctr"]), name
        assert report["estimates"][name]["warnings"] == []


def test_a_uniform_log_converts_conditional_propensities_to_marginal_ones():
    frame = uniform_log(3, np.random.default_rng(0))
    log = slate_log(frame)
    assert log.propensity == pytest.approx(np.full((3, SLATE), 1.0 / N_ITEMS))
    assert log.slate_propensity == pytest.approx(np.full(3, 1.0 / (12 * 11 * 10 * 9)))


def test_open_slates_and_repeated_rows_merge(tmp_path):
    frame = pd.DataFrame([
        # r0: shown (provisional 0) then clicked at position 1; closed with a 0 at position 2
        {"item_id": "a", "position": 1, "click": 0, "propensity_score": 0.5, "request_id": "r0", "policy": "softmax"},
        {"item_id": "a", "position": 1, "click": 1, "propensity_score": 0.5, "request_id": "r0", "policy": "softmax"},
        {"item_id": "b", "position": 2, "click": 0, "propensity_score": 1.0, "request_id": "r0", "policy": "softmax"},
        # r1: only a click so far, its window still open
        {"item_id": "b", "position": 1, "click": 1, "propensity_score": 0.5, "request_id": "r1", "policy": "softmax"},
    ])
    log = slate_log(frame)
    assert log.n_slates == 1 and log.clicks.tolist() == [[1.0, 0.0]]
    assert log.notes and "softmax" in log.notes[0]


def test_the_worker_log_is_read_through_the_export(tmp_path, capsys):
    rows = uniform_log(200, np.random.default_rng(4))
    DeltaLog(tmp_path / "log").append(EXAMPLES, [
        {"user_id": r.user_id, "item_id": r.item_id, "label": float(r.click), "position": int(r.position),
         "propensity": float(r.propensity_score), "weight": 1.0, "model_version": "m1", "request_id": r.request_id,
         "ts": 1_700_000_000.0 + j, "kind": "click", "anomalous": False, "policy": "uniform", "event_id": f"e{j}",
         "variant": None}
        for j, r in enumerate(rows.itertuples())])
    code, out, _ = run(capsys, "--log-dir", tmp_path / "log", "--baseline", "uniform", "--logging-policy", "uniform")
    assert code == 0
    assert "candidate: uniform    slates: 200" in out and "logged CTR (the reference)" in out
    assert out.count("\n") >= 6 and "slate_ips" in out


def test_errors_name_the_problem(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"item_id": ["a"], "position": [1], "click": [0]}).to_csv(path, index=False)
    code, _, err = run(capsys, "--obp-csv", path, "--baseline", "uniform")
    assert code == 2 and "'propensity_score' is missing" in err
    pd.DataFrame({"item_id": ["a"], "position": [1], "click": [0], "propensity_score": [1.5]}).to_csv(path, index=False)
    code, _, err = run(capsys, "--obp-csv", path, "--baseline", "uniform")
    assert code == 2 and "propensity_score" in err
    code, _, err = run(capsys, "--obp-csv", path)
    assert code == 2 and "name a candidate" in err
    code, _, err = run(capsys, "--obp-csv", path, "--store-dir", tmp_path, "--version", "mf-9")
    assert code == 2 and "no snapshot 'mf-9'" in err
