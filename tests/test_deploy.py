"""deploy/: the EKS manifests validated offline against the Kubernetes schemas, and the
figures in them checked against the project's own (enclave memory, ports, never debug mode).

``kubernetes-validate`` bundles the Kubernetes JSON schemas, so no cluster and no network
is needed; strict mode refuses any field the schema does not know (a typo fails).
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess

import pytest
import yaml

import kubernetes_validate
from nitrolesion.limits import DEFAULT_ENCLAVE_PORT, PROJECT_ROOT
from nitrolesion.memory_budget import RECOMMENDED_ENCLAVE_MIB
from nitrolesion.parent.cli import build_parser

DEPLOY = PROJECT_ROOT / "deploy"
#: The oldest Kubernetes version EKS still supports in standard support, late 2026.
KUBERNETES_VERSION = "1.32"
GIB = 1024


def documents() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(kind: str) -> dict:
    found = [doc for doc in documents() if doc["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def containers() -> dict[str, dict]:
    return {c["name"]: c for c in one("Deployment")["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_kubernetes(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validator_does_refuse_a_bad_manifest():
    """The check above can fail: a misspelt field and a wrong type are refused."""
    deployment = one("Deployment")
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 4}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong = {**deployment, "spec": {**deployment["spec"], "replicas": "four"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


def test_enclave_pod_asks_for_one_enclave_and_huge_pages_from_the_measured_memory():
    enclave = containers()["enclave"]
    env = {item["name"]: item["value"] for item in enclave["env"]}
    memory_mib = int(env["ENCLAVE_MEMORY_MIB"])
    # bench/pipeline.py's figure, rounded up to whole 1 GiB huge pages.
    assert memory_mib == math.ceil(RECOMMENDED_ENCLAVE_MIB / GIB) * GIB
    pages = f"{memory_mib // GIB}Gi"
    for part in ("requests", "limits"):
        assert enclave["resources"][part]["aws.ec2.nitro/nitro_enclaves"] == "1"
        assert enclave["resources"][part]["hugepages-1Gi"] == pages
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hugepages"]["emptyDir"]["medium"] == "HugePages-1Gi"
    assert one("Deployment")["spec"]["template"]["spec"]["nodeSelector"] == {
        "aws-nitro-enclaves-k8s-dp": "enabled"}


def test_enclave_is_started_by_nitro_cli_and_never_in_debug_mode():
    script = (DEPLOY / "run-enclave.sh").read_text()
    assert "nitro-cli run-enclave" in script and "terminate-enclave" in script
    for path in DEPLOY.iterdir():  # what runs (the README says "never", in words)
        if path.suffix == ".md":
            continue
        for line in path.read_text().splitlines():
            if "--debug-mode" in line:
                assert line.lstrip().startswith("#"), f"{path.name}: {line}"
    subprocess.run(["bash", "-n", str(DEPLOY / "run-enclave.sh")], check=True)
    assert containers()["enclave"]["command"][-1].endswith("deploy/run-enclave.sh")
    assert "deploy/run-enclave.sh" in (DEPLOY / "Dockerfile.parent").read_text()


def relay_arguments() -> list[str]:
    command = containers()["relay"]["command"][-1]
    exec_line = command[command.index("exec "):]
    words = shlex.split(exec_line.replace('"$(cat /run/lesion/enclave-cid)"', "16"))
    return words[words.index("relay"):]


def test_relay_command_is_one_the_cli_accepts_and_the_service_and_probe_match():
    args = build_parser().parse_args(relay_arguments())
    assert args.func.__name__ == "cmd_relay" and args.port == DEFAULT_ENCLAVE_PORT
    assert args.transport is None  # vsock, the default: the enclave has nothing else
    relay = containers()["relay"]
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    assert args.listen == f"0.0.0.0:{ports['sessions']}"
    assert args.health == f"0.0.0.0:{ports['health']}"
    assert relay["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    assert relay["livenessProbe"]["httpGet"] == {"path": "/live", "port": "health"}
    service = one("Service")
    assert service["spec"]["selector"] == one("Deployment")["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["sessions"]


def test_node_setup_reserves_what_the_pods_ask_for():
    script = (DEPLOY / "node-setup.sh").read_text()
    subprocess.run(["bash", "-n", str(DEPLOY / "node-setup.sh")], check=True)
    settings = dict(re.findall(r"^(\w+)=\$?\{?(?:\w+:-)?(\d+)\}?$", script, re.MULTILINE))
    enclave_env = {item["name"]: item["value"] for item in containers()["enclave"]["env"]}
    assert settings["MEMORY_MIB_PER_ENCLAVE"] == enclave_env["ENCLAVE_MEMORY_MIB"]
    assert settings["CPUS_PER_ENCLAVE"] == enclave_env["ENCLAVE_CPUS"]
    assert int(settings["ENCLAVES"]) <= 4  # the device plugin's and Nitro's limit per node
    assert "/etc/nitro_enclaves/allocator.yaml" in script
    assert "memory_mib: $((ENCLAVES * MEMORY_MIB_PER_ENCLAVE))" in script
    assert "cpu_count: $((ENCLAVES * CPUS_PER_ENCLAVE))" in script
    assert "nitro-enclaves-allocator.service" in script
