"""The files of a saved :class:`learner.online_mf.OnlineMF`: tensors in safetensors, the rest in JSON.

A model folder holds ``model.safetensors`` (every tensor, by name) and ``model.json`` (format
version, hyperparameters, id maps, counters, generator state, and the sha256 of the tensors file).
Each is replaced atomically, the JSON last, so a reader never pairs a sidecar with tensors it does
not describe; :func:`read_model` refuses a folder whose tensors do not match the recorded digest or
whose format it does not know. safetensors holds no code, so loading runs none (never a pickle).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stream.files import atomic_write, sha256_file

# 3: no seen_pairs tensor; 2: bias split into level and decaying part, implicit feedback tables
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
_RETIRED_TENSORS = ("seen_pairs",)  # written by format 2, read by nothing since


def write_model(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` (on CPU, contiguous) and ``meta`` (JSON-able) to the folder ``path``;
    the format version goes first into the JSON and the tensors' sha256 last."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / WEIGHTS_FILE
    atomic_write(weights_path, lambda tmp: save_file(tensors, tmp))
    meta = {"format_version": FORMAT_VERSION, **meta, "weights_sha256": sha256_file(weights_path)}
    atomic_write(folder / META_FILE,
                 lambda tmp: Path(tmp).write_text(json.dumps(meta), encoding="utf-8"))


def read_model(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (on CPU) and metadata written by :func:`write_model`, after checking the format
    version and the tensors' sha256; raises ValueError when either does not match."""
    folder = Path(path)
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"format_version must be one of {READABLE_VERSIONS}, got {version!r}")
    weights_path = folder / WEIGHTS_FILE
    digest = sha256_file(weights_path)
    if digest != meta["weights_sha256"]:
        raise ValueError(f"sha256 of {weights_path} must be {meta['weights_sha256']} "
                         f"(as recorded in {META_FILE}), got {digest!r}")
    tensors = load_file(weights_path)
    for name in _RETIRED_TENSORS:
        tensors.pop(name, None)
    return tensors, meta
