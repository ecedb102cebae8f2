"""Settings of ``streamrec learner``, kept free of torch so that ``--help`` answers at once."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from stream.config import StreamSettings, env, env_float, env_int, state_dir

# Seconds beyond the worker's attribution window that outcome keys are remembered (docs/learner.md,
# "Outcomes trained once"): how far the stream may move on before a crashed worker re-sends.
OUTCOME_MARGIN_S = 600.0


def parse_rating_range(text: str) -> tuple[float, float] | None:
    """``"low,high"`` as a pair of finite floats with low < high; None for an empty string
    (ratings are unbounded). Raises ``ValueError`` saying what is wrong."""
    if not text.strip():
        return None
    parts = text.split(",")
    try:
        low, high = (float(v) for v in parts)
    except ValueError:
        raise ValueError(f"rating range {text!r}: expected 'low,high', two numbers such as '1,5'") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"rating range {text!r}: expected finite numbers with low < high")
    return low, high


@dataclass
class LearnerSettings:
    """Settings of ``streamrec learner``; each field defaults to a ``STREAMREC_*`` variable."""

    bootstrap_servers: str = field(default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""))
    topic_prefix: str = field(default_factory=lambda: env("TOPIC_PREFIX", ""))
    model: str = field(default_factory=lambda: env("MODEL", "mf"))
    n_factors: int = field(default_factory=lambda: env_int("N_FACTORS", 32))
    # of a new model (a resumed one keeps its own): rating scores are clipped to it, here and in serving
    rating_range: tuple[float, float] | None = field(default_factory=lambda: parse_rating_range(env("RATING_RANGE", "")))
    device: str = field(default_factory=lambda: env("DEVICE", "auto"))
    batch_size: int = field(default_factory=lambda: env_int("LEARNER_BATCH_SIZE", 1024))
    batch_timeout_s: float = field(default_factory=lambda: env_float("LEARNER_BATCH_TIMEOUT_S", 0.2))
    publish_interval_s: float = field(default_factory=lambda: env_float("PUBLISH_INTERVAL_S", 1.0))
    snapshot_interval_s: float = field(default_factory=lambda: env_float("SNAPSHOT_INTERVAL_S", 60.0))
    checkpoint_interval_s: float = field(default_factory=lambda: env_float("CHECKPOINT_INTERVAL_S", 10.0))
    store_dir: Path = field(default_factory=lambda: Path(env("MODEL_STORE", str(state_dir() / "models"))))
    checkpoint_dir: Path = field(default_factory=lambda: Path(env("CHECKPOINT_DIR", str(state_dir() / "learner"))))
    rmse_window: int = field(default_factory=lambda: env_int("RMSE_WINDOW", 10_000))
    # The worker's attribution window: under its ``immediate`` feedback protocol a shown item's
    # label is final this long after its slate (learner.feedback).
    attribution_window_s: float = field(default_factory=lambda: StreamSettings().attribution_window_s)
    # Under ``immediate``: a shown item waits this quantile of the recent click delays (at most the
    # attribution window) before it trains, so that a click arriving meanwhile trains with it as its
    # label (learner.feedback, the waiting window); 0 trains every provisional negative at once.
    feedback_wait_quantile: float = field(default_factory=lambda: env_float("FEEDBACK_WAIT_QUANTILE", 0.9))
    # Outcome keys (learner.outcomes): seconds of event time each is remembered (None: the
    # attribution window + OUTCOME_MARGIN_S), and the most kept
    outcome_window_s: float | None = field(
        default_factory=lambda: float(value) if (value := env("OUTCOME_WINDOW_S", "")) else None)
    outcome_keys_max: int = field(default_factory=lambda: env_int("OUTCOME_KEYS_MAX", 4_000_000))
    web_host: str = field(default_factory=lambda: env("WEB_HOST", "127.0.0.1"))
    web_port: int = field(default_factory=lambda: env_int("LEARNER_WEB_PORT", 6067))

    @property
    def outcome_retention_s(self) -> float:
        """Seconds of event time an outcome key is remembered (``outcome_window_s`` or its default)."""
        if self.outcome_window_s is not None:
            return self.outcome_window_s
        return self.attribution_window_s + OUTCOME_MARGIN_S
