"""The Docker stack parses and names only images, files, ports and commands that exist.

No Docker engine is needed: these read compose/ as data. What they guard against is the drift
that only shows when someone runs `docker compose up`: a renamed CLI flag, a moved provisioning
file, an unpinned image, a port published on every interface.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from stream.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
COMPOSE_GPU = COMPOSE_DIR / "docker-compose.gpu.yml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
PROMETHEUS = COMPOSE_DIR / "prometheus" / "prometheus.yml"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "streamrec.json"

# Third-party images the stack may name, and why each is trusted. Anything else must be built here.
TRUSTED_IMAGES = {
    "apache/kafka": "the Apache Kafka project's official image",
    "prom/prometheus": "the Prometheus project's official image",
    "grafana/grafana": "Grafana Labs' official image",
    "danielqsj/kafka-exporter": "the kafka_exporter author's image; the usual source of consumer-group lag",
    "python": "Docker Official Image (base of compose/Dockerfile)",
}
PINNED_TAG = re.compile(r"^v?\d+(\.\d+)+(-[a-z0-9.]+)*$")  # 3.9.1, v3.5.0, 3.11-slim-bookworm
SCALED = ("worker", "serving")  # services meant for --scale


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _compose() -> dict:
    return _load(COMPOSE)


def _services() -> dict:
    return _compose()["services"]


def _streamrec_commands() -> dict[str, list[str]]:
    return {name: svc["command"] for name, svc in _services().items()
            if isinstance(svc.get("command"), list) and svc["command"][:1] == ["streamrec"]}


def _binds(service: dict) -> list[tuple[Path, PurePosixPath]]:
    """(repository path, container path) of each bind mount: short syntax whose source is a path."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2] if isinstance(volume, str) else (volume["source"], volume["target"])
        if source.startswith((".", "/")):
            out.append(((COMPOSE_DIR / source).resolve(), PurePosixPath(target)))
    return out


def _in_repo(service: dict, container_path: str) -> Path | None:
    """The repository file that ``container_path`` is inside ``service``, through its bind mounts."""
    path = PurePosixPath(container_path)
    for source, target in _binds(service):
        if path == target or target in path.parents:
            return source / path.relative_to(target)
    return None


# -- parsing ----------------------------------------------------------------------------------------

def test_every_config_file_parses():
    """YAML and JSON under compose/ load; the compose file has the services the stack is made of."""
    for path in sorted(COMPOSE_DIR.rglob("*.yml")):
        assert isinstance(_load(path), dict), path
    json.loads(DASHBOARD.read_text())
    assert {"kafka", "topics", "worker", "learner", "serving", "kafka-exporter", "prometheus",
            "grafana"} <= set(_services())


