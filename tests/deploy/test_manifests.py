"""The manifests under deploy/kubernetes: every core kind validates against the Kubernetes
schemas (kubernetes-validate, strict), and each KEDA ScaledObject has the fields KEDA documents,
scales a Deployment of ours and names the consumers the NATS transport really makes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

import choreograph
from choreograph.cli import main as cli_main
from choreograph.demo import create_app
from choreograph.store import store_from_url
from choreograph.transport import transport_from_url
from choreograph.transports.nats._names import Names

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
SCALED_OBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}  # fmt: skip
NATS_JETSTREAM_METADATA = {
    "natsServerMonitoringEndpoint", "account", "accountID", "stream", "consumer",
    "lagThreshold", "activationLagThreshold", "useHttps",
}  # fmt: skip
NATS_JETSTREAM_REQUIRED = {"natsServerMonitoringEndpoint", "account", "stream", "consumer"}
SCALED_TO_ZERO = {"notification", "package"}


def documents() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    found = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((MANIFESTS / name).read_text()):
            if doc:
                found.append((name, doc))
    return found


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == kind}


def test_the_kustomization_lists_every_manifest_and_only_those() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == "drone-delivery"


def _doc_id(value: Any) -> str:
    return value if isinstance(value, str) else f"{value['kind']}/{value['metadata']['name']}"


@pytest.mark.parametrize(
    "name,doc", [d for d in documents() if d[1]["kind"] != "ScaledObject"], ids=_doc_id
)
def test_core_kinds_validate_strictly(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_refuses_a_misspelt_field() -> None:
    # the check above can fail: a field Kubernetes does not know is refused
    _, doc = next(d for d in documents() if d[1]["kind"] == "Deployment")
    broken = {**doc, "spec": {**doc["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_one_deployment_per_service_with_probes_resources_and_a_grace_period() -> None:
    app = create_app()
    deployments = of_kind("Deployment")
    config = of_kind("ConfigMap")["drone-config"]["data"]
    assert set(deployments) == set(app.services)
    drain = float(config["CHOREOGRAPH_GRACE_PERIOD"])
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"][:4] == ["choreograph", "run", "--service", name]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        # the process drains before the kubelet's SIGKILL
        assert pod["terminationGracePeriodSeconds"] > drain
    assert config["CHOREOGRAPH_HEALTH_PORT"] == "8081"


def test_secrets_come_from_the_secret_never_from_a_literal() -> None:
    for _, doc in documents():
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            defined: list[str] = []
            for variable in container.get("env", []):
                value = variable.get("value", "")
                if "://" in value and "@" in value:
                    # a URL with credentials takes them from variables defined before it
                    userinfo = value.split("://", 1)[1].split("@", 1)[0]
                    assert "$(" in userinfo, value
                    for ref in userinfo.split("$(")[1:]:
                        assert ref.split(")")[0] in defined, value
                if "PASSWORD" in variable["name"] or "TOKEN" in variable["name"]:
                    assert "secretKeyRef" in variable.get("valueFrom", {}), variable
                defined.append(variable["name"])
    for value in of_kind("ConfigMap")["drone-config"]["data"].values():
        assert "@" not in value


def test_the_ingestion_service_routes_to_the_ingestion_pods() -> None:
    service = of_kind("Service")["ingestion"]
    deployment = of_kind("Deployment")["ingestion"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports


def test_the_declare_job_declares_the_app() -> None:
    job = of_kind("Job")["declare"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["choreograph", "declare"]


def test_nats_runs_as_a_three_node_jetstream_cluster() -> None:
    nats = of_kind("StatefulSet")["nats"]
    conf = of_kind("ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert nats["spec"]["replicas"] == 3
    assert "jetstream" in conf and conf.count("nats://nats-") == 3
    assert "replicas=3" in of_kind("ConfigMap")["drone-config"]["data"]["CHOREOGRAPH_TRANSPORT"]


def scaled_consumers() -> dict[str, list[str]]:
    """Service -> the consumers its ScaledObject's triggers name."""
    return {
        name: [t["metadata"]["consumer"] for t in so["spec"]["triggers"]]
        for name, so in of_kind("ScaledObject").items()
    }


