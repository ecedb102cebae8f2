"""Anomaly detection on the event stream, run by the worker: per-user and per-item window
features (``features``), Random Cut Forests that score them (``forest``, compiled in
``_kernels``), thresholds that turn scores into alarms (``thresholds``), the detector that runs
them (``detector``) and its checkpoint (``checkpoint``); the anomaly likelihood that calibrates
raw scores (``likelihood``) and ``score_series``, forest and likelihood over a whole series
(``series``).

``from stream.anomaly import RandomCutForest, AdaptiveThreshold, AnomalyDetector, score_series``.
"""
from stream.anomaly.checkpoint import DetectorSnapshot
from stream.anomaly.detector import AnomalyDetector
from stream.anomaly.forest import RandomCutForest
from stream.anomaly.likelihood import AnomalyLikelihood
from stream.anomaly.series import score_series
from stream.anomaly.thresholds import AdaptiveThreshold

__all__ = ["AdaptiveThreshold", "AnomalyDetector", "AnomalyLikelihood", "DetectorSnapshot",
           "RandomCutForest", "score_series"]
