"""The learner-to-serving contract: row deltas on ``model.updates`` and snapshots in a model store.

Both sides import this module, so the format lives in one place (documented in
``learner/PUBLISHING.md``).

A **model state** is what serving needs to score: the global mean, the rating range (``None``, or
``(low, high)`` when the learner clips rating scores to it, as serving then does) and, for users
and items, the string ids with their factor vectors and biases (``ModelRows``). Nothing here
depends on torch.

**Deltas.** Every publish interval the learner sends the rows that changed since the previous
publish, as one or more JSON messages (``parts``), keyed ``delta/<model>`` with a strictly
increasing ``seq``. Arrays travel as base64 little-endian float32. A reader applies a publish only
when it has all its parts, so it never serves a half-applied version.

**Snapshots.** Every snapshot interval the learner writes ``<store>/<model>/<version>/`` with
``rows.safetensors`` (tensors) and ``ids.json`` (the id lists), then ``manifest.json`` last (its
presence marks a complete snapshot) with the sha256 of both files, the ``seq`` of the last delta
the snapshot includes, its creation time and metrics; and it announces the manifest on
``model.updates`` keyed ``snapshot/<model>`` (the topic is compacted, so the newest survives).
Readers verify both digests before loading and refuse, with a reason (``SnapshotError``), any
snapshot that does not load whole; safetensors holds no code, so loading runs none.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from stream.files import atomic_write, sha256_file

# A reader ignores the fields it does not know, and a missing optional field has a meaning (a
# message without ``rating_range`` has no range), so adding an optional field keeps the version:
# old and new learners and replicas then interoperate during a rollout (an old replica serves
# unclipped ratings, as before). Bump it only for a change that an old reader would misread.
FORMAT_VERSION = 1
MAX_ROWS_PER_MESSAGE = 2000


# Why a snapshot was refused, in a word (a metric label): SnapshotError.reason.
SNAPSHOT_FAULTS = ("manifest", "missing_file", "io", "checksum", "tensors", "ids", "shape", "values")


class SnapshotError(ValueError):
    """A snapshot is incomplete, corrupt or not what its manifest says; the message says which, and
    ``reason`` names the kind of fault in one word (``SNAPSHOT_FAULTS``, or the reader's own)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class ModelRows:
    """Rows of one side (users or items): ids, factor vectors [n, k], rating biases [n] and click
    biases [n], float32 (see ``OnlineMF``: the two models share the vectors, not the biases)."""

    ids: list[str]
    vectors: np.ndarray
    biases: np.ndarray
    click_biases: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self.biases = np.ascontiguousarray(self.biases, dtype=np.float32)
        self.click_biases = np.ascontiguousarray(self.click_biases, dtype=np.float32)
        if (self.vectors.ndim != 2 or self.vectors.shape[0] != n or self.biases.shape != (n,)
                or self.click_biases.shape != (n,)):
            raise ValueError(f"rows do not line up: {n} ids, vectors {self.vectors.shape}, "
                             f"biases {self.biases.shape}, click biases {self.click_biases.shape}")

    @classmethod
    def empty(cls, n_factors: int) -> "ModelRows":
        return cls([], np.zeros((0, n_factors), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, start: int, stop: int) -> "ModelRows":
        return ModelRows(self.ids[start:stop], self.vectors[start:stop], self.biases[start:stop],
                         self.click_biases[start:stop])


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def _unb64(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(shape).astype(np.float32)


def _rows_json(rows: ModelRows) -> dict:
    return {"ids": rows.ids, "vectors": _b64(rows.vectors), "biases": _b64(rows.biases),
            "click_biases": _b64(rows.click_biases)}


def _range_json(rating_range: tuple[float, float] | None) -> list[float] | None:
    return None if rating_range is None else [float(rating_range[0]), float(rating_range[1])]


def _range_from_json(value: object) -> tuple[float, float] | None:
    """A ``rating_range`` field as read: None (absent or null: no range) or ``(low, high)``;
    ValueError for anything but a finite ``[low, high]`` with ``low < high``."""
    if value is None:
        return None
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and value[0] < value[1]):
        return float(value[0]), float(value[1])
    raise ValueError(f"rating_range must be null or a finite [low, high] with low < high, got {value!r}")


# ``click_calibration`` (optional): the learner's ``PositionCalibration`` state, ``{"intercepts":
# [a_1 .. a_K], "slope": b}``; absent or null means the plain sigmoid of the click logit.
Calibration = tuple[tuple[float, ...], float]


def _calibration_json(calibration: Calibration | None) -> dict | None:
    return None if calibration is None else {"intercepts": [float(a) for a in calibration[0]],
                                             "slope": float(calibration[1])}


def _calibration_from_json(value: object) -> Calibration | None:
    """A ``click_calibration`` field as read: None (absent or null) or ``(intercepts, slope)``;
    ValueError for anything but finite numbers with at least one intercept."""
    if value is None:
        return None
    if isinstance(value, dict):
        intercepts, slope = value.get("intercepts"), value.get("slope")
        numbers = intercepts + [slope] if isinstance(intercepts, list) else []
        if intercepts and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                              for v in numbers):
            return tuple(float(a) for a in intercepts), float(slope)
    raise ValueError(f"click_calibration must be null or {{'intercepts': [finite, ...], 'slope': finite}}, "
                     f"got {value!r}")


def _rows_from_json(obj: dict, n_factors: int) -> ModelRows:
    n = len(obj["ids"])
    return ModelRows(list(obj["ids"]), _unb64(obj["vectors"], (n, n_factors)), _unb64(obj["biases"], (n,)),
                     _unb64(obj["click_biases"], (n,)))


def delta_messages(
    model: str,
    seq: int,
    global_mean: float,
    click_intercept: float,
    users: ModelRows,
    items: ModelRows,
    *,
    rating_range: tuple[float, float] | None = None,
    click_calibration: Calibration | None = None,
    max_event_ts: float | None = None,
    published_ts: float | None = None,
    metrics: dict | None = None,
    max_rows: int = MAX_ROWS_PER_MESSAGE,
) -> list[tuple[str, dict]]:
    """The (key, value) messages of one publish: the changed rows split into parts of ``max_rows``.

    Every part carries the global terms (``global_mean``, ``click_intercept``, ``rating_range``,
    ``click_calibration``).
    """
    n_factors = users.vectors.shape[1] if len(users) else items.vectors.shape[1]
    published_ts = time.time() if published_ts is None else published_ts
    chunks = []
    for side, rows in (("users", users), ("items", items)):
        for start in range(0, len(rows), max_rows):
            chunks.append((side, rows.slice(start, start + max_rows)))
    chunks = chunks or [("users", users)]
    messages = []
    for part, (side, rows) in enumerate(chunks):
        empty = ModelRows.empty(n_factors)
        value = {
            "type": "delta", "format": FORMAT_VERSION, "model": model, "seq": seq,
            "version": f"{model}-{seq}", "part": part, "parts": len(chunks),
            "n_factors": int(n_factors), "global_mean": float(global_mean),
            "click_intercept": float(click_intercept), "rating_range": _range_json(rating_range),
            "click_calibration": _calibration_json(click_calibration),
            "published_ts": published_ts, "max_event_ts": max_event_ts, "metrics": metrics or {},
            "users": _rows_json(rows if side == "users" else empty),
            "items": _rows_json(rows if side == "items" else empty),
        }
        messages.append((f"delta/{model}", value))
    return messages


@dataclass
class Delta:
    """One complete publish, reassembled from its parts."""

    model: str
    seq: int
    version: str
    global_mean: float
    click_intercept: float
    users: ModelRows
    items: ModelRows
    published_ts: float
    max_event_ts: float | None
    rating_range: tuple[float, float] | None = None
    click_calibration: Calibration | None = None


class DeltaAssembler:
    """Collects the parts of each publish; yields a ``Delta`` once all of its parts arrived.

    A publish that never completes (its learner stopped between two parts) is dropped as soon as
    a later publish of the same model completes: replicas skip a ``seq`` at or below the one they
    serve, so its parts could never apply, and holding them would grow memory with every such stop.
    """

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int], dict[int, dict]] = {}

    def __len__(self) -> int:
        """Publishes held incomplete."""
        return len(self._parts)

    def add(self, value: dict) -> Delta | None:
        if value.get("type") != "delta" or value.get("format") != FORMAT_VERSION:
            raise ValueError(f"not a delta of format {FORMAT_VERSION}: type={value.get('type')!r}")
        key = (value["model"], int(value["seq"]))
        parts = self._parts.setdefault(key, {})
        parts[int(value["part"])] = value
        if len(parts) < int(value["parts"]):
            return None
        del self._parts[key]
        for earlier in [other for other in self._parts if other[0] == key[0] and other[1] < key[1]]:
            del self._parts[earlier]
        k = int(value["n_factors"])
        ordered = [parts[i] for i in range(int(value["parts"]))]
        users = [_rows_from_json(p["users"], k) for p in ordered]
        items = [_rows_from_json(p["items"], k) for p in ordered]
        return Delta(
            model=value["model"], seq=int(value["seq"]), version=value["version"],
            global_mean=float(value["global_mean"]), click_intercept=float(value["click_intercept"]),
            users=_concat(users, k), items=_concat(items, k),
            published_ts=float(value["published_ts"]), max_event_ts=value.get("max_event_ts"),
            rating_range=_range_from_json(value.get("rating_range")),
            click_calibration=_calibration_from_json(value.get("click_calibration")),
        )


