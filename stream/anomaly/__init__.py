"""Anomaly detection on the event stream, run by the worker: per-user and per-item window
features, Random Cut Forests that score them, and thresholds that turn scores into alarms.

``from stream.anomaly import RandomCutForest, AdaptiveThreshold, AnomalyDetector``.
"""
from stream.anomaly.detector import AnomalyDetector, DetectorSnapshot
from stream.anomaly.forest import RandomCutForest
from stream.anomaly.thresholds import AdaptiveThreshold

__all__ = ["AdaptiveThreshold", "AnomalyDetector", "DetectorSnapshot", "RandomCutForest"]
