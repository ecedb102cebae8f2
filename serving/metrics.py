"""The serving replica's Prometheus metrics, in a registry of its own.

Each ``ServingMetrics`` owns a ``CollectorRegistry``, so several servers can live in one process
(the tests run many). The DESIGN.md names (contract) come first; the counters after them say why
a snapshot, a delta or an example was not used. Labels are low-cardinality by construction:
routes, kinds, signals, result codes, the one live model version, and the A/B variants of the
replica's configuration (at most ``serving.variants.MAX_VARIANTS``; outcomes naming any other
variant are not labelled).

The per-variant figures are families of their own (``streamrec_variant_*{variant}``) beside the
all-traffic ones, so that the all-traffic series, the alert rules and the dashboards built on them
keep their labels whether or not an A/B test runs.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from serving.drift import ALPHA

# The *_created series double every counter for no use on a dashboard.
disable_created_metrics()

# What the model cannot change: these may alarm. What it changes itself (the feedback loop: it
# picks the items shown, so their popularity, its scores and the labels move whenever it learns):
# statistics only. Quality: Page-Hinkley on the served model's per-outcome loss. docs/monitoring.md
EXOGENOUS_SIGNALS = ("user_activity", "new_users", "new_items")
ENDOGENOUS_SIGNALS = ("score", "item_popularity", "label_rate")
DRIFT_SIGNALS = EXOGENOUS_SIGNALS + ENDOGENOUS_SIGNALS
LOSS_SIGNALS = ("loss_click", "loss_rating")
ROUTES = ("recommendations", "predict", "healthz", "readyz", "metrics", "unmatched")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class ServingMetrics:
    """Every metric of one serving replica."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # -- DESIGN.md "Metrics", serving (contract) --
        self.served_rmse = Gauge("streamrec_served_rmse", "RMSE of the served predictions on the outcomes of "
                                 "`examples`, over a sliding window (clicks: error of the click probability).",
                                 ["kind"], registry=r)
        self.served_baseline_rmse = Gauge("streamrec_served_baseline_rmse", "RMSE of the running mean (mean "
                                          "rating, running CTR) on the same outcomes as streamrec_served_rmse.",
                                          ["kind"], registry=r)
        self.served_logloss = Gauge("streamrec_served_logloss", "Log loss of the served click probability at the "
                                    "shown position (sliding window).", registry=r)
        self.served_baseline_logloss = Gauge("streamrec_served_baseline_logloss", "Log loss of the running CTR on "
                                             "the same click outcomes.", registry=r)
        self.served_auc = Gauge("streamrec_served_auc", "ROC AUC of the served click probability (sliding window).",
                                registry=r)
        self.served_calibration = Gauge("streamrec_served_calibration", "Mean served click probability / observed "
                                        "CTR (sliding window; 1 is calibrated).", registry=r)
        self.drift_alarm = Gauge("streamrec_drift_alarm", "1 while a drift signal alarms: an exogenous signal's "
                                 "PSI above its false-alarm threshold, or Page-Hinkley on the served model's "
                                 "errors (loss_click: calibration error p - y; loss_rating: squared error in "
                                 "excess of the mean rating's).", ["signal"], registry=r)
        self.drift_alarms = Counter("streamrec_drift_alarms", "Drift alarms raised: each Page-Hinkley alarm, and "
                                    "each time an exogenous signal's PSI turns from below its threshold to above "
                                    "(streamrec_drift_alarm may be up for less than a scrape interval).", ["signal"],
                                    registry=r)
        self.drift_threshold = Gauge("streamrec_drift_psi_threshold", "The PSI above which an exogenous signal "
                                     f"alarms (false-alarm probability {ALPHA:g} per comparison of independent draws).",
                                     ["signal"], registry=r)
        self.concept_drift = Gauge("streamrec_concept_drift_statistic", "Page-Hinkley statistic on the served "
                                   "model's per-outcome loss (alarm above its threshold).", ["signal"], registry=r)
        self.drift_psi = Gauge("streamrec_drift_psi", "Population stability index, reference window vs current "
                               "window.", ["signal"], registry=r)
        self.drift_ks = Gauge("streamrec_drift_ks", "Kolmogorov-Smirnov statistic, reference window vs current "
                              "window.", ["signal"], registry=r)
        self.model_info = Gauge("streamrec_model_info", "The model version being served (value 1).", ["version"],
                                registry=r)
        self.model_age = Gauge("streamrec_model_age_seconds", "Seconds since the learner produced the served "
                               "model state.", registry=r)
        self.freshness = Histogram("streamrec_freshness_seconds", "From the newest event a delta learned from to "
                                   "the delta being served.", buckets=_FRESHNESS_BUCKETS, registry=r)
        self.request_seconds = Histogram("streamrec_request_seconds", "HTTP request latency by route.", ["route"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        # -- serving's own counters --
        self.requests = Counter("streamrec_serving_requests", "HTTP responses by route and status class.",
                                ["route", "status"], registry=r)
        self.fallbacks = Counter("streamrec_serving_fallbacks", "Recommendations answered by the popularity "
                                 "fallback (unknown users).", registry=r)
        self.snapshots = Counter("streamrec_serving_snapshots", "Snapshots considered, by result (loaded, corrupt, "
                                 "shadow_refused, stale).", ["result"], registry=r)
        self.deltas = Counter("streamrec_serving_deltas", "Delta publishes considered, by result (applied, "
                              "skipped, invalid, refused).", ["result"], registry=r)
        self.snapshot_refusals = Counter("streamrec_serving_snapshot_refusals", "Snapshots refused as unusable, by "
                                         "reason: manifest, missing_file, io, checksum, tensors, ids, shape, values "
                                         "(learner.updates.SNAPSHOT_FAULTS), announcement (not the announced files, "
                                         "outside the store, unreadable), unexpected (a failure building the "
                                         "model; logged with its traceback).", ["reason"], registry=r)
        self.shadow_refusals = Counter("streamrec_serving_shadow_refusals", "Candidate snapshots the shadow check "
                                       "refused, by reason: rmse (predicts recent outcomes worse than the live "
                                       "model), ctr (estimated CTR on the logged slates, lower end of its 95% "
                                       "interval, below the live model's by more than the tolerance).", ["reason"],
                                       registry=r)
        self.delta_gaps = Counter("streamrec_serving_delta_gaps", "Times the next delta's seq was not the one "
                                  "after the served one (some deltas were never seen).", registry=r)
        self.examples = Counter("streamrec_serving_examples", "Outcomes read from `examples`, by how the version "
                                "that scored them was found (served_version, event_time, arrival) or why they "
                                "were not scored (anomalous, invalid, no_model).", ["result"], registry=r)
        self.client_aborts = Counter("streamrec_serving_client_aborts", "Requests whose client left before the "
                                     "answer (mid-body, or while it was computed); not in the responses counted "
                                     "by status.", ["route"], registry=r)
        self.connections = Gauge("streamrec_serving_connections", "Open HTTP connections (admitted under the cap).",
                                 registry=r)
        self.variant_requests = Counter("streamrec_variant_requests", "Recommendations answered, by A/B variant "
                                        "(only with --variant).", ["variant"], registry=r)
        self.variant_outcomes = Counter("streamrec_variant_outcomes", "Click outcomes of slates served by each A/B "
                                        "variant, scored by the monitor.", ["variant"], registry=r)
        self.variant_ctr = Gauge("streamrec_variant_served_ctr", "Observed CTR (clicks per shown item) of each A/B "
                                 "variant's slates over its last outcomes on `examples` (positives arrive at "
                                 "the click, negatives when the attribution window closes: `streamrec ab` "
                                 "compares variants from the log, with intervals).", ["variant"], registry=r)
        self.variant_logloss = Gauge("streamrec_variant_served_logloss", "streamrec_served_logloss on the outcomes "
                                     "of each A/B variant's slates.", ["variant"], registry=r)
        self.variant_baseline_logloss = Gauge("streamrec_variant_served_baseline_logloss", "Log loss of the variant's "
                                              "running CTR on the same outcomes.", ["variant"], registry=r)
        self.variant_calibration = Gauge("streamrec_variant_served_calibration", "streamrec_served_calibration on "
                                         "the outcomes of each A/B variant's slates.", ["variant"], registry=r)
        self.connections_refused = Counter("streamrec_serving_connections_refused", "HTTP connections answered 503 "
                                           "and closed because the replica held its cap of open connections.",
                                           registry=r)
        for signal in DRIFT_SIGNALS:
            self.drift_psi.labels(signal).set(float("nan"))
            self.drift_ks.labels(signal).set(float("nan"))
        for signal in EXOGENOUS_SIGNALS + LOSS_SIGNALS:
            self.drift_alarm.labels(signal).set(0)
            self.drift_alarms.labels(signal)
        for signal in EXOGENOUS_SIGNALS:
            self.drift_threshold.labels(signal).set(float("nan"))
        for signal in LOSS_SIGNALS:
            self.concept_drift.labels(signal).set(0)
        for kind in ("rating", "click"):
            self.served_rmse.labels(kind).set(float("nan"))
            self.served_baseline_rmse.labels(kind).set(float("nan"))
        for gauge in (self.served_logloss, self.served_baseline_logloss, self.served_auc, self.served_calibration):
            gauge.set(float("nan"))
        for route in ROUTES:
            self.request_seconds.labels(route)

    def track_variants(self, names: list[str]) -> None:
        """Start the series of the configured A/B variants (0 requests, NaN figures)."""
        for name in names:
            self.variant_requests.labels(name)
            self.variant_outcomes.labels(name)
            for gauge in (self.variant_ctr, self.variant_logloss, self.variant_baseline_logloss,
                          self.variant_calibration):
                gauge.labels(name).set(float("nan"))

    def track_model(self, published_ts: Callable[[], float | None]) -> None:
        """Compute the model age at every scrape from the live model's publish time."""
        def age() -> float:
            ts = published_ts()
            return float("nan") if ts is None else max(0.0, time.time() - ts)
        self.model_age.set_function(age)

    def set_version(self, version: str) -> None:
        """Make ``version`` the one ``streamrec_model_info`` reports."""
        self.model_info.clear()
        self.model_info.labels(version).set(1)
