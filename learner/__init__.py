"""Online learning for streamrec: user/item embeddings learned from ``examples``, position-bias
estimation, and the ``model.updates`` format that serving reads.

The public names are imported lazily: serving imports ``learner.updates`` (the publishing format)
and must not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OnlineMF": "learner.online_mf",
    "PositionBiasEstimator": "learner.position_bias",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'learner' has no attribute {name!r}")
