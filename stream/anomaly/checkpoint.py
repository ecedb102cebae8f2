"""The anomaly detector's checkpoint: its learned state in a folder, with a sha256 manifest.

A worker that restarts must not start blind (cold forests and likelihoods raise no alarm for
their first scorings), so it saves the detector's learned state: both forests
(``RandomCutForest.save``, .npz without pickle), both anomaly likelihoods, the flagged users and
when each entity was last scored in each source partition. These are the worker's, one folder per
worker; the windows belong to the partitions and come back from the log instead
(``stream.anomaly.detector``).

A checkpoint is a folder: one file per part under a fresh name, each written to a temporary
file and renamed, then ``manifest.json`` (replaced atomically, so it is the commit point) naming
the files with their sha256 and the detector's settings. ``read_checkpoint`` verifies every
hash and the settings and raises on anything missing, corrupt or written with other settings;
nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream.anomaly.features import KINDS
from stream.anomaly.forest import RandomCutForest
from stream.anomaly.likelihood import AnomalyLikelihood
from stream.files import atomic_write, sha256_file

CHECKPOINT_FORMAT = "streamrec.detector/3"  # 2: likelihoods instead of thresholds; 3: scoring times per partition
MANIFEST = "manifest.json"
# Files of a checkpoint folder that its manifest does not name are removed once they are this old:
# younger ones may belong to a save in progress (in another worker, when workers share the folder).
STALE_S = 300.0


@dataclass
class DetectorSnapshot:
    """The learned state of an ``AnomalyDetector`` at one moment (``AnomalyDetector.snapshot``),
    written by ``save`` and read back by ``AnomalyDetector.load_checkpoint``."""

    params: dict[str, Any]
    forests: dict[str, RandomCutForest]
    likelihoods: dict[str, dict[str, Any]]  # kind -> AnomalyLikelihood.state()
    flagged: list[str]
    scored: dict[str, dict[int, dict[str, float]]]  # kind -> partition -> entity -> event time of its latest score

    def save(self, directory: str | os.PathLike) -> None:
        """Write the checkpoint to ``directory``: the parts under fresh names, then the manifest
        (the commit point), then remove parts no manifest needs any more."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tag = f"{time.time_ns()}-{os.getpid()}"
        names = {}
        for kind, forest in self.forests.items():
            names[f"forest-{kind}"] = name = f"forest-{kind}-{tag}.npz"
            forest.save(directory / name)
        names["state"] = f"state-{tag}.json"
        state = {"likelihoods": self.likelihoods, "flagged": self.flagged, "scored": self.scored}
        _write_json(directory / names["state"], state)
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "created": time.time(),
            "params": self.params,
            "files": {role: {"name": name, "sha256": sha256_file(directory / name)} for role, name in names.items()},
        }
        _write_json(directory / MANIFEST, manifest, indent=1)
        stale_before = time.time() - STALE_S
        for path in directory.iterdir():
            if (path.name != MANIFEST and path.name not in names.values() and path.is_file()
                    and path.stat().st_mtime < stale_before):
                path.unlink(missing_ok=True)


def _write_json(path: Path, value: Any, indent: int | None = None) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=indent, allow_nan=False)))


def read_checkpoint(directory: Path, params: dict[str, Any]) -> tuple[
        dict[str, RandomCutForest], dict[str, AnomalyLikelihood], list[str], dict[str, dict[int, dict[str, float]]]]:
    """A checkpoint's forests, likelihoods, flagged users and scoring times (kind -> partition ->
    entity), once its format, settings and hashes check out."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"format {manifest.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    saved = manifest["params"]
    differences = [f"{key} {saved.get(key)!r} there, {params.get(key)!r} here"
                   for key in sorted(saved.keys() | params.keys()) if saved.get(key) != params.get(key)]
    if differences:
        raise ValueError("written with other settings: " + ", ".join(differences))
    paths = {}
    for role in (*(f"forest-{kind}" for kind in KINDS), "state"):
        entry = manifest["files"][role]
        path = directory / entry["name"]
        if path.name != entry["name"]:
            raise ValueError(f"file name {entry['name']!r} is not a plain name")
        if sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path.name}: sha256 mismatch")
        paths[role] = path
    forests = {kind: RandomCutForest.load(paths[f"forest-{kind}"]) for kind in KINDS}
    state = json.loads(paths["state"].read_text())
    likelihoods = {kind: AnomalyLikelihood.from_state(state["likelihoods"][kind]) for kind in KINDS}
    flagged = [str(user) for user in state["flagged"]]
    scored = {kind: {int(partition): {str(key): float(ts) for key, ts in entities.items()}
                     for partition, entities in state["scored"][kind].items()} for kind in KINDS}
    return forests, likelihoods, flagged, scored
