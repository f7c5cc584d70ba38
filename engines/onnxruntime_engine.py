"""The `onnxruntime` backend: the exported condition/step graphs on ONNX Runtime's CPU provider.

The sampler arithmetic between steps is the shared torch implementation (`student_steps`), so
this backend differs from eager torch only inside the network graphs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from pidserve import kernels
from pidserve.model import PiDConfig, student_steps, student_timesteps

from .base import (
    DecodeBatch,
    DecodeResult,
    Engine,
    EngineCapabilities,
    EngineConfigError,
    ShapeProfile,
    StageTimer,
    seeded_noises,
    stoppable,
)

log = logging.getLogger(__name__)

PROVIDER = "CPUExecutionProvider"


class OnnxRuntimeEngine(Engine):
    """Runs an export directory (condition.onnx, step.onnx, export.json) on ONNX Runtime, CPU."""

    backend = "onnxruntime"

    def __init__(self, export_dir: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineConfigError("the onnxruntime backend needs `pip install pidserve[onnx]`") from exc
        export_dir = Path(export_dir)
        meta_path = export_dir / "export.json"
        if not meta_path.is_file():
            raise EngineConfigError(
                f"{export_dir} is not an ONNX export (no export.json); run `pidserve export`"
            )
        meta = json.loads(meta_path.read_text())
        self.cfg = PiDConfig.from_dict(meta["config"])
        raw = meta["profile"]
        self.profile = ShapeProfile(tuple(raw["image_size"]), tuple(raw["batch_sizes"]), raw["text_tokens"])

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        # Explicit provider list: ONNX Runtime must not pick another provider behind our back.
        self._condition = ort.InferenceSession(
            str(export_dir / "condition.onnx"), options, providers=[PROVIDER]
        )
        self._step = ort.InferenceSession(str(export_dir / "step.onnx"), options, providers=[PROVIDER])
        self._condition_outputs = [o.name for o in self._condition.get_outputs()]
        self._step_inputs = {i.name for i in self._step.get_inputs()}
        cfg = self.cfg
        self._caps = EngineCapabilities(
            backend=self.backend,
            device="cpu",
            precision="fp32",
            latent_channels=cfg.latent_channels,
            latent_space=cfg.latent_space,
            text_dim=cfg.text_dim,
            output_scale=cfg.output_scale,
            max_batch=self.profile.max_batch,
            image_sizes=(self.profile.image_size,),
            text_tokens=(self.profile.text_tokens,),
        )
        log.info(
            "engine: backend=onnxruntime provider=%s threads=%d export=%s",
            PROVIDER,
            options.intra_op_num_threads,
            export_dir,
        )

    @property
    def capabilities(self) -> EngineCapabilities:
        return self._caps

    def decode(self, batch: DecodeBatch) -> DecodeResult:
        self._caps.check(batch)
        timer = StageTimer(torch.device("cpu"))
        height, width = self.profile.image_size
        with timer.stage("noise"):
            noises = seeded_noises(
                batch.seeds, (batch.size, 3, height, width), batch.steps, torch.device("cpu")
            )
        with timer.stage("condition"):
            feeds = {"latent": _np(batch.latents)}
            if batch.text is not None:
                feeds["text"] = _np(batch.text)
            features = dict(zip(self._condition_outputs, self._condition.run(None, feeds), strict=True))
        sigma = _np(batch.sigmas)

        def velocity(x_t: torch.Tensor, t_scaled: torch.Tensor) -> torch.Tensor:
            step_feeds = {"x_t": _np(x_t), "t_scaled": _np(t_scaled), "sigma": sigma, **features}
            step_feeds = {k: v for k, v in step_feeds.items() if k in self._step_inputs}
            return torch.from_numpy(self._step.run(None, step_feeds)[0])

        with timer.stage("steps"):
            draws = iter(noises)
            x0 = student_steps(stoppable(velocity, batch), draws.__next__, student_timesteps(batch.steps))
        with timer.stage("postprocess"):
            images = kernels.postprocess(x0)
        return DecodeResult(images=images, timings=timer.result())


def _np(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())
