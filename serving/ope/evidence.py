r"""Promotion on evidence: would the candidate snapshot get fewer clicks than the live model?

The shadow check (``serving.shadow``) asks this after its RMSE comparison. Both models are
evaluated as greedy rankers (by serving's ranking ``kind``) on the recent click slates the monitor
kept, with their positions and logged propensities (``serving.ope.logdata.outcomes_frame``), by
self-normalised per-position IPS (``serving.ope.estimators``; it uses neither model's click model,
so a candidate cannot vouch for itself). The candidate is refused when the lower end of its 95%
interval lies below the live model's estimate by more than ``tolerance`` (relative):

$$\text{refuse} \iff \hat V^{\text{low}}_{\text{cand}} < (1 - \text{tolerance})\, \hat V_{\text{live}}$$

There is no evidence, and the candidate passes, with fewer than ``min_slates`` closed slates, or
when the log supports either model's choices too poorly (effective sample size below ``min_ess``):
a greedy logging policy, for one, shows nothing but the live model's own choices. Note that the rule
is strict: with a wide interval even a candidate as good as the live one is refused, so the
evidence must be plentiful (exploration, many slates) before a changed ranking gets through.

>>> import numpy as np
>>> from learner.updates import Delta, ModelRows
>>> from serving.model import ServingModel
>>> def model(bias_a):
...     items = ModelRows(["a", "b"], np.zeros((2, 1)), np.zeros(2), np.array([bias_a, 0.0]))
...     return ServingModel.empty("mf", 1).apply([Delta("mf", 1, "mf-1", 0.0, 0.0, ModelRows.empty(1), items, 0.0, None)])
>>> from serving.shadow import Outcome
>>> outcomes = [Outcome(f"u{j}", item, float(j % 2 == 0 and pos == 1), "click", pos, 0.5, f"r{j}", "softmax")
...             for j in range(400) for pos, item in enumerate("ab" if j % 2 == 0 else "ba", start=1)]
>>> evidence_check(model(1.0), model(-1.0), outcomes).promote, evidence_check(model(-1.0), model(1.0), outcomes).promote
(False, True)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.model import ServingModel
from serving.ope.candidates import model_candidate
from serving.ope.estimators import Estimate, estimate
from serving.ope.logdata import outcomes_frame, slate_log

ESTIMATOR = "snips"


@dataclass(frozen=True)
class EvidenceVerdict:
    """Whether the logged slates let the candidate through, why, and both estimates (None without evidence)."""

    promote: bool
    reason: str
    live: Estimate | None = None
    candidate: Estimate | None = None


def evidence_check(live: ServingModel, candidate: ServingModel, outcomes: Sequence, tolerance: float = 0.05,
                   kind: str = "click", min_slates: int = 200, min_ess: float = 30.0) -> EvidenceVerdict:
    """Compare the two models' estimated CTR on the logged slates in ``outcomes`` (module docstring)."""
    frame = outcomes_frame(outcomes)
    slates = slate_log(frame) if len(frame) else None
    if slates is None or slates.n_slates < min_slates:
        n = 0 if slates is None else slates.n_slates
        return EvidenceVerdict(True, f"{n} closed slates with propensities, fewer than {min_slates}: no CTR evidence")
    figures = {}
    for name, model in (("live", live), ("candidate", candidate)):
        target = model_candidate(model, "greedy", kind, click_model=None).target(slates)
        figures[name] = estimate(slates, target, [ESTIMATOR])[ESTIMATOR]
    live_e, cand_e = figures["live"], figures["candidate"]
    if min(live_e.ess, cand_e.ess) < min_ess or not np.isfinite([live_e.ctr, cand_e.ci[0]]).all():
        return EvidenceVerdict(True, f"the {slates.n_slates} logged slates support the models' choices too poorly "
                                     f"to judge (effective sample sizes {live_e.ess:.0f} live, {cand_e.ess:.0f} "
                                     f"candidate, below {min_ess:.0f})", live_e, cand_e)
    summary = (f"estimated CTR {cand_e.ctr:.4f} [{cand_e.ci[0]:.4f}, {cand_e.ci[1]:.4f}] vs live {live_e.ctr:.4f} "
               f"on {slates.n_slates} slates")
    if cand_e.ci[0] < (1.0 - tolerance) * live_e.ctr:
        return EvidenceVerdict(False, f"{summary}: below the live model's by more than {tolerance:.0%}", live_e, cand_e)
    return EvidenceVerdict(True, summary, live_e, cand_e)