def _docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    pytest.skip("the Docker Compose plugin is not installed; compose/ is checked as YAML only")


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "gpu"])
def test_docker_compose_accepts_the_stack(files: list[Path]):
    """Where Docker Compose is installed, its own loader validates the files (no daemon needed)."""
    command = _docker_compose() + [arg for f in files for arg in ("-f", str(f))] + ["config", "--quiet"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_kafka_service_is_the_official_kraft_image_of_our_version():
    """The broker in compose is the official Apache Kafka image, same 3.9 line as the local broker."""
    kafka = _services()["kafka"]
    assert kafka["image"].startswith("apache/kafka:3.9.")
    pom = (COMPOSE_DIR / "kafka" / "pom.xml").read_text()
    assert f"<kafka.version>{kafka['image'].split(':')[1]}</kafka.version>" in pom
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


# -- images -----------------------------------------------------------------------------------------

def _check_image(ref: str, where: str) -> None:
    repo, _, tag = ref.partition(":")
    assert "@" not in repo and repo in TRUSTED_IMAGES, f"{where}: {ref} is not an image the stack trusts"
    assert PINNED_TAG.match(tag), f"{where}: {ref} must be pinned to a version tag (not '{tag or 'latest'}')"


def test_images_are_trusted_and_pinned():
    """Each service builds our image or names a trusted image at a version tag; so does FROM."""
    for name, service in _services().items():
        if "build" in service:
            assert service.get("image", "streamrec").startswith("streamrec"), name
        else:
            _check_image(service["image"], name)
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert froms, "compose/Dockerfile has no FROM"
    for ref in froms:
        _check_image(ref, "compose/Dockerfile")


def test_builds_point_at_the_dockerfile_and_copy_what_exists():
    """Every build names compose/Dockerfile; every COPY source exists and its ignore file lets it in."""
    for name, service in {**_services(), **_load(COMPOSE_GPU)["services"]}.items():
        build = service.get("build")
        if build and "dockerfile" in build:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert context == ROOT and (context / build["dockerfile"]) == DOCKERFILE, name
    ignore = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().split()
    for line in re.findall(r"^COPY\s+(.+)$", DOCKERFILE.read_text(), flags=re.MULTILINE):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert f"!{source.rstrip('/')}" in ignore, f"COPY {source}: excluded by Dockerfile.dockerignore"


# -- files ------------------------------------------------------------------------------------------

def test_bind_mounts_name_files_in_the_repository():
    """Every bind-mount source exists (a typo would make Docker create an empty folder instead)."""
    for name, service in _services().items():
        for source, target in _binds(service):
            assert source.exists(), f"{name}: {source.relative_to(ROOT)} -> {target} does not exist"
            assert ROOT in source.parents, f"{name}: {source} is outside the repository"


def test_prometheus_reads_its_config_and_rules_from_the_repository():
    """prometheus.yml and each rule file it names reach the container's /etc/prometheus."""
    prometheus = _services()["prometheus"]
    assert _in_repo(prometheus, "/etc/prometheus/prometheus.yml") == PROMETHEUS
    for rule_file in _load(PROMETHEUS).get("rule_files", []):
        in_repo = _in_repo(prometheus, str(PurePosixPath("/etc/prometheus") / rule_file))
        assert in_repo is not None and in_repo.is_file(), f"rule file {rule_file} is not mounted from the repo"
        assert _load(in_repo)["groups"], in_repo


def test_grafana_provisioning_resolves_to_repository_files():
    """The datasource and dashboard provider are provisioned, and the provider's folder holds the dashboard."""
    grafana = _services()["grafana"]
    provisioning = _in_repo(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and provisioning.is_dir()
    datasources = _load(provisioning / "datasources" / "prometheus.yml")["datasources"]
    uids = {d["uid"] for d in datasources}
    assert any(d["type"] == "prometheus" and d["url"] == "http://prometheus:9090" for d in datasources)
    providers = _load(provisioning / "dashboards" / "streamrec.yml")["providers"]
    for provider in providers:
        folder = _in_repo(grafana, provider["options"]["path"])
        assert folder is not None and any(folder.glob("*.json")), provider
    home = _in_repo(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == DASHBOARD
    # Every panel and query asks the provisioned datasource, by its fixed uid.
    def datasources_used(node):
        if isinstance(node, dict):
            if "datasource" in node:
                yield node["datasource"]
            for value in node.values():
                yield from datasources_used(value)
        elif isinstance(node, list):
            for value in node:
                yield from datasources_used(value)
    used = list(datasources_used(json.loads(DASHBOARD.read_text())))
    assert used and all(d["uid"] in uids for d in used)


# -- ports, scaling, wiring -------------------------------------------------------------------------

def test_published_ports_bind_to_loopback():
    """Nothing in the stack is published beyond 127.0.0.1."""
    for name, service in _services().items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)


def test_scaled_services_can_run_several_replicas():
    """Workers and serving replicas have no fixed name, and no fixed host port two could fight over."""
    for name in SCALED:
        service = _services()[name]
        assert "container_name" not in service, name
        for port in service.get("ports", []):
            host_port = str(port).split(":")[1]
            assert "-" in host_port, f"{name}: publish a host port range, not {port}, so replicas can scale"


def _flag(command: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` present in ``command`` (worker/learner: --web-port; serve: --port)."""
    for name in names:
        if name in command:
            return command[command.index(name) + 1]
    return None


def test_prometheus_scrapes_each_component_on_its_metrics_port():
    """Each DNS-discovered job names a service and the port its command serves /metrics on."""
    services = _services()
    jobs = {job["job_name"]: job for job in _load(PROMETHEUS)["scrape_configs"]}
    for name in ("worker", "learner", "serving"):
        (sd,) = jobs[name]["dns_sd_configs"]
        assert sd["names"] == [name] and sd["type"] == "A"
        assert _flag(services[name]["command"], "--web-port", "--port") == str(sd["port"]), name
        assert _flag(services[name]["command"], "--web-host", "--host") == "0.0.0.0", \
            f"{name}: /metrics would be unreachable from Prometheus' container"
    assert "kafka-exporter:9308" in jobs["kafka-exporter"]["static_configs"][0]["targets"]


def test_learner_and_serving_share_the_model_store():
    """The learner writes snapshots into the same named volume that serving reads (read-only)."""
    services = _services()

    def store_volume(name: str) -> str:
        command = services[name]["command"]
        store = command[command.index("--store-dir") + 1]
        (volume,) = [v for v in services[name]["volumes"] if v.split(":")[1] == store]
        return volume

    learner, serving = store_volume("learner"), store_volume("serving")
    assert learner.split(":")[0] == serving.split(":")[0] and learner.split(":")[0] in _compose()["volumes"]
    assert serving.endswith(":ro")


def test_gpu_override_reserves_a_gpu_for_the_learner_only():
    """compose/docker-compose.gpu.yml changes the learner alone: CUDA torch and an NVIDIA device."""
    override = _load(COMPOSE_GPU)["services"]
    assert set(override) == {"learner"}
    learner = override["learner"]
    (device,) = learner["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "TORCH_INDEX_URL" in learner["build"]["args"]
    assert learner["image"] != _services()["learner"]["image"], "the CUDA image must not overwrite the CPU tag"
    assert 'ARG TORCH_INDEX_URL' in DOCKERFILE.read_text()


def test_streamrec_containers_know_the_cluster():
    """Every container of ours gets KAFKA_BOOTSTRAP_SERVERS, overridable to reach an existing cluster."""
    for name, service in _services().items():
        if "build" in service:
            value = service["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
            assert value.startswith("${KAFKA_BOOTSTRAP_SERVERS:-"), name
            assert "STREAMREC_TOPIC_PREFIX" in service["environment"], name


# -- commands ---------------------------------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


@pytest.mark.parametrize("service", sorted(_streamrec_commands()))
def test_streamrec_commands_parse(service: str):
    """The command of each streamrec service parses with the real CLI parser."""
    command = _streamrec_commands()[service]
    parser = build_parser()
    if command[1] == "serve" and "serve" not in _subcommands(parser):
        pytest.skip("`streamrec serve` is not in stream.cli yet; the serving service's command is unchecked")
    try:
        parser.parse_args(command[1:])
    except SystemExit as exc:  # argparse exits on an unknown flag or command
        pytest.fail(f"{service}: {' '.join(command)} does not parse (exit {exc.code})")


def test_python_commands_compile_and_import_what_exists():
    """`python -c` commands (topic creation) compile and import only names that exist."""
    for name, service in _services().items():
        command = service.get("command")
        if isinstance(command, list) and command[:2] == ["python", "-c"]:
            tree = ast.parse(command[2])
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), f"{name}: {node.module}.{alias.name}"


def test_dashboard_is_well_formed():
    """Unique panel ids, a fixed uid, panels inside Grafana's 24 columns without overlapping, and
    every query with a refId and an expression."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "streamrec" and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["refId"] and target["expr"].strip(), panel["title"]


def test_each_worker_replica_has_its_own_stable_identity(monkeypatch: pytest.MonkeyPatch):
    """The workers' id comes from each container's hostname (unique per replica, kept across the
    restart policy's restarts), never a constant that would make replicas fence each other."""
    from stream.config import StreamSettings

    value = _services()["worker"]["environment"]["STREAMREC_WORKER_ID"]
    in_container = value.replace("$$", "$")  # what Compose hands the container
    assert in_container == "${HOSTNAME}", value
    monkeypatch.setenv("HOSTNAME", "3f2a9c1d7b4e")
    monkeypatch.setenv("STREAMREC_WORKER_ID", in_container)
    assert StreamSettings().worker_id == "3f2a9c1d7b4e"