def test_each_scaled_object_has_kedas_documented_structure() -> None:
    deployments = of_kind("Deployment")
    scaled = of_kind("ScaledObject")
    assert set(scaled) == set(deployments)
    for name, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        spec = so["spec"]
        assert set(spec) <= SCALED_OBJECT_SPEC
        assert spec["scaleTargetRef"]["name"] in deployments
        assert spec["minReplicaCount"] == (0 if name in SCALED_TO_ZERO else 1)
        assert spec["maxReplicaCount"] >= max(1, spec["minReplicaCount"])
        for trigger in spec["triggers"]:
            assert trigger["type"] == "nats-jetstream"
            metadata = trigger["metadata"]
            assert NATS_JETSTREAM_REQUIRED <= set(metadata) <= NATS_JETSTREAM_METADATA
            # KEDA reads trigger metadata as strings
            assert all(isinstance(v, str) for v in metadata.values())
            assert metadata["stream"] == "drone_events"


def test_scaled_objects_name_every_consumer_the_transport_makes_and_no_other() -> None:
    app = create_app()
    names = Names("drone")
    for service, consumers in scaled_consumers().items():
        topics = {cls.event_type for cls in app.subscriptions(app.service(service))}
        expected = {names.topic_consumer(service, t) for t in topics}
        expected.add(names.group_consumer(service))
        assert sorted(consumers) == sorted(expected)


def containers() -> list[tuple[str, dict[str, Any]]]:
    """(workload name, container) of every Deployment and Job that runs choreograph."""
    return [
        (name, container)
        for kind in ("Deployment", "Job")
        for name, doc in of_kind(kind).items()
        for container in doc["spec"]["template"]["spec"]["containers"]
    ]


def variables_choreograph_reads() -> set[str]:
    """Every CHOREOGRAPH_* variable the package reads: an option's, or one named in its code."""
    package = Path(choreograph.__file__).parent
    named = {
        found
        for source in package.rglob("*.py")
        for found in re.findall(r"\"(CHOREOGRAPH_[A-Z_]+)\"", source.read_text())
    }

    def envvars(command: click.Command) -> set[str]:
        found = {p.envvar for p in command.params if isinstance(p.envvar, str)}
        for sub in getattr(command, "commands", {}).values():
            found |= envvars(sub)
        return found

    return named | envvars(cli_main)


def test_every_setting_the_manifests_give_is_one_choreograph_reads() -> None:
    # given the variables the ConfigMap and the containers set for choreograph
    config = of_kind("ConfigMap")["drone-config"]["data"]
    given = {name for name in config if name.startswith("CHOREOGRAPH_")}
    for _, container in containers():
        given |= {v["name"] for v in container.get("env", [])} - {"NATS_TOKEN", "POSTGRES_PASSWORD"}
    # then each is one choreograph reads (a misspelt one would be ignored without a word)
    unknown = given - variables_choreograph_reads()
    assert len(given) > 5 and not unknown, unknown


@pytest.mark.parametrize("name,container", containers(), ids=[n for n, _ in containers()])
def test_each_container_runs_a_command_line_the_cli_accepts_with_the_manifests_settings(
    name: str, container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # given the pod's environment: the ConfigMap, the Secret's values, the composed store URL
    for variable, value in of_kind("ConfigMap")["drone-config"]["data"].items():
        monkeypatch.setenv(variable, value)
    for variable in container.get("env", []):
        value = variable.get("value", "a-secret")
        monkeypatch.setenv(variable["name"], value.replace("$(POSTGRES_PASSWORD)", "a-secret"))
    # when the CLI parses the container's command line (nothing runs)
    program, command, *args = container["args"]
    assert program == "choreograph"
    group = cli_main.make_context("choreograph", [command])
    sub = cli_main.get_command(group, command)
    assert sub is not None, command
    params = sub.make_context(command, args, parent=group).params
    # then every option and variable is accepted, and the bus and store URLs are ones the
    # transports and stores take (unknown URL options are refused)
    transport_from_url(params["transport_url"])
    if "store_url" in params:
        store_from_url(params["store_url"], name)
    assert params["app_spec"] == "choreograph.demo:create_app"
