"""Shared output helper for the benchmarks: one JSON line on stdout, the same object on disk.

DESIGN.md (contract): every ``python -m bench.<name>`` prints one JSON object as its last line of
output and writes the same object to ``bench/results/<name>.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def emit(name: str, result: dict) -> None:
    """Print ``result`` as one JSON line and write it to ``bench/results/<name>.json``."""
    line = json.dumps(result, sort_keys=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(line + "\n", encoding="utf-8")
    print(line, flush=True)
