"""docker-compose.yml: valid for Docker Compose, and the same system as the local services.

There is no Docker engine here; Debian's ``docker-compose`` validates a file without one. When it is
missing it is installed with apt-get, and when that fails the test fails (it never skips).
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET

import pytest
import yaml

from slsrec import local
from slsrec.errors import ServiceError
from slsrec.settings import Settings

COMPOSE = local.ROOT / "docker-compose.yml"
# Broker settings that differ by design: addresses inside the compose network, and the data folder.
ADDRESS_KEYS = {"listeners", "advertised.listeners", "controller.quorum.voters", "listener.security.protocol.map",
                "log.dirs"}


@pytest.fixture(scope="module")
def docker_compose() -> str:
    try:
        return local.ensure_command("docker-compose", "docker-compose")
    except ServiceError as e:
        pytest.fail(f"cannot validate docker-compose.yml: {e}", pytrace=False)


@pytest.fixture(scope="module")
def compose(docker_compose) -> dict:
    """The file as Docker Compose resolves it (anchors merged, paths made absolute)."""
    done = subprocess.run([docker_compose, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                          cwd=local.ROOT)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_file_is_valid(docker_compose):
    done = subprocess.run([docker_compose, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                          cwd=local.ROOT)
    assert (done.returncode, done.stderr) == (0, "")


def test_app_services_run_the_local_command_lines(compose):
    services = compose["services"]
    assert {name: tuple(services[name]["command"]) for name in local.APP_COMMANDS} == local.APP_COMMANDS
    for name in local.APP_COMMANDS:
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert services[name]["environment"]["SLSREC_KAFKA_BOOTSTRAP"] == "kafka:9092"


def test_files_the_services_use_exist(compose):
    assert (local.ROOT / "deploy" / "Dockerfile").is_file()
    assert (local.ROOT / local.SAMPLE_CLICKS).is_file()
    mounts = compose["services"]["otel-collector"]["volumes"]
    assert any(str(v).startswith(f"{local.ROOT}/deploy/otel-collector.yaml:") for v in mounts), mounts
    config = yaml.safe_load((local.ROOT / "deploy" / "otel-collector.yaml").read_text())
    assert all("debug" in p["exporters"] for p in config["service"]["pipelines"].values())


def test_kafka_is_the_version_and_configuration_of_the_local_broker(compose):
    kafka = compose["services"]["kafka"]
    pom = ET.parse(local.DEPLOY / "pom.xml").getroot()
    version = pom.find("{http://maven.apache.org/POM/4.0.0}properties/{http://maven.apache.org/POM/4.0.0}kafka.version")
    assert kafka["image"] == f"apache/kafka:{version.text}"

    local_props = {}
    for line in (local.DEPLOY / "kafka" / "server.properties").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            local_props[key] = value
    # The image turns KAFKA_A_B__C into a.b_c.
    env = {k.removeprefix("KAFKA_").replace("__", "\0").replace("_", ".").replace("\0", "_").lower(): str(v)
           for k, v in kafka["environment"].items() if k.startswith("KAFKA_")}
    shared = {k: v for k, v in local_props.items() if k not in ADDRESS_KEYS}
    assert {k: env.get(k) for k in shared} == shared
    assert "1@kafka:9093" == env["controller.quorum.voters"] and "PLAINTEXT://kafka:9092" in env["advertised.listeners"]


def test_published_ports_are_loopback_only(compose):
    published = [(name, p) for name, s in compose["services"].items() for p in s.get("ports", [])]
    assert published
    for name, port in published:
        host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
        assert host_ip == "127.0.0.1", (name, port)


def test_api_listens_in_its_container_and_is_published_on_loopback(compose):
    api = compose["services"]["api"]
    assert api["environment"]["SLSREC_API_HOST"] == "0.0.0.0"  # else the published port reaches nothing
    port = Settings().api_port
    (published,) = api["ports"]  # "127.0.0.1:8000:8000/tcp", or its long form
    if isinstance(published, dict):
        published = f"{published['host_ip']}:{published['published']}:{published['target']}"
    assert published.removesuffix("/tcp") == f"127.0.0.1:{port}:{port}"
    assert f"127.0.0.1:{port}/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_the_flow_restarts_by_itself_and_has_a_liveness_probe(compose):
    flow = compose["services"]["flow"]
    assert flow["restart"] == "unless-stopped"
    assert flow["healthcheck"]["test"] == ["CMD", "slsrec", "health", "--live"]