def _concat(parts: list[ModelRows], k: int) -> ModelRows:
    ids = [i for p in parts for i in p.ids]
    if not ids:
        return ModelRows.empty(k)
    return ModelRows(ids, np.concatenate([p.vectors for p in parts]), np.concatenate([p.biases for p in parts]),
                     np.concatenate([p.click_biases for p in parts]))


def write_snapshot(
    store: Path, model: str, seq: int, global_mean: float, click_intercept: float,
    users: ModelRows, items: ModelRows, metrics: dict | None = None,
    rating_range: tuple[float, float] | None = None, click_calibration: Calibration | None = None,
) -> dict:
    """Write a complete snapshot atomically (folder renamed into place); return its manifest."""
    version = f"{model}-{seq}"
    final = Path(store) / model / version
    tmp = Path(store) / model / f".{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {
        "user_vectors": users.vectors, "user_biases": users.biases, "user_click_biases": users.click_biases,
        "item_vectors": items.vectors, "item_biases": items.biases, "item_click_biases": items.click_biases,
        "global": np.array([global_mean, click_intercept], dtype=np.float64),
    }
    (tmp / "rows.safetensors").write_bytes(st_save(tensors))
    (tmp / "ids.json").write_text(json.dumps({"users": users.ids, "items": items.ids}))
    manifest = {
        "type": "snapshot", "format": FORMAT_VERSION, "model": model, "version": version, "seq": seq,
        "created_ts": time.time(), "n_users": len(users), "n_items": len(items),
        "n_factors": int(users.vectors.shape[1] if len(users) else items.vectors.shape[1]),
        "rating_range": _range_json(rating_range),
        "click_calibration": _calibration_json(click_calibration),
        "files": {"rows.safetensors": sha256_file(tmp / "rows.safetensors"), "ids.json": sha256_file(tmp / "ids.json")},
        "metrics": metrics or {},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    manifest["path"] = str(final.relative_to(store))
    return manifest


def latest_snapshot(store: Path, model: str) -> Path | None:
    """The folder of the newest complete snapshot (highest seq with a manifest), or None."""
    base = Path(store) / model
    if not base.is_dir():
        return None
    found = []
    for manifest in base.glob("*/manifest.json"):
        if manifest.parent.name.startswith("."):
            continue
        try:
            found.append((int(json.loads(manifest.read_text())["seq"]), manifest.parent))
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return max(found)[1] if found else None


@dataclass
class Snapshot:
    """A verified snapshot: its manifest and the model state it holds."""

    manifest: dict
    global_mean: float
    click_intercept: float
    users: ModelRows
    items: ModelRows
    rating_range: tuple[float, float] | None = None
    click_calibration: Calibration | None = None


def read_snapshot(folder: Path) -> Snapshot:
    """Verify and load a snapshot. Any fault (an unreadable or incomplete manifest, a missing or
    unreadable file, a digest that differs, tensors that do not parse or do not line up with the
    ids, ids that are not unique strings) raises SnapshotError with its reason.

    Each file is read once, and the bytes whose digest was checked are the bytes that load; the
    digest alone is not trusted to mean the tensors parse (a snapshot truncated before its
    manifest was written has a matching digest).
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    contents = {name: _read_verified(folder, name, digest) for name, digest in manifest["files"].items()}
    try:
        tensors = st_load(contents["rows.safetensors"])
    except Exception as err:  # safetensors raises its own SafetensorError (not a ValueError)
        raise SnapshotError(f"{folder}: rows.safetensors does not parse ({err})", "tensors") from None
    missing = sorted(set(_TENSORS) - set(tensors))
    if missing:
        raise SnapshotError(f"{folder}: rows.safetensors lacks {', '.join(missing)}", "tensors")
    ids = _read_ids(folder, contents["ids.json"])
    try:
        users = ModelRows(ids["users"], tensors["user_vectors"], tensors["user_biases"], tensors["user_click_biases"])
        items = ModelRows(ids["items"], tensors["item_vectors"], tensors["item_biases"], tensors["item_click_biases"])
    except (ValueError, TypeError) as err:
        raise SnapshotError(f"{folder}: {err}", "shape") from None
    _check_shapes(folder, manifest, users, items, tensors["global"])
    global_mean, click_intercept = (float(x) for x in tensors["global"])
    try:
        rating_range = _range_from_json(manifest.get("rating_range"))
        click_calibration = _calibration_from_json(manifest.get("click_calibration"))
    except ValueError as err:
        raise SnapshotError(f"{folder}: {err}", "manifest") from None
    return Snapshot(manifest, global_mean, click_intercept, users, items, rating_range, click_calibration)


_TENSORS = ("user_vectors", "user_biases", "user_click_biases", "item_vectors", "item_biases", "item_click_biases",
            "global")


def _read_manifest(folder: Path) -> dict:
    """The manifest, its required fields checked."""
    try:
        manifest = json.loads((folder / "manifest.json").read_bytes())
    except (OSError, ValueError) as err:
        raise SnapshotError(f"{folder}: unreadable manifest ({err})", "manifest") from None
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{folder}: the manifest is not a JSON object", "manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {"rows.safetensors", "ids.json"}:
        raise SnapshotError(f"{folder}: the manifest does not list rows.safetensors and ids.json", "manifest")
    if not all(isinstance(manifest.get(name), str) for name in ("model", "version")) or \
            not isinstance(manifest.get("seq"), int) or isinstance(manifest["seq"], bool):
        raise SnapshotError(f"{folder}: the manifest lacks a model, version or integer seq", "manifest")
    return manifest


def _read_verified(folder: Path, name: str, expected: object) -> bytes:
    try:
        data = (folder / name).read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"{folder}: {name} is missing", "missing_file") from None
    except OSError as err:
        raise SnapshotError(f"{folder}: cannot read {name} ({err})", "io") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise SnapshotError(f"{folder}: sha256 of {name} is {actual[:12]}…, the manifest says "
                            f"{str(expected)[:12]}…", "checksum")
    return data


def _read_ids(folder: Path, data: bytes) -> dict[str, list[str]]:
    """``{"users": [...], "items": [...]}``: each a list of distinct non-empty strings of valid Unicode."""
    try:
        ids = json.loads(data)
    except ValueError as err:
        raise SnapshotError(f"{folder}: ids.json is not JSON ({err})", "ids") from None
    if not isinstance(ids, dict):
        raise SnapshotError(f"{folder}: ids.json is not a JSON object", "ids")
    for side in ("users", "items"):
        side_ids = ids.get(side)
        if not isinstance(side_ids, list) or not all(isinstance(i, str) and i for i in side_ids):
            raise SnapshotError(f"{folder}: the {side} of ids.json are not a list of non-empty strings", "ids")
        if len(set(side_ids)) != len(side_ids):
            raise SnapshotError(f"{folder}: the {side} of ids.json repeat an id", "ids")
        try:
            "".join(side_ids).encode("utf-8")
        except UnicodeEncodeError:
            raise SnapshotError(f"{folder}: the {side} of ids.json hold a lone surrogate", "ids") from None
    return ids


def _check_shapes(folder: Path, manifest: dict, users: ModelRows, items: ModelRows,
                  global_terms: np.ndarray) -> None:
    """Both sides share one factor count, the manifest's, and hold the rows it counts; the global
    terms are two finite numbers."""
    if users.vectors.shape[1] != items.vectors.shape[1]:
        raise SnapshotError(f"{folder}: users have {users.vectors.shape[1]} factors, items "
                            f"{items.vectors.shape[1]}", "shape")
    found = {"n_users": len(users), "n_items": len(items), "n_factors": items.vectors.shape[1]}
    for name, value in found.items():
        if name in manifest and manifest[name] != value:
            raise SnapshotError(f"{folder}: the manifest says {name} = {manifest[name]!r}, the files hold {value}",
                                "shape")
    if global_terms.shape != (2,):
        raise SnapshotError(f"{folder}: the global tensor has shape {global_terms.shape}, not (2,)", "shape")
    if not np.isfinite(global_terms).all():
        raise SnapshotError(f"{folder}: the global terms are not finite ({global_terms.tolist()})", "values")
