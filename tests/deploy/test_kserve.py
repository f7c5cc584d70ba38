"""The chart's KServe mode: a ServingRuntime and an InferenceService per serving unit, rendered by real
Helm and validated against KServe's own CRD schemas (tests/fixtures/kserve) as the API server would:
types, required fields, and no field the schema does not know (a typo would be pruned silently)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from .test_helm import kubernetes_validate, of_kind, render

jsonschema = pytest.importorskip("jsonschema")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kserve"
H100 = {"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}


def crd_schema(name: str) -> dict:
    return json.loads(gzip.decompress((FIXTURES / f"{name}.schema.json.gz").read_bytes()))


def unknown_fields(value, schema: dict, where: str = "") -> list[str]:
    """Fields of `value` a structural CRD schema does not declare (what the API server would prune)."""
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        open_ended = schema.get("additionalProperties") or schema.get("x-kubernetes-preserve-unknown-fields")
        for key, item in value.items():
            if key in schema["properties"]:
                found += unknown_fields(item, schema["properties"][key], f"{where}.{key}")
            elif not open_ended:
                found.append(f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{where}[{index}]")
    return found


def check_against_crd(doc: dict) -> None:
    name = doc["kind"].lower()
    crd = crd_schema(name)
    assert doc["apiVersion"] == f"{crd['group']}/{crd['version']}"
    jsonschema.validate(doc, crd["schema"])
    assert unknown_fields(doc["spec"], crd["schema"]["properties"]["spec"], "spec") == []


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "cpu+h100"])
def test_kserve_objects_are_valid_against_kserves_crds(gpu) -> None:
    docs = render({"kserve": {"enabled": True}, "gpuClasses": [H100] if gpu else []})
    runtimes, services = of_kind(docs, "ServingRuntime"), of_kind(docs, "InferenceService")
    assert len(runtimes) == len(services) == (2 if gpu else 1)
    for doc in runtimes + services:
        check_against_crd(doc)
    for doc in docs:
        if not doc["apiVersion"].startswith("serving.kserve.io/"):
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
    assert not of_kind(docs, "Deployment") and not of_kind(docs, "Service")  # KServe makes them


def test_the_validator_catches_a_typo_and_a_wrong_type() -> None:
    (runtime,) = of_kind(render({"kserve": {"enabled": True}}), "ServingRuntime")
    runtime["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(AssertionError):
        check_against_crd(runtime)
    del runtime["spec"]["containers"][0]["imagePullPolicyy"]
    runtime["spec"]["multiModel"] = "no"
    with pytest.raises(jsonschema.ValidationError):
        check_against_crd(runtime)


def test_runtime_probes_ports_gpus_and_engine_cache() -> None:
    docs = render({"kserve": {"enabled": True}, "gpuClasses": [{**H100, "buildMinutes": 30}]})
    runtimes = {doc["metadata"]["name"]: doc for doc in of_kind(docs, "ServingRuntime")}
    gpu = runtimes["pid-pidserve-h100"]["spec"]
    container = gpu["containers"][0]
    assert container["name"] == "kserve-container"
    assert container["ports"] == [{"name": "http1", "containerPort": 8000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["failureThreshold"] * 10 == (30 + 15) * 60  # build + load budget
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (
        "pidserve build --if-stale" in container["args"][0] and "exec pidserve serve" in container["args"][0]
    )
    assert {"name": "engines", "mountPath": "/engines"} in container["volumeMounts"]
    assert gpu["volumes"][-1]["persistentVolumeClaim"]["claimName"] == "pid-pidserve-engines"
    assert gpu["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert gpu["supportedModelFormats"][0]["name"] == "pidserve" and gpu["protocolVersions"] == ["v2"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PIDSERVE_BACKEND"] == "tensorrt" and env["PIDSERVE_DEVICE"] == "cuda"
    services = {doc["metadata"]["name"]: doc for doc in of_kind(docs, "InferenceService")}
    model = services["pid-pidserve-h100"]["spec"]["predictor"]["model"]
    assert model["runtime"] == "pid-pidserve-h100" and model["modelFormat"]["name"] == "pidserve"
    assert of_kind(docs, "PersistentVolumeClaim")  # the engine cache


def test_grpc_mode_exposes_the_grpc_port() -> None:
    (runtime,) = of_kind(render({"kserve": {"enabled": True, "grpc": True}}), "ServingRuntime")
    container = runtime["spec"]["containers"][0]
    assert container["ports"] == [{"name": "h2c", "containerPort": 8001, "protocol": "TCP"}]
    assert {"name": "PIDSERVE_GRPC_PORT", "value": "8001"} in container["env"]
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    check_against_crd(runtime)
