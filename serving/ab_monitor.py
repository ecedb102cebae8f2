"""Served click figures per A/B variant, fed by the monitor with the outcomes it scores.

The monitor (``serving.monitor``) scores every click outcome on ``examples`` with the model
version that served it; this splits those scored outcomes by the ``variant`` the example carries
and keeps, per configured variant, the observed CTR and the served click quality beside its
running-CTR baseline (``learner.quality.ClickQuality``), as ``streamrec_variant_*{variant}``.
Outcomes naming a variant this replica was not configured with are not labelled (the label's
values stay the configured few). These are live gauges for a dashboard; the comparison with its
interval is ``streamrec ab`` (``serving.ab``), from the log.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from learner.quality import ClickQuality
from serving.metrics import ServingMetrics


class VariantQuality:
    """Per-variant observed CTR and click quality over each variant's last ``window`` outcomes.

    Parameters:
        names: the configured variants.
        metrics: where the figures go.
        window: outcomes per variant in the figures.

    >>> from serving.metrics import ServingMetrics
    >>> q = VariantQuality(["a", "b"], ServingMetrics(), window=100)
    >>> q.add(["a", "a", "b", None], np.array([0.9, 0.2, 0.5, 0.5]), np.array([1.0, 0.0, 0.0, 1.0]))
    >>> q.ctr("a"), q.ctr("b")
    (0.5, 0.0)
    """

    def __init__(self, names: Sequence[str], metrics: ServingMetrics, window: int = 2000) -> None:
        self.metrics = metrics
        self.quality = {name: ClickQuality(window) for name in names}

    def ctr(self, name: str) -> float:
        """Observed CTR of ``name``'s last outcomes (NaN before any)."""
        return self.quality[name].ctr()

    def add(self, variants: Sequence[str | None], predicted: np.ndarray, labels: np.ndarray) -> None:
        """Take in scored click outcomes: the variant each slate was served by (None outside a
        test), the served click probability and the 0/1 label, in arrival order."""
        names = np.asarray(variants, dtype=object)
        m = self.metrics
        for name, quality in self.quality.items():
            mask = names == name
            n = int(mask.sum())
            if not n:
                continue
            quality.add(predicted[mask], labels[mask])
            m.variant_outcomes.labels(name).inc(n)
            m.variant_ctr.labels(name).set(self.ctr(name))
            m.variant_logloss.labels(name).set(quality.logloss())
            m.variant_baseline_logloss.labels(name).set(quality.baseline_logloss())
            m.variant_calibration.labels(name).set(quality.calibration())
