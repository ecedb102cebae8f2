"""The learner's checkpoints, written whole or not at all: the model, the learner's state (JSON),
the remembered outcome keys and the rows held in the waiting window, in ``ckpt-<n>/``, with
``LATEST`` switched by rename once the folder is complete. Nothing is unpickled on load."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from learner.online_mf import OnlineMF


class Checkpointer:
    """Atomic checkpoints: ``ckpt-<n>/`` written whole, then ``LATEST`` switched by rename."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def latest(self) -> Path | None:
        pointer = self.folder / "LATEST"
        if not pointer.is_file():
            return None
        path = self.folder / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, model: OnlineMF, state: dict, outcomes: dict[str, np.ndarray], waiting: pa.Table | None = None
             ) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        previous = self.latest()
        n = int(previous.name.split("-")[1]) + 1 if previous else 1
        target = self.folder / f"ckpt-{n:08d}"
        tmp = self.folder / f".ckpt-{n:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(tmp / "model")
        (tmp / "learner.json").write_text(json.dumps(state))
        np.savez(tmp / "outcomes.npz", **outcomes)
        if waiting is not None and waiting.num_rows:
            with pa.OSFile(str(tmp / "waiting.arrow"), "wb") as sink, pa.ipc.new_file(sink, waiting.schema) as writer:
                writer.write_table(waiting)
        os.replace(tmp, target)
        pointer_tmp = self.folder / "LATEST.tmp"
        pointer_tmp.write_text(target.name)
        os.replace(pointer_tmp, self.folder / "LATEST")
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return target

    def load(self) -> tuple[OnlineMF, dict, dict[str, np.ndarray], pa.Table | None] | None:
        """The model, the learner's state, the outcome keys (empty in a checkpoint from before
        they were saved) and the rows in the waiting window (None when it held none) of the latest
        checkpoint; None when there is none."""
        path = self.latest()
        if path is None:
            return None
        outcomes: dict[str, np.ndarray] = {}
        if (path / "outcomes.npz").is_file():
            with np.load(path / "outcomes.npz", allow_pickle=False) as arrays:
                outcomes = dict(arrays)
        waiting = None
        if (path / "waiting.arrow").is_file():
            with pa.memory_map(str(path / "waiting.arrow")) as source:
                waiting = pa.ipc.open_file(source).read_all()
        return OnlineMF.load(path / "model"), json.loads((path / "learner.json").read_text()), outcomes, waiting
