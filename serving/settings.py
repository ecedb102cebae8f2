"""Settings of ``streamrec serve``, kept free of numpy and aiohttp so that ``--help`` answers at once."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from stream.config import env, env_float, env_int, state_dir

# How a replica finds a known user's candidates (``serving.index``): an IVF index, or every item.
RETRIEVAL_MODES = ("ivf", "exact")


@dataclass
class ServeSettings:
    """Settings of ``streamrec serve``; each field defaults to a ``STREAMREC_*`` variable."""

    bootstrap_servers: str = field(default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""))
    topic_prefix: str = field(default_factory=lambda: env("TOPIC_PREFIX", ""))
    model: str = field(default_factory=lambda: env("MODEL", "mf"))
    store_dir: Path = field(default_factory=lambda: Path(env("MODEL_STORE", str(state_dir() / "models"))))
    host: str = field(default_factory=lambda: env("SERVE_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: env_int("SERVE_PORT", 8080))
    header_timeout_s: float = field(default_factory=lambda: env_float("SERVE_HEADER_TIMEOUT_S", 10.0))
    body_timeout_s: float = field(default_factory=lambda: env_float("SERVE_BODY_TIMEOUT_S", 10.0))
    max_connections: int = field(default_factory=lambda: env_int("SERVE_MAX_CONNECTIONS", 1000))
    kind: str = field(default_factory=lambda: env("SERVE_KIND", "rating"))
    epsilon: float = field(default_factory=lambda: env_float("SERVE_EPSILON", 0.1))
    temperature: float = field(default_factory=lambda: env_float("SERVE_TEMPERATURE", 1.0))
    candidates: int = field(default_factory=lambda: env_int("SERVE_CANDIDATES", 200))
    history: int = field(default_factory=lambda: env_int("SERVE_HISTORY", 8))
    # as long as the learner's prequential window: under the ``wait`` feedback protocol a click's
    # positive arrives at once and its slate's negatives when the window closes, so a short window
    # swings with the arrival order (docs/monitoring.md)
    rmse_window: int = field(default_factory=lambda: env_int("SERVE_RMSE_WINDOW", 10_000))
    drift_window: int = field(default_factory=lambda: env_int("DRIFT_WINDOW", 1000))
    # the worker's attribution window (the same variable): a click waits for its slate's negatives
    # at most twice as long before the monitor scores it alone (learner.slate_order)
    attribution_window_s: float = field(default_factory=lambda: env_float("ATTRIBUTION_WINDOW_S", 1800.0))
    shadow_window: int = field(default_factory=lambda: env_int("SHADOW_WINDOW", 2000))
    shadow_tolerance: float = field(default_factory=lambda: env_float("SHADOW_TOLERANCE", 0.05))
    shadow_min_outcomes: int = field(default_factory=lambda: env_int("SHADOW_MIN_OUTCOMES", 100))
    seen_users: int = field(default_factory=lambda: env_int("SEEN_USERS", 100_000))
    seen_per_user: int = field(default_factory=lambda: env_int("SEEN_PER_USER", 200))
    popularity_half_life_s: float = field(default_factory=lambda: env_float("POPULARITY_HALF_LIFE_S", 3600.0))
    examples_lookback_s: float = field(default_factory=lambda: env_float("EXAMPLES_LOOKBACK_S", 3600.0))
    retrieval: str = field(default_factory=lambda: env("SERVE_RETRIEVAL", "ivf"))
    ivf_min_items: int = field(default_factory=lambda: env_int("SERVE_IVF_MIN_ITEMS", 50_000))
    ivf_probe: int = field(default_factory=lambda: env_int("SERVE_IVF_PROBE", 16))
    ivf_clusters: int = field(default_factory=lambda: env_int("SERVE_IVF_CLUSTERS", 0))
    seed: int | None = None

    def check(self) -> None:
        """Raise ValueError, naming the setting, when a value is out of its range."""
        rules = [
            (self.kind in ("rating", "click"), "kind must be rating or click"),
            (0 <= self.port <= 65535, "port must be in 0..65535"),
            (self.header_timeout_s > 0 and self.body_timeout_s > 0, "header_timeout_s and body_timeout_s must be "
                                                                     "positive"),
            (self.max_connections >= 1, "max_connections must be at least 1"),
            (0.0 <= self.epsilon <= 1.0, "epsilon must be in [0, 1]"),
            (0.01 <= self.temperature <= 100.0, "temperature must be in [0.01, 100]"),
            (self.candidates >= 1, "candidates must be at least 1"),
            (self.history >= 1, "history must be at least 1"),
            (min(self.rmse_window, self.drift_window, self.shadow_window) >= 2, "windows must hold at least 2"),
            (self.attribution_window_s > 0, "attribution_window_s must be positive"),
            (self.shadow_tolerance >= 0, "shadow_tolerance must not be negative"),
            (self.shadow_min_outcomes >= 1, "shadow_min_outcomes must be at least 1"),
            (self.seen_users >= 1 and self.seen_per_user >= 1, "seen_users and seen_per_user must be positive"),
            (self.popularity_half_life_s > 0, "popularity_half_life_s must be positive"),
            (self.examples_lookback_s >= 0, "examples_lookback_s must not be negative"),
            (self.retrieval in RETRIEVAL_MODES, f"retrieval must be one of {', '.join(RETRIEVAL_MODES)}"),
            (self.ivf_min_items >= 1 and self.ivf_probe >= 1, "ivf_min_items and ivf_probe must be positive"),
            (self.ivf_clusters >= 0, "ivf_clusters must not be negative (0: about sqrt(items))"),
        ]
        wrong = [message for ok, message in rules if not ok]
        if wrong:
            raise ValueError("; ".join(wrong))
