"""Online learning for streamrec: embeddings, position-bias estimation and anomaly scoring.

The public names are imported lazily so that ``import learner`` (the stream worker needs only the
forest) does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OnlineMF": "learner.online_mf",
    "PositionBiasEstimator": "learner.position_bias",
    "RandomCutForest": "learner.rcf",
    "AdaptiveThreshold": "learner.thresholds",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'learner' has no attribute {name!r}")
