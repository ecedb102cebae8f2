"""One entry point for a whole series: ``score_series(values) -> anomaly likelihoods``.

A fresh Random Cut Forest scores the series point by point, and the anomaly likelihood layer
(``stream.anomaly.likelihood``) turns its raw scores into a causal likelihood in [0, 1]. The
benchmark ``bench/rcf.py`` scores NAB through it, and so does any outside evaluation; the
defaults are the ones the stream worker is to use. Measurements behind them:
docs/anomaly-nab.md.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from stream.anomaly.forest import RandomCutForest
from stream.anomaly.likelihood import AnomalyLikelihood

Inputs = Literal["values", "differences", "both"]


def forest_inputs(values: np.ndarray, inputs: Inputs = "values") -> np.ndarray:
    """What the forest is fed: the values, their first differences (the first one 0), or both
    side by side (columns: every value column, then every difference column)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2):
        raise ValueError(f"values must have shape (n,) or (n, d), got shape {x.shape}")
    if inputs == "values":
        return x
    differences = np.diff(x, axis=0, prepend=x[:1]) if len(x) else x
    if inputs == "differences":
        return differences
    if inputs == "both":
        return np.column_stack([x, differences])
    raise ValueError(f"inputs must be 'values', 'differences' or 'both', got {inputs!r}")


def score_series(values: np.ndarray, *, num_trees: int = 50, sample_size: int = 256,
                 shingle_size: int = 2, time_decay: float | None = 1e-5,
                 inputs: Inputs = "values", seed: int = 0, log: bool = True,
                 **likelihood_settings: float | int | bool) -> np.ndarray:
    """Causal anomaly likelihood of every point of a series, in [0, 1].

    Point t's value depends on points 0..t only: the forest scores each shingle before learning
    it, and the likelihood of a score is computed before the score joins the statistics. With
    ``log=True`` (the default) the likelihood is on NAB's log scale (0.5 for a likelihood of
    0.99999, the Numenta detector's scale, on which thresholds are set); ``log=False`` returns
    the likelihood itself.

    Parameters
    ----------
    values
        The series, shape (n,), or (n, d) for a vector series.
    num_trees, sample_size, shingle_size, time_decay, seed
        The forest's settings (``RandomCutForest``); ``time_decay=1e-5`` keeps the sample
        spread over roughly the last 100,000 points, as in AWS's benchmark run on NAB.
    inputs
        What the forest is fed (``forest_inputs``).
    log
        Log scale (True) or plain likelihood (False).
    likelihood_settings
        Keyword arguments of ``AnomalyLikelihood`` (e.g. ``short_window``, ``min_std``); its
        ``learning_period`` defaults to the forest's ``sample_size``, the points it needs to
        fill its sample.

    Examples
    --------
    >>> import numpy as np
    >>> from stream.anomaly import score_series
    >>> t = np.arange(4000)
    >>> series = np.sin(2 * np.pi * t / 100) + np.random.default_rng(0).normal(0, 0.05, t.size)
    >>> series[3000] += 3.0
    >>> likelihood = score_series(series)
    >>> int(np.argmax(likelihood)) in range(3000, 3002), bool(likelihood.max() > 0.5)
    (True, True)
    """
    x = forest_inputs(values, inputs)
    forest = RandomCutForest(num_trees, sample_size, shingle_size, time_decay, seed)
    likelihood_settings.setdefault("learning_period", sample_size)
    layer = AnomalyLikelihood(**likelihood_settings)
    return layer.update(forest.score_update(x), log=log)
