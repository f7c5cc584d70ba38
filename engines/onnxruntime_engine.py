"""The `onnxruntime` backend: the exported condition/step graphs on ONNX Runtime's CPU provider.

The sampler arithmetic between steps is the shared torch implementation (`student_steps`), so
this backend differs from eager torch only inside the network graphs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pidserve import kernels
from pidserve.model import TILING_OFF, PiDConfig, TilePlan, Tiling, student_steps, student_timesteps

from .base import (
    DecodeBatch,
    DecodeResult,
    Engine,
    EngineCapabilities,
    EngineConfigError,
    ShapeProfile,
    StageTimer,
    engine_window_latents,
    seeded_noise_stream,
    seeded_noises,
    stoppable,
)
from .tiled import decode_tiled

log = logging.getLogger(__name__)

PROVIDER = "CPUExecutionProvider"


class OnnxRuntimeEngine(Engine):
    """Runs an export directory (condition.onnx, step.onnx, export.json) on ONNX Runtime, CPU."""

    backend = "onnxruntime"

    def __init__(
        self,
        export_dir: str | Path,
        threads: int | None = None,
        tiling: Tiling = TILING_OFF,
        window_latents: str = "auto",
    ) -> None:
        """tiling: the default of batches that name none; windows are the export's one image size.
        window_latents: what each window is conditioned on (model/window_latents.py)."""
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
            tiling=tiling,
            native_size=self.profile.image_size,
        )
        self.window_latents = engine_window_latents(window_latents, cfg.latent_space)
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
        plan = self._caps.plan(batch)
        timer = StageTimer(torch.device("cpu"))
        height, width = self._caps.image_size(batch.latents.shape[-2:])
        shape = (batch.size, 3, height, width)
        if plan is not None:  # the noise is drawn step by step inside
            with timer.stage("tiled"):
                x0 = self._decode_tiled(
                    plan, batch, seeded_noise_stream(batch.seeds, shape, torch.device("cpu"))
                )
        else:
            with timer.stage("noise"):
                noises = seeded_noises(batch.seeds, shape, batch.steps, torch.device("cpu"))
            with timer.stage("condition"):
                features = self._features(batch.latents, batch.sigmas, batch.text)
            with timer.stage("steps"):
                draws = iter(noises)
                velocity = stoppable(lambda x, t: self._velocity(features, x, t), batch)
                x0 = student_steps(velocity, draws.__next__, student_timesteps(batch.steps))
        with timer.stage("postprocess"):
            images = kernels.postprocess(x0)
        return DecodeResult(images=images, timings=timer.result(), windows=1 if plan is None else plan.count)

    def _decode_tiled(
        self, plan: TilePlan, batch: DecodeBatch, draw: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """Windows of the export's size, up to its largest batch of window rows per graph run."""
        return decode_tiled(
            plan,
            batch,
            batch.latents,
            batch.sigmas,
            batch.text,
            draw,
            self.profile.max_batch,
            self._features,
            self._velocity,
            window_latents=self.window_latents,
        )

    def _features(
        self, latent: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor | None
    ) -> dict[str, np.ndarray]:
        """condition.onnx's outputs (and the sigma the step graph reads) for these rows."""
        feeds = {"latent": _np(latent)}
        if text is not None:
            feeds["text"] = _np(text)
        features = dict(zip(self._condition_outputs, self._condition.run(None, feeds), strict=True))
        return {**features, "sigma": _np(sigma)}

    def _velocity(
        self, features: dict[str, np.ndarray], x_t: torch.Tensor, t_scaled: torch.Tensor
    ) -> torch.Tensor:
        step_feeds = {"x_t": _np(x_t), "t_scaled": _np(t_scaled), **features}
        step_feeds = {k: v for k, v in step_feeds.items() if k in self._step_inputs}
        return torch.from_numpy(self._step.run(None, step_feeds)[0])


def _np(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())
