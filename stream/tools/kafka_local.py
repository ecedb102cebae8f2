"""A real single-node Apache Kafka broker (KRaft mode) on this machine, for tests, benchmarks and the demo.

The jars come from Maven Central: Maven resolves ``compose/kafka/pom.xml`` into ``.kafka/lib``
(git-ignored) once; the broker then runs as ``java kafka.Kafka server.properties`` with Java 17 in
a process session of its own, so it outlives the command that started it and is stopped by PID.
Its state (PID, ports, data and log paths) is kept in ``<home>/broker.json``.

There is no mock here on purpose: everything streamrec claims about Kafka is checked against
the same broker binaries that run in production.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from stream.config import PROJECT_ROOT, state_dir

log = logging.getLogger(__name__)

POM = PROJECT_ROOT / "compose" / "kafka" / "pom.xml"
LIB_DIR = PROJECT_ROOT / ".kafka" / "lib"
_LIB_STAMP = LIB_DIR / ".resolved"
_LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.org.apache.kafka.storage.internals.log=WARN
log4j.logger.kafka.log.LogCleaner=WARN
"""


class KafkaLauncherError(RuntimeError):
    """The local broker could not be set up, started or stopped; the message says why."""


@dataclass
class Broker:
    """A running local broker as recorded in ``broker.json``."""

    pid: int
    port: int
    controller_port: int
    home: str
    log_file: str

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"


def default_home() -> Path:
    return state_dir() / "kafka"


def ensure_jars(quiet: bool = True) -> Path:
    """Resolve the broker's jars from Maven Central into ``.kafka/lib`` unless already there."""
    pom_sum = hashlib.sha256(POM.read_bytes()).hexdigest()
    if _LIB_STAMP.exists() and _LIB_STAMP.read_text().strip() == pom_sum:
        return LIB_DIR
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaLauncherError("Maven ('mvn') is not on PATH; it is needed once to fetch the Kafka jars.")
    if shutil.which("java") is None:
        raise KafkaLauncherError("Java ('java', version 17) is not on PATH; the local broker runs on it.")
    log.info("resolving Apache Kafka jars from Maven Central into %s (once)", LIB_DIR)
    shutil.rmtree(LIB_DIR, ignore_errors=True)  # no stale jars from an older pom on the classpath
    cmd = [mvn, "-B", "-f", str(POM), "dependency:copy-dependencies"]
    if quiet:
        cmd.insert(1, "-q")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise KafkaLauncherError(
            "Maven could not resolve the Kafka jars:\n" + (result.stdout + result.stderr)[-4000:]
        )
    _LIB_STAMP.write_text(pom_sum)
    return LIB_DIR


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_below_ephemeral(low: int = 20000) -> int:
    """A free port between ``low`` and the kernel's ephemeral range, for a broker that must come
    back on the same port: clients retrying a closed port inside that range can be given it as
    their own source port (connecting to themselves), and the restarted broker then fails with
    "Address already in use"."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, max(first_ephemeral, low + 1))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise KafkaLauncherError(f"no free port between {low} and {first_ephemeral}")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); look at its state where /proc exists.
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().split(") ", 1)[1][0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def _server_properties(home: Path, port: int, controller_port: int, partitions: int) -> str:
    return f"""\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={home / 'data'}
