"""The stream worker's Prometheus metrics, defined once here (names are a DESIGN.md contract).

Labels are low-cardinality by construction: event types, DLQ reasons, example kinds and labels,
join outcomes. User and item ids never become labels. Reading a /metrics page back into numbers
is ``stream.tools.scrape``.
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

LOG_COMMIT_SECONDS = Histogram(
    "streamrec_log_commit_seconds", "Wall time of one log flush: writing its data files and committing them.",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
)
LOG_WRITE_ERRORS = Counter(
    "streamrec_log_write_errors", "Log flushes that failed and were retried (storage refused or failed a write).",
)
SEND_ERRORS = Counter(
    "streamrec_send_errors", "Sends of a batch's output that failed and were retried (Kafka unreachable).",
)
