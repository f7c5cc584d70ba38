"""The documents the KServe v2 / Triton routes return, for HTTP (kserve.py) and gRPC (grpc_service.py):
the model metadata, and Triton's model configuration and statistics for the tools that read them
(perf_analyzer, tritonclient's get_model_config() and get_inference_statistics()).

    model_metadata(loader) GET /v2/models/{name}: the v2 protocol's model metadata
    model_config(loader)   GET /v2/models/{name}/config: Triton's ModelConfig in its JSON mapping
    model_stats(loader)    GET /v2/models[/{name}]/stats: Triton's statistics extension, read from the same
                           Prometheus series /metrics exposes (metrics.py), so the two always agree

How our figures map onto Triton's (docs/clients.md):
    inference_count  images decoded (pidserve_images_total)
    execution_count  engine batches (pidserve_batch_size count)
    success / fail   decode requests that returned images / that failed once they reached the service
                     (pidserve_inference_duration_seconds{outcome}), with their total time
    queue            time latents waited for a batch (pidserve_queue_seconds)
    compute_input    request bodies read into tensors (pidserve_parse_seconds)
    compute_infer    engine time per batch (pidserve_compute_seconds)
    compute_output   output encoding (pidserve_encode_seconds, all formats)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.metrics import MetricWrapperBase

    from .loader import ModelLoader

VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]


def model_metadata(loader: ModelLoader) -> dict[str, Any]:
    info = loader.require_ready()
    return {
        "name": loader.name,
        "versions": [VERSION],
        "platform": f"pidserve_{info.backend}",
        "inputs": [
            {"name": "latent", "datatype": "FP32", "shape": [-1, info.latent_channels, -1, -1]},
            {"name": "sigma", "datatype": "FP32", "shape": [-1], "optional": True},
            {"name": "seed", "datatype": "INT64", "shape": [-1], "optional": True},
        ],
        "outputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
    }


def model_config(loader: ModelLoader) -> dict[str, Any]:
    """The served model as Triton describes a model: batching on the first dimension (max_batch_size),
    each input's dims without it, the optional inputs marked, the dynamic batcher's settings."""
    info = loader.require_ready()
    settings = loader.settings
    caps = loader.engine.capabilities if loader.engine is not None else None
    preferred = list(caps.served_batch_sizes) if caps is not None and caps.batch_sizes else []
    gpu = info.device.startswith("cuda")
    instance: dict[str, Any] = {
        "name": f"{loader.name}_0",
        "kind": "KIND_GPU" if gpu else "KIND_CPU",
        "count": 1,
    }
    if gpu:
        instance["gpus"] = [int(info.device.partition(":")[2] or 0)]
    return {
        "name": loader.name,
        "platform": "",
        "backend": f"pidserve_{info.backend}",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": info.max_batch,
        "input": [
            {
                "name": "latent",
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NONE",
                "dims": [info.latent_channels, -1, -1],
            },
            # [B] on the wire: dims [1] reshaped to [] (Triton's spelling of a per-sample scalar)
            {
                "name": "sigma",
                "data_type": "TYPE_FP32",
                "dims": [1],
                "reshape": {"shape": []},
                "optional": True,
            },
            {
                "name": "seed",
                "data_type": "TYPE_INT64",
                "dims": [1],
                "reshape": {"shape": []},
                "optional": True,
            },
        ],
        "output": [{"name": "image", "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]}],
        "dynamic_batching": {
            "preferred_batch_size": preferred,
            "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000),
        },
        "instance_group": [instance],
        "parameters": {
            "latent_space": {"string_value": info.latent_space},
            "output_scale": {"string_value": str(info.output_scale)},
            "precision": {"string_value": info.precision},
        },
    }


def model_stats(loader: ModelLoader) -> dict[str, Any]:
    """Triton's $stats_model_response for the one served model."""
    metrics = loader.metrics
    success_n, success_s = _histogram(metrics.inference_seconds, outcome="success")
    fail_n, fail_s = _histogram(metrics.inference_seconds, outcome="fail")
    queue_n, queue_s = _histogram(metrics.queue_seconds)
    parse_n, parse_s = _histogram(metrics.parse_seconds)
    compute_n, compute_s = _histogram(metrics.compute_seconds)
    encode_n, encode_s = _histogram(metrics.encode_seconds)  # every format
    executions, _ = _histogram(metrics.batch_size)
    return {
        "model_stats": [
            {
                "name": loader.name,
                "version": VERSION,
                "last_inference": int(_gauge(metrics.last_inference) * 1e3),  # ms since the epoch
                "inference_count": int(_counter(metrics.images)),
                "execution_count": executions,
                "inference_stats": {
                    "success": _duration(success_n, success_s),
                    "fail": _duration(fail_n, fail_s),
                    "queue": _duration(queue_n, queue_s),
                    "compute_input": _duration(parse_n, parse_s),
                    "compute_infer": _duration(compute_n, compute_s),
                    "compute_output": _duration(encode_n, encode_s),
                    "cache_hit": _duration(0, 0.0),
                    "cache_miss": _duration(0, 0.0),
                },
                "batch_stats": [],
            }
        ]
    }


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": int(seconds * 1e9)}


def _samples(metric: MetricWrapperBase) -> list:
    return [sample for family in metric.collect() for sample in family.samples]


def _histogram(metric: MetricWrapperBase, **labels: str) -> tuple[int, float]:
    """(count, sum) of a histogram's series with these labels."""
    count = total = 0.0
    for sample in _samples(metric):
        if any(sample.labels.get(k) != v for k, v in labels.items()):
            continue
        if sample.name.endswith("_count"):
            count += sample.value
        elif sample.name.endswith("_sum"):
            total += sample.value
    return int(count), total


def _gauge(metric: MetricWrapperBase) -> float:
    return sum(sample.value for sample in _samples(metric))


def _counter(metric: MetricWrapperBase) -> float:
    return sum(sample.value for sample in _samples(metric) if sample.name.endswith("_total"))
