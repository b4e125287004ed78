"""deploy/ is checked offline: every YAML parses, the Kubernetes manifests validate against the
Kubernetes schemas (kubernetes-validate; KEDA's ScaledObject, a CRD, is checked structurally
here), and every metric the dashboard, the alert rules and the autoscaler query exists in the
code. No network, no Docker."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agents.loader import parse_workflow

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.31"
SOURCE_PACKAGES = ("agentfabric", "streams", "agents", "tools", "schemas")
# Kinds no Kubernetes schema covers: checked by the tests below instead.
NOT_IN_KUBERNETES_SCHEMAS = {"ScaledObject", "Kustomization"}
METRIC = re.compile(r"\bagentfabric_[a-z0-9_]+")
EXPOSITION_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in _docs(path)]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _manifests() if doc["kind"] == kind]


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


def test_the_expected_files_are_there() -> None:
    for name in ("Dockerfile", "compose.yaml", "prometheus/prometheus.yml",
                 "prometheus/alerts.yaml", "grafana/dashboards/agentfabric.json",
                 "k8s/kustomization.yaml", "k8s/keda-scaledobject.yaml", "k8s/pdb.yaml"):
        assert (DEPLOY / name).is_file(), name


@pytest.mark.parametrize(("path", "doc"), _manifests(),
                         ids=lambda v: v.name if isinstance(v, Path) else v.get("kind", ""))
def test_manifest_validates_against_kubernetes_schema(path: Path, doc: dict[str, Any]) -> None:
    if doc["kind"] in NOT_IN_KUBERNETES_SCHEMAS:
        pytest.skip(f"{doc['kind']} is not a Kubernetes kind: checked structurally below")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_catches_a_wrong_manifest() -> None:
    deployment = _of_kind("Deployment")[0]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGetx"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _docs(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_scaled_object_scales_the_workers_on_lag() -> None:
    (scaled,) = _of_kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    deployments = {d["metadata"]["name"] for d in _of_kind("Deployment")}
    assert target["name"] in deployments
    assert target.get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert set(trigger) <= {"type", "metadata", "name", "authenticationRef",
                                "metricType", "useCachedMetrics"}
        assert trigger["type"] in ("prometheus", "kafka")
        assert all(isinstance(v, str) for v in trigger["metadata"].values())
    queries = [t["metadata"]["query"] for t in spec["triggers"] if t["type"] == "prometheus"]
    assert any("agentfabric_consumer_lag" in q for q in queries)
    assert float(spec["triggers"][0]["metadata"]["threshold"]) > 0


def test_deployments_are_probed_non_root_and_reference_their_config() -> None:
    configmaps = {c["metadata"]["name"] for c in _of_kind("ConfigMap")}
    for deployment in _of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for container in pod["containers"]:
            assert "livenessProbe" in container, deployment["metadata"]["name"]
            assert "readinessProbe" in container, deployment["metadata"]["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
    worker = next(d for d in _of_kind("Deployment") if d["metadata"]["name"].endswith("worker"))
    env = worker["spec"]["template"]["spec"]["containers"][0]["env"]
    secret_refs = {e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert "AGENTFABRIC_SASL_PASSWORD" in secret_refs
    assert not _of_kind("Secret"), "secrets are referenced, never shipped"
    selectors = [p["spec"]["selector"]["matchLabels"] for p in _of_kind("PodDisruptionBudget")]
    assert worker["spec"]["selector"]["matchLabels"] in selectors


def test_workflow_configmap_holds_valid_workflows() -> None:
    (workflows,) = [c for c in _of_kind("ConfigMap")
                    if c["metadata"]["name"] == "agentfabric-workflows"]
    assert workflows["data"]
    for name, text in workflows["data"].items():
        parse_workflow(yaml.safe_load(text), name)


def test_configmap_settings_are_known_settings() -> None:
    from agentfabric.settings import ENV_PREFIX, Settings

    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    (config,) = [c for c in _of_kind("ConfigMap") if c["metadata"]["name"] == "agentfabric-config"]
    assert set(config["data"]) <= known
    compose = _docs(DEPLOY / "compose.yaml")[0]
    env = compose["x-fabric-env"]
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= known


def test_compose_has_the_whole_stack() -> None:
    compose = _docs(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    for name in ("kafka", "redis", "weaviate", "prometheus", "grafana", "worker", "ingress",
                 "model-server"):
        assert name in services, name
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    assert "--appendonly" in services["redis"]["command"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 2
    final = text.split("\nFROM ")[-1]
    assert "COPY --from=" in final
    users = re.findall(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert users
    assert users[-1].split(":")[0] not in ("0", "root")


def _alert_rules() -> list[dict[str, Any]]:
    (rules,) = _docs(DEPLOY / "prometheus" / "alerts.yaml")
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_alert_rules_cover_the_failure_modes() -> None:
    rules = {r["alert"]: r["expr"] for r in _alert_rules()}
    expressions = " ".join(rules.values())
    for metric in ("agentfabric_dead_letters_total", "agentfabric_tool_breaker_state",
                   "agentfabric_consumer_lag", "agentfabric_step_errors_total",
                   "agentfabric_cost_usd_total"):
        assert metric in expressions, metric
    for rule in _alert_rules():
        assert {"alert", "expr", "labels", "annotations"} <= set(rule)
        assert rule["labels"]["severity"] in ("warning", "critical")
    (prometheus,) = _docs(DEPLOY / "prometheus" / "prometheus.yml")
    assert any(f.endswith("alerts.yaml") for f in prometheus["rule_files"])


def _queried_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is queried (dashboard, alert rules, autoscaler)."""
    queries: list[tuple[str, str]] = []
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "agentfabric.json").read_text())
    for panel in dashboard["panels"]:
        queries += [("dashboard", t["expr"]) for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        queries.append(("dashboard", variable["definition"]))
    queries += [("alerts", r["expr"]) for r in _alert_rules()]
    for scaled in _of_kind("ScaledObject"):
        queries += [("keda", t["metadata"].get("query", "")) for t in scaled["spec"]["triggers"]]
    found: dict[str, set[str]] = {}
    for where, query in queries:
        for name in METRIC.findall(query):
            found.setdefault(name, set()).add(where)
    return found


def _string_literals() -> set[str]:
    literals: set[str] = set()
    for package in SOURCE_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    literals.add(node.value)
    return literals


def _family(name: str) -> str:
    for suffix in EXPOSITION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_queried_metric_exists_in_the_code() -> None:
    queried = _queried_metrics()
    assert len(queried) >= 10
    literals = _string_literals()
    missing = {name: sorted(where) for name, where in queried.items()
               if name not in literals and _family(name) not in literals}
    assert not missing, f"queried but defined nowhere in the code: {missing}"


def test_dashboard_panels_have_unique_ids_and_the_prometheus_datasource() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "agentfabric.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    (datasources,) = _docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    uid = datasources["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dashboard["panels"])
