"""The Helm chart, rendered by a real Helm engine (helm-python-sdk embeds Helm's Go library), validated
against the Kubernetes API schemas, and checked for the properties the deployment relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

CHART = Path(__file__).resolve().parents[2] / "helm" / "pidserve"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"


def render(values: dict | None = None) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values, name="pid", namespace="decode")
    return [
        doc
        for path, text in manifests.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def example(name: str) -> dict:
    return yaml.safe_load((CHART / "examples" / f"{name}.yaml").read_text())


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("values_file", [None, *EXAMPLES], ids=lambda p: "default" if p is None else p.stem)
def test_every_manifest_is_valid_kubernetes(values_file) -> None:
    docs = render(yaml.safe_load(values_file.read_text()) if values_file else None)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD (Prometheus Operator): not in the core schemas; checked below
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_lint_is_clean() -> None:
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_serves_the_embedded_model_on_cpu() -> None:
    docs = render()
    (deployment,) = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PIDSERVE_CHECKPOINT"] == "default" and env["PIDSERVE_DEVICE"] == "cpu"
    assert container["image"].endswith(":0.1.0-cpu")
    assert "initContainers" not in pod and not of_kind(docs, "PersistentVolumeClaim")
    assert "nvidia.com/gpu" not in str(container["resources"])


def test_one_deployment_per_gpu_class_with_selector_tolerations_and_gpus() -> None:
    docs = render(example("three-gpu-classes"))
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    assert set(deployments) == {"pid-pidserve-gb200", "pid-pidserve-h100", "pid-pidserve-rtx5090"}
    products = {
        "gb200": "NVIDIA-GB200",
        "h100": "NVIDIA-H100-80GB-HBM3",
        "rtx5090": "NVIDIA-GeForce-RTX-5090",
    }
    for name, product in products.items():
        pod = deployments[f"pid-pidserve-{name}"]["spec"]["template"]["spec"]
        assert pod["nodeSelector"]["nvidia.com/gpu.product"] == product
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    # TensorRT classes build their own engines; torch-compile does not need any.
    gb200 = deployments["pid-pidserve-gb200"]["spec"]["template"]["spec"]
    (init,) = gb200["initContainers"]
    command = init["command"] + init["args"]
    assert command[:4] == ["flock", "/engines/gb200-fp8-4096x4096-b4.lock", "pidserve", "build"]
    assert "--if-stale" in command and "--gpu-class=gb200" in command and "--precision=fp8" in command
    assert "--output=/engines/gb200-fp8-4096x4096-b4" in command
    assert "--calibration-latents=/models/calibration/sd3-latents.safetensors" in command
    assert {"name": "HOME", "value": "/tmp"} in init["env"]  # read-only root: caches go to /tmp
    env = {e["name"]: e.get("value") for e in gb200["containers"][0]["env"]}
    assert env["PIDSERVE_ENGINE_DIR"] == "/engines/gb200-fp8-4096x4096-b4"
    assert env["PIDSERVE_BACKEND"] == "tensorrt" and env["PIDSERVE_DEVICE"] == "cuda"
    rtx = deployments["pid-pidserve-rtx5090"]["spec"]["template"]["spec"]
    assert "initContainers" not in rtx
    rtx_env = {e["name"]: e.get("value") for e in rtx["containers"][0]["env"]}
    assert rtx_env["PIDSERVE_IMAGE_SIZES"] == '["2048x2048"]'
    (pvc,) = of_kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_probes_and_startup_budgets() -> None:
    docs = render(example("three-gpu-classes"))
    for deployment in of_kind(docs, "Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    by_name = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    rtx = by_name["pid-pidserve-rtx5090"]
    probe = rtx["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["failureThreshold"] * probe["periodSeconds"] == 30 * 60  # startupMinutes: 30
    # the rollout deadline covers the engine build (60 min default) plus the start-up budget
    assert by_name["pid-pidserve-h100"]["spec"]["progressDeadlineSeconds"] >= (60 + 15) * 60


def test_pod_security() -> None:
    for doc in of_kind(render(example("one-gpu-class")), "Deployment"):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {"/tmp", "/dev/shm"} <= mounts  # writable scratch with a read-only root


def test_api_key_comes_from_a_secret_file() -> None:
    (deployment,) = of_kind(render(example("one-gpu-class")), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["PIDSERVE_API_KEY_FILE"] == "/var/run/secrets/pidserve/api-key"
    assert "PIDSERVE_API_KEY" not in env
    (volume,) = [v for v in pod["volumes"] if v["name"] == "api-key"]
    assert volume["secret"]["secretName"] == "pidserve-api-key"


def test_autoscaling_on_queue_depth_and_service_monitor() -> None:
    docs = render(example("autoscaling"))
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "pidserve_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert hpa["spec"]["scaleTargetRef"]["name"] == "pid-pidserve-h100"
    (deployment,) = of_kind(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (service,) = of_kind(docs, "Service")
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "metrics"}
    assert of_kind(docs, "PodDisruptionBudget")[0]["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize(
    "values, words",
    [
        ({"gpuClasses": [{"name": "h100", "gpuProduct": "x", "precison": "fp8"}]}, "precison"),
        ({"gpuClasses": [{"name": "a100", "gpuProduct": "x"}]}, "gpuClasses/0/name"),
        ({"gpuClasses": [{"name": "h100", "gpuProduct": "x", "imageSize": "2048"}]}, "imageSize"),
        ({"gpuClasses": [{"name": "h100"}]}, "gpuProduct"),
        ({"autoscalling": {"enabled": True}}, "autoscalling"),
        ({"server": {"pngEncoder": "gif"}}, "pngEncoder"),
    ],
)
def test_schema_rejects_typos_and_bad_values(values, words) -> None:
    with pytest.raises(helm.HelmValuesError, match=words):
        render(values)


def test_attention_kernel_is_set_per_torch_class_and_refused_for_tensorrt() -> None:
    h100 = {"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "backend": "torch-compile"}
    docs = render({"gpuClasses": [h100 | {"attentionBackend": "cudnn"}], "cpu": {"enabled": False}})
    (deployment,) = of_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PIDSERVE_ATTENTION_BACKEND"] == "cudnn"
    tensorrt = render({"gpuClasses": [h100 | {"backend": "tensorrt"}], "cpu": {"enabled": False}})
    env = {
        e["name"]
        for e in of_kind(tensorrt, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert "PIDSERVE_ATTENTION_BACKEND" not in env  # the engine's kernels are TensorRT's
    with pytest.raises(helm.HelmError, match="attentionBackend applies to the torch backends only"):
        render({"gpuClasses": [h100 | {"backend": "tensorrt", "attentionBackend": "cudnn"}]})
    with pytest.raises(helm.HelmValuesError, match="attentionBackend"):
        render({"gpuClasses": [h100 | {"attentionBackend": "fa3"}]})


def test_the_charts_attention_kernels_are_the_engines() -> None:
    # Written out in three places (engines/attention.py, the server's settings, the values schema):
    # they must not drift apart.
    import json
    from typing import get_args

    from pidserve.engines.attention import ATTENTION_BACKENDS
    from pidserve.server import ServerSettings

    schema = json.loads((CHART / "values.schema.json").read_text())
    unit = schema["properties"]["gpuClasses"]["items"]["properties"]
    assert tuple(unit["attentionBackend"]["enum"]) == ATTENTION_BACKENDS
    assert get_args(ServerSettings.model_fields["attention_backend"].annotation) == ATTENTION_BACKENDS
