"""Runtime settings shared by every streamrec component.

Settings come from CLI flags, with ``STREAMREC_*`` environment variables as their defaults, so
the same code runs locally, in the tests and in a deployment. ``KAFKA_BOOTSTRAP_SERVERS`` selects
an existing cluster; when it is unset the CLI, tests and benchmarks start the local broker.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from stream.events import DEFAULT_MAX_FUTURE_S

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The datasets for tests, benchmarks and the demo live beside the checkout, never inside it.
SHARED_DATA = (PROJECT_ROOT / ".." / "shared" / "data").resolve()


def env(name: str, default: str) -> str:
    """The value of ``STREAMREC_<name>``, or ``default``."""
    return os.environ.get(f"STREAMREC_{name}", default)


def env_float(name: str, default: float) -> float:
    return float(env(name, str(default)))


def env_int(name: str, default: int) -> int:
    return int(env(name, str(default)))


def state_dir() -> Path:
    """Where local state lives (broker data, logs, model store): ``STREAMREC_HOME`` or ``.streamrec/``."""
    return Path(env("HOME", str(PROJECT_ROOT / ".streamrec")))


def log_location(value: str) -> Path | str:
    """A log root as given: an object-store URL stays a string, anything else is a local path."""
    return value if "://" in value else Path(value)


@dataclass
class StreamSettings:
    """Settings of the stream worker; every field has a ``STREAMREC_*`` variable as its default."""

    bootstrap_servers: str = field(default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""))
    partitions: int = field(default_factory=lambda: env_int("PARTITIONS", 4))
    topic_prefix: str = field(default_factory=lambda: env("TOPIC_PREFIX", ""))
    # The log's root: a local folder, or an object-store URL (s3://bucket/prefix) for workers on
    # several hosts, with the store's options (credentials, endpoint, locking) as a JSON object.
    log_dir: Path | str = field(default_factory=lambda: log_location(env("LOG_DIR", str(state_dir() / "log"))))
    log_storage_options: dict[str, str] = field(
        default_factory=lambda: json.loads(env("LOG_STORAGE_OPTIONS", "{}")))
    dedupe_window_s: float = field(default_factory=lambda: env_float("DEDUPE_WINDOW_S", 3600.0))
    attribution_window_s: float = field(default_factory=lambda: env_float("ATTRIBUTION_WINDOW_S", 30 * 60.0))
    idle_grace_s: float = field(default_factory=lambda: env_float("IDLE_GRACE_S", 2.0))
    # The feedback protocol (stream.worker.join): "wait" sends a slate's unclicked items when its
    # attribution window closes; "immediate" sends every shown item at once, a click corrects it.
    # The default learns a one-instant burst of slates, which "wait" does not (docs/learner.md).
    feedback: str = field(default_factory=lambda: env("FEEDBACK", "immediate"))
    # An event whose ts is more than this many seconds ahead of the worker's clock is dead-lettered
    # (reason ts_in_future): one such event would move the event-time watermark for good.
    max_future_s: float = field(default_factory=lambda: env_float("MAX_FUTURE_S", DEFAULT_MAX_FUTURE_S))
    # A batch closes at batch_size events or batch_timeout_s seconds.
    batch_size: int = field(default_factory=lambda: env_int("BATCH_SIZE", 5000))
    batch_timeout_s: float = field(default_factory=lambda: env_float("BATCH_TIMEOUT_S", 1.0))
    # The log collects the rows of several batches and writes them when it holds log_flush_rows
    # rows or its oldest row waited log_flush_interval_s; offsets are committed after each flush.
    log_flush_rows: int = field(default_factory=lambda: env_int("LOG_FLUSH_ROWS", 200_000))
    log_flush_interval_s: float = field(default_factory=lambda: env_float("LOG_FLUSH_INTERVAL_S", 5.0))
    # The worker compacts the log's small files (stream.log.maintenance) every
    # log_compact_interval_s seconds (0: never): the hours closed log_compact_min_age_s ago that
    # hold at least log_compact_min_files small files.
    log_compact_interval_s: float = field(default_factory=lambda: env_float("LOG_COMPACT_INTERVAL_S", 600.0))
    log_compact_min_files: int = field(default_factory=lambda: env_int("LOG_COMPACT_MIN_FILES", 10))
    log_compact_min_age_s: float = field(default_factory=lambda: env_float("LOG_COMPACT_MIN_AGE_S", 3600.0))
    # The anomaly detector's learned state is checkpointed after a log flush at most this often
    # (seconds), and at a clean stop (stream.anomaly, "Restarts").
    detector_checkpoint_interval_s: float = field(
        default_factory=lambda: env_float("DETECTOR_CHECKPOINT_INTERVAL_S", 60.0))
    # This worker's stable identity in the ingest consumer group: with one, a restarted worker
    # rejoins as the same static member (KIP-345) and consumes at once instead of waiting for the
    # killed process's session to time out. Unique per live worker (the broker fences the older
    # of two with one id), kept across restarts; empty: a dynamic member. Environment variables in
    # it are expanded, so compose can pass each container's $HOSTNAME (docs/worker.md).
    worker_id: str = field(default_factory=lambda: os.path.expandvars(env("WORKER_ID", "")))
    web_host: str = field(default_factory=lambda: env("WEB_HOST", "127.0.0.1"))
    web_port: int = field(default_factory=lambda: env_int("WORKER_WEB_PORT", 6066))

    def log_root(self, given: str | None = None) -> Path | str:
        """The log root a ``--log-dir`` flag names (``log_location``), else the configured one."""
        return log_location(given) if given else self.log_dir
