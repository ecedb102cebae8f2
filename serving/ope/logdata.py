"""The logged slates an evaluation runs on, as a ``SlateLog``, from wherever they are kept.

Three sources, one layout: the Open Bandit Pipeline's rows (``item_id, position, click,
propensity_score``, plus ``request_id, user_id, policy`` when known), one row per shown item:

* the worker's log, through ``stream.log.export.obp_frame`` (so this module does not care how the
  log is stored);
* an OBP-layout CSV (``streamrec export obp`` writes one; the Open Bandit Dataset's files are
  another, without request ids: each row is then a slate of its own);
* serving's recent click outcomes (``serving.shadow.Outcome``), for the promotion check.

**Propensities.** serving logs, for each item, the probability of choosing it at its position
*given the items above it* (``serving.policies``); their product is the slate's probability, which
``slate_ips`` uses exactly. The per-position estimators want the *marginal* probability of the item
at its position. The two agree for ``greedy`` (1) and for one-position slates; for ``uniform`` the
marginal is recovered exactly ($1/N$ from the conditional $1/(N - k + 1)$). For ``epsilon_greedy``,
``softmax`` and ``external`` logs the conditional one stands in for it, and the ``SlateLog``'s
``notes`` say so. Rows without a ``policy`` (the OBD files) are taken as marginal, as the OBD
documents its ``propensity_score``.

Repeated rows of a slate's position (the provisional ``shown`` negative and the later click) merge
into one, clicked if any is; with request ids, a slate none of whose rows is a non-click is still
open (its attribution window has not closed) and is left out.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from serving.ope.estimators import SlateLog

log = logging.getLogger(__name__)

REQUIRED = ("item_id", "position", "click", "propensity_score")
EXACT_POLICIES = ("greedy", "uniform")


def read_worker_log(log_dir: str | Path, policy: str | None = None) -> pd.DataFrame:
    """The worker log's click outcomes in the OBP layout (``stream.log.export.obp_frame``; a folder
    or whatever location the log's reader takes)."""
    from stream.log.export import obp_frame

    return obp_frame(log_dir, policy)


def read_obp_csv(path: Path, policy: str | None = None) -> pd.DataFrame:
    """An OBP-layout CSV; ValueError naming a missing column."""
    frame = pd.read_csv(path, index_col=None, low_memory=False)
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("Unnamed")])
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: column {missing[0]!r} is missing (an OBP-layout CSV has {', '.join(REQUIRED)})")
    if policy is not None:
        if "policy" not in frame.columns:
            raise ValueError(f"{path}: column 'policy' is missing, so the rows cannot be filtered by policy")
        frame = frame[frame["policy"] == policy]
    return frame


def outcomes_frame(outcomes: Sequence) -> pd.DataFrame:
    """serving's recent click outcomes (``serving.shadow.Outcome``) that carry their slate, OBP layout."""
    rows = [(o.item_id, o.position, o.label, o.propensity, o.request_id, o.user_id, o.policy) for o in outcomes
            if o.kind == "click" and o.request_id is not None and o.propensity is not None and o.position is not None]
    return pd.DataFrame(rows, columns=["item_id", "position", "click", "propensity_score", "request_id",
                                       "user_id", "policy"])


def slate_log(frame: pd.DataFrame, max_position: int = 100) -> SlateLog:
    """The ``SlateLog`` of an OBP-layout frame (see the module docstring); ValueError naming a bad column."""
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"column {missing[0]!r} is missing")
    frame = frame.reset_index(drop=True)
    position = pd.to_numeric(frame["position"], errors="coerce")
    p = pd.to_numeric(frame["propensity_score"], errors="coerce")
    click = pd.to_numeric(frame["click"], errors="coerce")
    for name, ok in (("position", (position >= 1) & (position <= max_position)),
                     ("propensity_score", (p > 0) & (p <= 1)), ("click", click.isin([0, 1]))):
        if not ok.all():
            bad = frame[name][~ok].iloc[0]
            raise ValueError(f"column {name!r} holds {bad}: positions are 1..{max_position}, propensities in "
                             "(0, 1], clicks 0 or 1")
    frame = frame.assign(position=position.astype(np.int64), propensity_score=p.astype(float), click=click.astype(float))
    by_request = "request_id" in frame.columns and frame["request_id"].notna().all()
    if by_request:
        frame = _merge_rows(frame)
        slate, _ = pd.factorize(frame["request_id"])
    else:
        slate = np.arange(len(frame))
    n, k = (int(slate.max()) + 1, int(frame["position"].max())) if len(frame) else (0, 1)
    col = frame["position"].to_numpy() - 1
    items = np.full((n, k), "", dtype=object)
    shown = np.zeros((n, k), bool)
    clicks, propensity = np.zeros((n, k)), np.ones((n, k))
    items[slate, col] = frame["item_id"].astype(str).to_numpy()
    shown[slate, col] = True
    clicks[slate, col] = frame["click"].to_numpy()
    raw = frame["propensity_score"].to_numpy()
    propensity[slate, col] = _marginal(raw, col + 1, frame.get("policy"))
    slate_propensity = np.ones(n)
    np.multiply.at(slate_propensity, slate, raw)
    users = np.full(n, "", dtype=object)
    if "user_id" in frame.columns:
        users[slate] = frame["user_id"].fillna("").astype(str).to_numpy()
    return SlateLog(users, items, shown, clicks, propensity, slate_propensity, _notes(frame, k))


def _merge_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (slate, position), clicked if any row is; open slates (no non-click row) dropped."""
    grouped = frame.groupby(["request_id", "position"], sort=False, as_index=False)
    merged = grouped.agg({c: "first" for c in frame.columns if c not in ("request_id", "position", "click")}
                         | {"click": "max"})
    closed = frame.groupby("request_id")["click"].min() == 0
    open_slates = (~closed).sum()
    if open_slates:
        log.info("left out %d slates whose attribution window has not closed", open_slates)
    return merged[merged["request_id"].map(closed)].reset_index(drop=True)


def _marginal(raw: np.ndarray, positions: np.ndarray, policy: pd.Series | None) -> np.ndarray:
    """Per-position marginal propensities from the logged ones (module docstring)."""
    if policy is None:
        return raw
    uniform = (policy == "uniform").to_numpy()
    out = raw.copy()
    out[uniform] = 1.0 / (1.0 / raw[uniform] + (positions[uniform] - 1))
    return out


def _notes(frame: pd.DataFrame, k: int) -> tuple[str, ...]:
    if "policy" not in frame.columns or k == 1:
        return ()
    inexact = sorted(set(frame["policy"].dropna().astype(str)) - set(EXACT_POLICIES))
    if not inexact:
        return ()
    return (f"slates logged by {', '.join(inexact)} carry conditional propensities; the per-position estimators "
            "use them as the marginal ones (exact for greedy and uniform logs; slate_ips is exact for all)",)
