"""Prometheus metrics (`pidserve_` prefix, base units), in a registry of their own per app.

GPU series (utilisation, memory, power) come from NVML through nvidia-ml-py and exist only when NVML
finds a GPU: without one they are simply not exported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Seconds: from a few ms (tiny models, cache hits) to the tens of seconds a 4k batch can take on a small GPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pidserve_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "pidserve_request_duration_seconds",
            "Total time of a request in the server, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "pidserve_queue_seconds",
            "Time a latent waited in the batch queue.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "pidserve_compute_seconds", "Engine time per batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.encode_seconds = Histogram(
            "pidserve_encode_seconds",
            "Output encoding time per request, by format.",
            ["format"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "pidserve_batch_size", "Latents per engine batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "pidserve_inference_duration_seconds",
            "Decode requests from validation to encoded images, by outcome (success, fail).",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.parse_seconds = Histogram(
            "pidserve_parse_seconds", "Request bodies read into tensors.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.last_inference = Gauge(
            "pidserve_last_inference_timestamp_seconds", "When the last decode request finished.", registry=r
        )
        self.queue_depth = Gauge("pidserve_queue_depth", "Latents waiting in the batch queue.", registry=r)
        self.images = Counter("pidserve_images", "Images decoded.", registry=r)
        self.batch_failures = Counter("pidserve_batch_failures", "Engine batches that raised.", registry=r)
        self.dropped = Counter(
            "pidserve_dropped", "Queued latents dropped before compute, by reason.", ["reason"], registry=r
        )
        self.model = Info("pidserve_model", "The loaded model and the engine serving it.", registry=r)
        self.ready = Gauge("pidserve_ready", "1 once the engine is loaded and warmed up.", registry=r)
        gpu = NvmlCollector.create()
        if gpu is not None:
            r.register(gpu)


class NvmlCollector(Collector):
    """Per-GPU utilisation, memory and power, read from NVML at scrape time."""

    def __init__(self, nvml) -> None:
        self.nvml = nvml

    @classmethod
    def create(cls) -> NvmlCollector | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() == 0:
                return None
        except Exception as exc:  # no driver, no library, no GPU: the GPU series are not exported
            log.debug("NVML unavailable (%s): GPU metrics are not exported", exc)
            return None
        return cls(pynvml)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self.nvml
        util = GaugeMetricFamily(
            "pidserve_gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=["gpu"]
        )
        used = GaugeMetricFamily("pidserve_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("pidserve_gpu_memory_total_bytes", "GPU memory.", labels=["gpu"])
        power = GaugeMetricFamily("pidserve_gpu_power_watts", "GPU power draw.", labels=["gpu"])
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            label = [str(index)]
            util.add_metric(label, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric(label, float(memory.used))
            total.add_metric(label, float(memory.total))
            power.add_metric(label, nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        yield from (util, used, total, power)