num.partitions={partitions}
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
message.max.bytes=8388608
log.retention.hours=168
"""


def status(home: Path | None = None) -> Broker | None:
    """The broker recorded under ``home`` if its process is alive, else None."""
    state_file = (home or default_home()) / "broker.json"
    if not state_file.exists():
        return None
    broker = Broker(**json.loads(state_file.read_text()))
    return broker if _pid_alive(broker.pid) else None


def start(
    home: Path | None = None,
    port: int | None = None,
    partitions: int = 4,
    timeout_s: float = 180.0,
    heap: str = "768m",
    controller_port: int | None = None,
) -> Broker:
    """Start the local broker (or return the one already running under ``home``) and wait until it serves.

    Readiness means: the port accepts connections and a metadata request succeeds.
    """
    home = (home or default_home()).resolve()
    running = status(home)
    if running is not None:
        if port is not None and port != running.port:
            raise KafkaLauncherError(
                f"a broker is already running from {home} on port {running.port} (pid {running.pid}); "
                f"stop it first to use port {port}"
            )
        wait_ready(running, timeout_s)
        return running
    lib = ensure_jars()
    java = shutil.which("java")
    if java is None:
        raise KafkaLauncherError("Java ('java', version 17) is not on PATH; the local broker runs on it.")
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    if _port_open(port):
        raise KafkaLauncherError(f"port {port} on 127.0.0.1 is already in use")
    controller_port = controller_port or free_port()
    while controller_port == port:
        controller_port = free_port()
    config = home / "server.properties"
    config.write_text(_server_properties(home, port, controller_port, partitions))
    (home / "log4j.properties").write_text(_LOG4J)
    classpath = f"{lib}/*"
    if not (home / "data" / "meta.properties").exists():
        fmt = subprocess.run(
            [java, "-cp", classpath, "kafka.tools.StorageTool", "format",
             "-t", _cluster_id(), "-c", str(config), "--ignore-formatted"],
            capture_output=True, text=True,
        )
        if fmt.returncode != 0:
            raise KafkaLauncherError("formatting the KRaft storage failed:\n" + fmt.stdout + fmt.stderr)
    log_file = home / "broker.log"
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            [java, "-Xms256m", f"-Xmx{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
             f"-Dlog4j.configuration=file:{home / 'log4j.properties'}",
             "-cp", classpath, "kafka.Kafka", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    broker = Broker(pid=proc.pid, port=port, controller_port=controller_port, home=str(home), log_file=str(log_file))
    (home / "broker.json").write_text(json.dumps(asdict(broker), indent=2))
    log.info("started Kafka broker pid %d on 127.0.0.1:%d (log %s)", proc.pid, port, log_file)
    wait_ready(broker, timeout_s)
    return broker


def wait_ready(broker: Broker, timeout_s: float = 180.0) -> None:
    """Block until the broker answers a metadata request, or raise with the tail of its log."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pid_alive(broker.pid):
            raise KafkaLauncherError(f"the broker exited during start-up; its log ends:\n{_tail(broker.log_file)}")
        if _port_open(broker.port):
            try:
                admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers, request_timeout_ms=5000)
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except KafkaError:
                pass
        time.sleep(0.5)
    raise KafkaLauncherError(
        f"the broker did not become ready within {timeout_s:.0f} s; its log ends:\n{_tail(broker.log_file)}"
    )


def stop(home: Path | None = None, timeout_s: float = 60.0) -> bool:
    """Stop the broker recorded under ``home`` (SIGTERM, then SIGKILL after ``timeout_s``). True if one was running."""
    home = (home or default_home()).resolve()
    broker = status(home)
    if broker is None:
        return False
    os.kill(broker.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _pid_alive(broker.pid) and time.monotonic() < deadline:
        _reap(broker.pid)
        time.sleep(0.2)
    if _pid_alive(broker.pid):
        log.warning("broker pid %d ignored SIGTERM for %.0f s; killing it", broker.pid, timeout_s)
        os.kill(broker.pid, signal.SIGKILL)
        _reap(broker.pid)
    (home / "broker.json").unlink(missing_ok=True)
    return True


def _cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64 without padding, as kafka-storage makes.

    Like Kafka's own ``Uuid.randomUuid``, never one that starts with '-': kafka-storage would
    read it as an option (about one start in 64 failed that way).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _reap(pid: int) -> None:
    """Collect the exit status when the broker is our own child (tests start it in-process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def broker_for_run(home: Path | None = None, partitions: int = 4) -> Iterator[str]:
    """Bootstrap servers for a test session or a benchmark: ``KAFKA_BOOTSTRAP_SERVERS`` when set,
    else a broker started in a temporary folder for the duration of the ``with`` block."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    own_home = home is None
    home = home or Path(tempfile.mkdtemp(prefix="streamrec-kafka-"))
    broker = start(home=home, partitions=partitions)
    try:
        yield broker.bootstrap_servers
    finally:
        stop(home)
        if own_home:
            shutil.rmtree(home, ignore_errors=True)
