"""The shadow check: a candidate model is promoted only if it predicts recent outcomes about as
well as the live one.

Both models score the same recent outcomes (the monitor keeps the last few thousand from
``examples``). For every kind with at least ``min_outcomes`` outcomes, the candidate's RMSE may
exceed the live model's by at most ``tolerance`` (relative: 0.05 allows 5 % worse); otherwise it
is refused. With too few outcomes there is no evidence against the candidate and it is promoted.

Then it asks the off-policy evaluator (``serving.ope.evidence``): a candidate whose estimated CTR
on the recent logged slates (the lower end of its 95% interval) is below the live model's estimate
by more than ``tolerance`` is refused as well; ``refused_for`` says which check refused it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from serving.model import KINDS, ServingModel
from serving.ope.evidence import evidence_check
from stream.events import MAX_ID_CHARS


class Outcome(NamedTuple):
    """One observed outcome: a rating, or a click label (1 clicked, 0 shown and not clicked); a click
    outcome also carries where its slate showed the item, with what probability, in which request
    and by which policy (None where the example did not say: it then gives no CTR evidence)."""

    user_id: str
    item_id: str
    label: float
    kind: str
    position: int | None = None
    propensity: float | None = None
    request_id: str | None = None
    policy: str | None = None


def outcome_of(example: dict, user_id: str, item_id: str, label: float, kind: str) -> Outcome:
    """The ``Outcome`` of a validated example, with its slate fields where they are well formed."""
    position, propensity = example.get("position"), example.get("propensity")
    request_id, policy = example.get("request_id"), example.get("policy")
    if (kind == "click" and isinstance(position, int) and not isinstance(position, bool) and position >= 1
            and isinstance(propensity, (int, float)) and not isinstance(propensity, bool) and 0 < propensity <= 1
            and isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_CHARS
            and (policy is None or (isinstance(policy, str) and len(policy) <= MAX_ID_CHARS))):
        return Outcome(user_id, item_id, label, kind, position, float(propensity), request_id, policy)
    return Outcome(user_id, item_id, label, kind)


@dataclass(frozen=True)
class ShadowVerdict:
    """Whether to promote, why, and the RMSE of both models per kind that had enough outcomes;
    ``refused_for`` is ``rmse`` or ``ctr`` (the evidence check) when refused."""

    promote: bool
    reason: str
    live_rmse: dict[str, float]
    candidate_rmse: dict[str, float]
    refused_for: str | None = None


def rmse(model: ServingModel, outcomes: Sequence[Outcome], kind: str) -> float:
    """RMSE of ``model`` on ``outcomes`` (all of one ``kind``)."""
    users = model.users.rows([o.user_id for o in outcomes])
    items = model.items.rows([o.item_id for o in outcomes])
    labels = np.array([o.label for o in outcomes], np.float64)
    return float(np.sqrt(np.mean((model.predict_rows(users, items, kind) - labels) ** 2)))


def shadow_check(live: ServingModel, candidate: ServingModel, outcomes: Sequence[Outcome],
                 tolerance: float = 0.05, min_outcomes: int = 100, kind: str = "click") -> ShadowVerdict:
    """Compare ``candidate`` with ``live`` on ``outcomes`` (see the module docstring); ``kind``: the
    logits serving ranks by, for the CTR evidence.

    >>> import numpy as np
    >>> from learner.updates import Delta, ModelRows
    >>> def model(bias):
    ...     items = ModelRows(["a"], np.zeros((1, 1)), np.array([bias]), np.zeros(1))
    ...     delta = Delta("mf", 1, "mf-1", 3.0, 0.0, ModelRows.empty(1), items, 0.0, None)
    ...     return ServingModel.empty("mf", 1).apply([delta])
    >>> outcomes = [Outcome("u", "a", 4.0, "rating")] * 100
    >>> shadow_check(model(1.0), model(0.5), outcomes).promote, shadow_check(model(0.5), model(1.0), outcomes).promote
    (False, True)
    """
    live_rmse: dict[str, float] = {}
    candidate_rmse: dict[str, float] = {}
    worse = []
    for kind in KINDS:
        of_kind = [o for o in outcomes if o.kind == kind]
        if len(of_kind) < min_outcomes:
            continue
        live_rmse[kind] = rmse(live, of_kind, kind)
        candidate_rmse[kind] = rmse(candidate, of_kind, kind)
        if candidate_rmse[kind] > live_rmse[kind] * (1.0 + tolerance):
            worse.append(f"{kind} RMSE {candidate_rmse[kind]:.4f} vs live {live_rmse[kind]:.4f} "
                         f"on {len(of_kind)} outcomes")
    if worse:
        return ShadowVerdict(False, f"worse than the live model by more than {tolerance:.0%}: " + "; ".join(worse),
                             live_rmse, candidate_rmse, "rmse")
    evidence = evidence_check(live, candidate, outcomes, tolerance, kind)
    if not evidence.promote:
        return ShadowVerdict(False, f"fewer clicks expected than from the live model: {evidence.reason}",
                             live_rmse, candidate_rmse, "ctr")
    if not live_rmse:
        return ShadowVerdict(True, f"fewer than {min_outcomes} recent outcomes of each kind: nothing to compare; "
                                   f"{evidence.reason}", live_rmse, candidate_rmse)
    return ShadowVerdict(True, f"within tolerance; {evidence.reason}", live_rmse, candidate_rmse)
