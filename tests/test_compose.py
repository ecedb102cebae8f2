"""The Docker stack parses and names only images, files and commands that exist."""
from __future__ import annotations

from pathlib import Path

import yaml

from stream.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose" / "docker-compose.yml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_kafka_service_is_the_official_kraft_image_of_our_version():
    """The broker in compose is the official Apache Kafka image, same 3.9 line as the local broker."""
    kafka = _compose()["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:3.9.")
    pom = (ROOT / "compose" / "kafka" / "pom.xml").read_text()
    assert f"<kafka.version>{kafka['image'].split(':')[1]}</kafka.version>" in pom
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_builds_point_at_existing_dockerfiles_and_valid_commands():
    """Every build names a Dockerfile in the repo; every streamrec command parses with our CLI."""
    services = _compose()["services"]
    parser = build_parser()
    for name, service in services.items():
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        command = service.get("command")
        if command and command[0] == "streamrec":
            parser.parse_args(command[1:])


def test_published_ports_bind_to_loopback():
    """Nothing in the stack is published beyond 127.0.0.1 by default."""
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
