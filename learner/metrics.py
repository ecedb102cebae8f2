"""The learner's Prometheus metrics, defined once here (names are a DESIGN.md "Metrics" contract).

They live in the default registry that ``streamrec learner`` serves on its web port; a counter's
exposed name gains ``_total`` (``streamrec_learner_examples_total``). Labels are low-cardinality by
construction: example kinds and skip reasons, never user or item ids.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# DESIGN.md "Metrics", learner (contract), and SKIPPED: why an example was not trained on
# (anomalous, unknown_kind, invalid; malformed counts messages that are not examples)
EXAMPLES_SEEN = Counter("streamrec_learner_examples", "Examples the learner trained on.", ["kind"])
SKIPPED = Counter("streamrec_learner_skipped", "Examples the learner did not train on, by reason.", ["reason"])
RMSE = Gauge("streamrec_prequential_rmse", "RMSE of the learner's predictions made before training "
             "(sliding window; clicks: error of the calibrated click probability at the shown position).", ["kind"])
BASELINE_RMSE = Gauge("streamrec_prequential_baseline_rmse", "RMSE of the running mean (mean rating, running "
                      "CTR) on the same outcomes as streamrec_prequential_rmse.", ["kind"])
LOGLOSS = Gauge("streamrec_prequential_logloss", "Log loss of the learner's calibrated click probability at the "
                "shown position, predicted before training (sliding window).")
BASELINE_LOGLOSS = Gauge("streamrec_prequential_baseline_logloss", "Log loss of the running CTR on the same click "
                         "outcomes.")
BATCH_SECONDS = Histogram("streamrec_learner_batch_seconds", "Wall time of one training micro-batch.",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
PUBLISH_TS = Gauge("streamrec_model_publish_timestamp_seconds", "When the learner last published a delta.")
RECONNECTS = Counter("streamrec_learner_reconnects", "Times the learner replaced its consumer of `examples` "
                     "because polls returned nothing while examples were waiting (after a broker outage).")
PUBLISH_FAILURES = Counter("streamrec_learner_publish_failures", "Publishes that failed because Kafka was "
                           "unreachable (what: delta or snapshot); a delta's rows go out with the next one.", ["what"])
# Outcomes sent twice (a worker replaying a batch after a crash) and skipped: learner.outcomes
DUPLICATES = Counter("streamrec_learner_duplicates", "Examples skipped because their outcome was already trained "
                     "(same kind, event_id and item_id, within the remembered window).")
OUTCOME_KEYS = Gauge("streamrec_learner_outcome_keys", "Outcome keys the learner remembers to recognise duplicates.")
OUTCOME_KEYS_EVICTED = Counter("streamrec_learner_outcome_keys_evicted", "Outcome keys forgotten before their "
                               "retention ran out because the remembered set was full (a re-send of one would "
                               "be trained again).")
