"""What every ``streamrec`` subcommand shares: the Kafka flags, the choice of cluster, logging."""
from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("streamrec")


def setup_logging(verbose: bool) -> None:
    """INFO (DEBUG with ``verbose``) to stderr, with the Kafka clients' chatter turned down."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python's IO thread warns whenever the GIL held it past 100 ms: noise on a busy 2-core box.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


def resolve_bootstrap(explicit: str | None) -> str:
    """The cluster to use: the flag, else KAFKA_BOOTSTRAP_SERVERS, else the local broker (started if needed)."""
    if explicit:
        return explicit
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    from stream.tools import kafka_local

    broker = kafka_local.start()
    log.info("using the local Kafka broker at %s (stop it with 'streamrec kafka stop')", broker.bootstrap_servers)
    return broker.bootstrap_servers


def add_kafka_flags(p: argparse.ArgumentParser) -> None:
    """``--bootstrap-servers`` and ``--topic-prefix``."""
    p.add_argument("--bootstrap-servers", default=None,
                   help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS, else the local broker)")
    p.add_argument("--topic-prefix", default=os.environ.get("STREAMREC_TOPIC_PREFIX", ""),
                   help="namespace prefix for every topic name (default: none, i.e. DESIGN.md's names)")
