"""The stream worker's Prometheus metrics (names are a DESIGN.md contract).

Labels are low-cardinality by construction: event types, DLQ reasons, example kinds and labels,
join outcomes. User and item ids never become labels.
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram, disable_created_metrics

# The *_created series double every counter for no use on a dashboard.
disable_created_metrics()

EVENTS = Counter("streamrec_events", "Accepted events by type.", ["type"])
DLQ = Counter("streamrec_dlq", "Messages sent to the dead-letter topic, by reason.", ["reason"])
DUPLICATES = Counter("streamrec_duplicates", "Events dropped as duplicates of an accepted event_id.")
EXAMPLES = Counter("streamrec_examples", "Training examples emitted, by kind and label.", ["kind", "label"])
UNJOINED_CLICKS = Counter(
    "streamrec_unjoined_clicks", "Valid clicks that produced no example, by reason (orphan_click, late_click, ...).",
    ["reason"],
)
ANOMALIES = Counter("streamrec_anomalies", "Anomaly records published (entities graded above zero).")
ANOMALY_SCORE = Histogram(
    "streamrec_anomaly_score", "Random Cut Forest scores of entity feature vectors.",
    buckets=(0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
SKIPPED_ANOMALOUS = Counter(
    "streamrec_examples_flagged_anomalous", "Examples marked anomalous (the learner skips them)."
)
BATCH_SECONDS = Histogram(
    "streamrec_ingest_batch_seconds", "Wall time to process one ingest batch, log and sends included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def scrape(url: str, timeout: float = 2.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Read a /metrics page into {(sample name, sorted label pairs): value}; empty if unreachable."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        body = urllib.request.urlopen(url, timeout=timeout).read().decode("utf-8")
    except OSError:
        return {}
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: dict, name: str) -> float:
    """The sum of every sample called ``name`` across its labels."""
    return sum(value for (sample, _), value in samples.items() if sample == name)
