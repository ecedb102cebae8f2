"""Online learning for streamrec: user/item embeddings learned from ``examples``, position-bias
estimation, and the ``model.updates`` format that serving reads.

Modules, one job each:

=====================  =============================================================================
``online_mf``          the model: state, scoring, ``learn_batch``/``predict``, save/load
``mf_steps``           its training steps (ratings in torch and compiled, clicks, items)
``mf_files``           its files on disk (safetensors plus a checksummed JSON sidecar)
``position_bias``      the examination curve per slate position, by EM on click counts
``calibration``        click probabilities at a position, calibrated on outcomes
``ids``                string ids to table rows
``updates``            the ``model.updates`` deltas and model-store snapshots (shared with serving)
``metrics``            the learner's Prometheus metrics (DESIGN.md names)
``settings``,          the ``streamrec learner`` process: settings, loop, command line
``service``, ``cli``
=====================  =============================================================================

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
