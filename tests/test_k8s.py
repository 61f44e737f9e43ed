"""The Kubernetes manifests (deploy/k8s), offline: every kustomization renders with `kubectl kustomize`,
every rendered object validates against the Kubernetes schemas (kubernetes-validate), and the
rendering keeps the promises docs/scaling.md makes (one flow process per pod, numbered by its
ordinal, recovery on a volume, probes and resources everywhere, configuration by real settings)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from flows.cluster import cluster_addresses
from slsrec import local
from slsrec.settings import Settings

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
KUBERNETES = "1.28.0"  # the oldest version the manifests support: the StatefulSet pod-index label
LONG_RUNNING = ("StatefulSet", "Deployment")


def render(folder: Path) -> list[dict]:
    """`kubectl kustomize FOLDER` as objects. kubectl missing is a failure, never a skip: make install
    has it, and local.ensure_command installs Debian's package where it can."""
    kubectl = local.ensure_command("kubectl", "kubectl")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {folder} failed: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def pod_spec(obj: dict) -> dict:
    spec = obj["spec"]
    return (spec["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else spec)["template"]["spec"]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def rendered(request) -> list[dict]:
    return render(request.param)


def test_there_is_a_base_and_an_overlay():
    assert {K8S / "base", K8S / "overlays" / "strimzi-redis-cluster"} <= set(KUSTOMIZATIONS)


def test_every_rendered_object_validates_against_the_kubernetes_schemas(rendered):
    assert {o["kind"] for o in rendered} >= {"ConfigMap", "Service", "StatefulSet", "Deployment", "CronJob"}
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}")


def test_the_flow_is_one_process_per_pod_numbered_by_its_ordinal_with_recovery_on_its_volume(rendered):
    [flow] = [o for o in rendered if o["kind"] == "StatefulSet"]
    [service] = [o for o in rendered if o["kind"] == "Service" and o["metadata"]["name"] == flow["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    [container] = pod_spec(flow)["containers"]
    cmd = container["command"]
    option = {cmd[i]: cmd[i + 1] for i in range(2, len(cmd) - 1, 2)}
    addresses = cluster_addresses(option["--addresses"], int(option["--processes"]))
    # Every pod's address is its stable DNS name behind the headless Service, one per replica.
    name, svc = flow["metadata"]["name"], service["metadata"]["name"]
    assert addresses == [f"{name}-{i}.{svc}:2101" for i in range(flow["spec"]["replicas"])]
    env = {e["name"]: e for e in container["env"]}
    assert option["--process-id"] == "$(POD_INDEX)"
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    [claim] = flow["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == env["SLSREC_RECOVERY_DIR"]["value"]


def test_every_container_has_resources_and_the_long_running_ones_probes(rendered):
    for obj in rendered:
        if obj["kind"] not in (*LONG_RUNNING, "CronJob", "Job"):
            continue
        for c in pod_spec(obj)["containers"]:
            where = f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            assert set(c["resources"]) == {"requests", "limits"}, where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"]), where
            if obj["kind"] in LONG_RUNNING:
                assert "livenessProbe" in c and "readinessProbe" in c, where


def test_configuration_names_real_settings_and_secrets_come_from_a_secret(rendered):
    fields = {f"SLSREC_{name.upper()}" for name in Settings.model_fields}
    for obj in rendered:
        if obj["kind"] in ("ConfigMap", "Secret"):
            assert set(obj.get("data", {})) <= fields, obj["metadata"]["name"]  # a typo would be ignored silently
        if obj["kind"] == "ConfigMap":
            assert not [k for k in obj["data"] if "PASSWORD" in k or k == "SLSREC_REDIS_URL"]
        if obj["kind"] in (*LONG_RUNNING, "CronJob", "Job"):
            for c in pod_spec(obj)["containers"]:
                config = {s["configMapRef"]["name"] for s in c["envFrom"] if "configMapRef" in s}
                secrets = {s["secretRef"]["name"] for s in c["envFrom"] if "secretRef" in s}
                assert config == {"slsrec-config"}, obj["metadata"]["name"]
                # the Secret's name, or its generated name (kustomize appends a hash of the content)
                assert [n for n in secrets if n.split("-")[:2] == ["slsrec", "credentials"]], obj["metadata"]["name"]


def test_the_strimzi_example_declares_the_topics_the_project_creates():
    docs = [d for d in yaml.safe_load_all((K8S / "examples" / "strimzi.yaml").read_text()) if d]
    topics = {d["metadata"]["name"]: d["spec"]["partitions"] for d in docs if d["kind"] == "KafkaTopic"}
    overlay = render(K8S / "overlays" / "strimzi-redis-cluster")
    [config] = [o for o in overlay if o["kind"] == "ConfigMap"]
    assert topics == local.topic_specs(Settings(partitions=int(config["data"]["SLSREC_PARTITIONS"])))
    [flow] = [o for o in overlay if o["kind"] == "StatefulSet"]
    assert topics["clicks"] >= flow["spec"]["replicas"]  # no flow worker without a partition
