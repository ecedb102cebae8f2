"""Shared output helper for the benchmarks: one JSON line on stdout, the same object on disk.

DESIGN.md (contract): every ``python -m bench.<name>`` prints one JSON object as its last line of
output and writes the same object to ``bench/results/<name>.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Self

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def emit(name: str, result: dict) -> None:
    """Print ``result`` as one JSON line and write it to ``bench/results/<name>.json``."""
    line = json.dumps(result, sort_keys=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(line + "\n", encoding="utf-8")
    print(line, flush=True)


class StolenCpu:
    """The share of this machine's CPU time that the hypervisor gave to other guests during a span
    (``steal`` in ``/proc/stat``; None where the kernel does not report it).

    The project's machines are shared virtual machines: in a noisy hour half of every core can be
    stolen, which halves what a benchmark measures. Reporting it next to the figures says in which
    conditions they were taken.

    >>> with StolenCpu() as stolen:
    ...     pass
    >>> stolen.share is None or 0.0 <= stolen.share <= 1.0
    True
    """

    def __init__(self) -> None:
        self.share: float | None = None
        self._start: tuple[int, int] | None = None

    @staticmethod
    def _counters() -> tuple[int, int] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        except OSError:
            return None
        if len(fields) < 9 or fields[0] != "cpu":
            return None
        ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks), ticks[7]

    def __enter__(self) -> Self:
        self._start = self._counters()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._counters()
        if self._start is not None and end is not None and end[0] > self._start[0]:
            self.share = round((end[1] - self._start[1]) / (end[0] - self._start[0]), 3)


def median_ci(values: list[float], seed: int = 0) -> tuple[float, list[float]]:
    """The median of ``values`` and a 95% bootstrap interval of it (2,000 resamples)."""
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(data, size=(2000, len(data))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return round(float(np.median(data)), 4), [round(float(low), 4), round(float(high), 4)]
