"""Read a Prometheus /metrics page into numbers, for the demo, the benchmarks and the tests.

A plain text reader (``prometheus_client``'s parser over HTTP) that any component's page goes
through; the metric definitions themselves live with their component (``stream.worker.metrics``).
"""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 2.0) -> Samples:
    """Read a /metrics page into {(sample name, sorted label pairs): value}; empty if unreachable."""
    try:
        body = urllib.request.urlopen(url, timeout=timeout).read().decode("utf-8")
    except OSError:
        return {}
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: Samples, name: str) -> float:
    """The sum of every sample called ``name`` across its labels."""
    return sum(value for (sample, _), value in samples.items() if sample == name)
