"""Cluster files validated offline: the KubeRay RayCluster / RayJob against the operator's CRD schemas
(``../shared/kuberay-crds/``), their pod templates and the ServiceAccount against Kubernetes' own
schemas (kubernetes-validate, strict), and ray_cluster.yaml against Ray's cluster launcher schema.
Plus the policies the manifests promise: IRSA not keys, no public dashboard, autoscaled GPU group, an
entrypoint whose config loads."""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from thinkrec import config as C

REPO = Path(__file__).parents[1]
CRDS = REPO.parent / "shared" / "kuberay-crds"
K8S_VERSION = "1.37.0"
MANIFESTS = ("cluster/raycluster.yaml", "cluster/rayjob.yaml")
SECRET_ENV = re.compile(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)|SECRET|PASSWORD|TOKEN", re.I)


def _docs(rel: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((REPO / rel).read_text()) if d]


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields made errors: the API server silently prunes them, which
    hides typos such as ``minReplica``. Objects that preserve unknown fields stay open."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{kind} CRD has no version {version}")


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pod_templates(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = _cluster_spec(doc)
    out = {"head": spec["headGroupSpec"]["template"]}
    out.update({f"worker:{g['groupName']}": g["template"] for g in spec.get("workerGroupSpecs", [])})
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out["submitter"] = doc["spec"]["submitterPodTemplate"]
    return out


def _validate_crd(doc: dict[str, Any]) -> None:
    schema = _crd_schema(doc["kind"], doc["apiVersion"])
    jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)(schema).validate(doc)


def _validate_k8s(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _as_pod_template(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def _ray_docs() -> list[dict[str, Any]]:
    return [d for rel in MANIFESTS for d in _docs(rel) if d["apiVersion"].startswith("ray.io/")]


# -- schemas --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", MANIFESTS)
def test_manifests_validate(rel):
    docs = _docs(rel)
    kinds = [d["kind"] for d in docs]
    assert {"RayCluster", "RayJob"} & set(kinds), f"{rel} holds no KubeRay resource"
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1"
            _validate_crd(doc)
            for name, template in _pod_templates(doc).items():
                _validate_k8s(
                    _as_pod_template(f"{doc['metadata']['name']}-{name.replace(':', '-')}", template)
                )
        else:
            _validate_k8s(doc)


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: _cluster_spec(d)["workerGroupSpecs"][1].update(minReplica=0), "crd"),  # typo
        (lambda d: _cluster_spec(d)["workerGroupSpecs"][1].pop("maxReplicas"), "crd"),  # required
        (lambda d: _cluster_spec(d)["headGroupSpec"].update(serviceType=3), "crd"),  # wrong type
        (lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"), "pod"),
        (
            lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                imagePullPolicy=1
            ),
            "pod",
        ),
        (
            lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"].update(serviceAcountName="x"),
            "pod",
        ),
    ],
)
def test_validators_catch_broken_manifests(mutate, where):
    """The checks above can fail: each mutation of a valid manifest is rejected by its validator."""
    import kubernetes_validate

    doc = copy.deepcopy(next(d for d in _docs("cluster/raycluster.yaml") if d["kind"] == "RayCluster"))
    mutate(doc)
    if where == "crd":
        with pytest.raises(jsonschema.ValidationError):
            _validate_crd(doc)
    else:
        with pytest.raises(kubernetes_validate.ValidationError):
            _validate_k8s(_as_pod_template("broken", _pod_templates(doc)["head"]))


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_ray_cluster_yaml_validates():
    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    schema = _ray_schema()
    jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)(schema).validate(cfg)
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_worker"]["resources"] = {"GPU": -1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# -- policies -------------------------------------------------------------------------------------
def test_ray_cluster_yaml_policies():
    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    for name in ("cpu_worker", "gpu_worker"):
        t = types[name]
        assert 0 <= t["min_workers"] < t["max_workers"] <= cfg["max_workers"], f"{name} does not autoscale"
    assert "--gpus all" in types["gpu_worker"]["docker"]["worker_run_options"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # dashboard not on a public interface
    text = (REPO / "ray_cluster.yaml").read_text()
    assert not SECRET_ENV.search(text.replace("IamInstanceProfile", ""))  # role, not keys
    for t in types.values():
        assert "IamInstanceProfile" in t["node_config"]


def test_kuberay_policies():
    docs = _ray_docs()
    assert {d["kind"] for d in docs} == {"RayCluster", "RayJob"}
    sa = [d for d in _docs("cluster/raycluster.yaml") if d["kind"] == "ServiceAccount"]
    assert len(sa) == 1 and "eks.amazonaws.com/role-arn" in sa[0]["metadata"]["annotations"]
    for doc in docs:
        spec = _cluster_spec(doc)
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress", False)
        assert spec["enableInTreeAutoscaling"] is True
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}
        for g in groups.values():
            assert (
                0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
                and g["minReplicas"] < g["maxReplicas"]
            )
        gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
        assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"
        for name, t in _pod_templates(doc).items():
            assert t["spec"]["serviceAccountName"] == sa[0]["metadata"]["name"], (
                f"{name}: not on the IRSA account"
            )
            for c in t["spec"]["containers"]:
                names = [e["name"] for e in c.get("env", [])]
                assert not [n for n in names if SECRET_ENV.search(n)], f"{name}: credentials in env {names}"
                assert not c.get("envFrom"), f"{name}: env from a secret"
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert "runtimeEnvYAML" not in job["spec"]  # nothing (least of all credentials) in runtime_env


def test_rayjob_entrypoint_config_loads():
    job = next(d for d in _ray_docs() if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "jobs.pipeline", "--config"]
    path = REPO / argv[4]
    assert path.is_file(), f"entrypoint config {argv[4]} is not in the repository"
    cfg = C.load(path, argv[5:])  # unknown keys or bad values would raise here
    assert cfg.storage.output_root.startswith("s3://")
