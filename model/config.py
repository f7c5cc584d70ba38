"""PiDConfig: every structural field of a PiD network, with presets for the released variants.

Field names are ours; `PiDConfig.from_official` maps the official constructor arguments
(nv-tlabs/PiD `PidNet(**kwargs)`) onto them and refuses options no released model uses,
so a config either builds exactly the official network or fails loudly.

`parse_image_size` reads an output size written HEIGHTxWIDTH (every command and setting that takes one).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

GateType = Literal["per_token", "per_token_per_dim"]
PaddingMode = Literal["zeros", "replicate"]


@dataclass(frozen=True)
class PiDConfig:
    """The shape of a PiD network. Defaults are the released full-size backbone.

    Naming: "patch" = the 16x16-patch transformer (14 blocks), "pixel" = the per-pixel
    blocks that write the image, "adapter" = the convolutional trunk that turns the
    latent into per-patch features injected through sigma-aware gates.
    """

    # Backbone (identical in every released variant).
    hidden_size: int = 1536
    num_heads: int = 24
    patch_size: int = 16
    patch_depth: int = 14
    pixel_hidden_size: int = 16
    pixel_attn_hidden_size: int = 1152
    pixel_num_heads: int = 16
    pixel_depth: int = 2
    in_channels: int = 3
    text_dim: int = 2304
    text_max_length: int = 300
    text_rope_theta: float = 10000.0
    # NTK-aware RoPE: the reference output size (pixels) at which theta is exactly 10000.
    rope_ref_size: tuple[int, int] = (1024, 1024)
    # The output size the checkpoint was trained at (what tile=auto cuts larger outputs into, see
    # tiling.py); None: rope_ref_size (the test models and the embedded default train at that size).
    trained_size: tuple[int, int] | None = None

    # Latent adapter and gates.
    latent_channels: int = 16
    latent_downsample: int = 8  # pixels per latent cell of the image the latent encodes
    latent_unpatchify: int = 1  # 2 for the v1.5 FLUX.2 net, which un-packs 128 ch -> 32 ch in-net
    sr_scale: int = 4  # output pixels per pixel of the image the latent encodes
    adapter_hidden: int = 512
    adapter_res_blocks: int = 4
    adapter_padding: PaddingMode = "zeros"
    gate_interval: int = 2  # a gate before every `gate_interval`-th patch block
    gate_type: GateType = "per_token_per_dim"
    pixel_gate: bool = False  # v1.5: one more gate on the per-patch conditioning of the pixel blocks
    aux_rgb_head: bool = False  # v1.5 training-only low-res RGB head (never used at inference)

    # Not structural: which latent space this network decodes (a name in pidserve.model.latents).
    latent_space: str = "flux1"

    # ---- derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def pixel_head_dim(self) -> int:
        return self.pixel_attn_hidden_size // self.pixel_num_heads

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU inner width: int(2 * 4D / 3), as the official blocks compute it."""
        return int(2 * (4 * self.hidden_size) / 3)

    @property
    def num_gates(self) -> int:
        return self.patch_depth // self.gate_interval

    @property
    def adapter_in_channels(self) -> int:
        """Channels entering the adapter trunk: after un-patchify, and space-to-depth when r < 1."""
        ratio = self.latent_to_patch_ratio
        fold = round(1 / ratio) if ratio < 1 else 1
        return self.latent_channels // (self.latent_unpatchify**2) * fold * fold

    @property
    def latent_to_patch_ratio(self) -> float:
        """Patch-grid cells per latent cell (after un-patchify): r = sr * (down / unpatchify) / P."""
        return self.sr_scale * (self.latent_downsample / self.latent_unpatchify) / self.patch_size

    @property
    def version(self) -> str:
        """ "v1.5" for nets with the pixel gate (scalar gates, replicate padding), else "v1"."""
        return "v1.5" if self.pixel_gate else "v1"

    @property
    def output_scale(self) -> int:
        """Output pixels per latent cell, per side: latent_downsample * sr_scale."""
        return self.latent_downsample * self.sr_scale

    def output_size(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        """Pixel size (H, W) of the image decoded from a latent of spatial size (h, w)."""
        return latent_h * self.output_scale, latent_w * self.output_scale

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.pixel_attn_hidden_size % self.pixel_num_heads:
            problems.append(
                f"pixel_attn_hidden_size {self.pixel_attn_hidden_size} is not divisible by "
                f"pixel_num_heads {self.pixel_num_heads}"
            )
        # 2D RoPE splits each head in x/y halves of rotation pairs: needs head_dim % 4 == 0.
        for name, dim in (("head_dim", self.head_dim), ("pixel_head_dim", self.pixel_head_dim)):
            if dim % 4:
                problems.append(f"{name} {dim} must be a multiple of 4 for 2D RoPE")
        if self.pixel_hidden_size % 4:
            problems.append(f"pixel_hidden_size {self.pixel_hidden_size} must be a multiple of 4")
        if self.patch_depth % self.gate_interval:
            problems.append(f"patch_depth {self.patch_depth} is not a multiple of gate_interval")
        if self.latent_channels % (self.latent_unpatchify**2):
            problems.append(f"latent_channels {self.latent_channels} is not divisible by latent_unpatchify^2")
        if self.adapter_hidden % 4:
            problems.append(f"adapter_hidden {self.adapter_hidden} must be divisible by 4 (GroupNorm(4))")
        if self.gate_type not in ("per_token", "per_token_per_dim"):
            problems.append(f"gate_type {self.gate_type!r} is not 'per_token' or 'per_token_per_dim'")
        if self.adapter_padding not in ("zeros", "replicate"):
            problems.append(f"adapter_padding {self.adapter_padding!r} is not 'zeros' or 'replicate'")
        if problems:
            raise ValueError("invalid PiDConfig: " + "; ".join(problems))

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_ref_size"] = list(self.rope_ref_size)
        d["trained_size"] = None if self.trained_size is None else list(self.trained_size)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PiDConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PiDConfig fields: {unknown}")
        d = dict(d)
        if "rope_ref_size" in d:
            d["rope_ref_size"] = tuple(int(v) for v in d["rope_ref_size"])
        if d.get("trained_size") is not None:
            d["trained_size"] = tuple(int(v) for v in d["trained_size"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @property
    def native_size(self) -> tuple[int, int]:
        """The output size (H, W) this network was trained at: the window of tile=auto."""
        return self.trained_size or self.rope_ref_size

    def replace(self, **changes: Any) -> PiDConfig:
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    @classmethod
    def preset(cls, name: str) -> PiDConfig:
        """A named preset: a released variant (e.g. "2k_flux") or a tiny test model ("tiny_v1")."""
        if name not in PRESETS:
            raise KeyError(f"unknown PiD preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def from_official(cls, source: str | Path | dict[str, Any], latent_space: str | None = None) -> PiDConfig:
        """Build from official constructor arguments.

        `source` is a path to (or the dict of) an official config: either the net kwargs
        themselves, a dict with "constructor_kwargs" (as in the test fixtures), or one with
        "model_config" -> "net" (a resolved experiment config).
        """
        if isinstance(source, (str, Path)):
            source = json.loads(Path(source).read_text())
        kwargs = dict(source)
        if "constructor_kwargs" in kwargs:
            kwargs = dict(kwargs["constructor_kwargs"])
        elif "model_config" in kwargs:
            kwargs = dict(kwargs["model_config"]["net"])
        elif "net_kwargs" in kwargs:
            kwargs = dict(kwargs["net_kwargs"])
        return _config_from_official_kwargs(kwargs, latent_space)


def official_kwargs(cfg: PiDConfig) -> dict[str, Any]:
    """The official PidNet constructor arguments of a config: from_official's inverse (the options no
    release varies get their released values, the training-only ones their defaults)."""
    kwargs: dict[str, Any] = {key: getattr(cfg, ours) for key, ours in _OFFICIAL_TO_OURS.items()}
    gate_types = {ours: official for official, ours in _OFFICIAL_GATE_TYPES.items()}
    kwargs["lq_gate_type"] = gate_types[cfg.gate_type]
    kwargs["rope_ref_h"], kwargs["rope_ref_w"] = cfg.rope_ref_size
    return {**kwargs, **_REQUIRED_OFFICIAL_VALUES}


# Official options whose value must be exactly this, because no released model uses another
# and this implementation does not build the alternative.
_REQUIRED_OFFICIAL_VALUES: dict[str, Any] = {
    "enable_ed": False,
    "lq_in_channels": 0,
    "lq_inject_mode": "controlnet",
    "rope_mode": "ntk_aware",
    "use_text_rope": True,
}
# Official options that have no numerical effect at inference (training taps, unused modules).
_IGNORED_OFFICIAL_KEYS = {
    "num_text_blocks", "repa_encoder_index", "ed_compress_ratio", "ed_depth_per_stage", "ed_window_size",
    "ed_num_heads", "ed_hidden_size", "ed_use_token_shuffle", "zero_init_lq", "train_lq_proj_only",
    "lq_aux_rgb_head_latent_block_idx",
}  # fmt: skip
# The official gate-type strings ("..._and_dim" appears in official docstrings but is rejected there too).
_OFFICIAL_GATE_TYPES = {
    "sigma_aware_per_token": "per_token",
    "sigma_aware_per_token_per_dim": "per_token_per_dim",
}
_OFFICIAL_TO_OURS = {
    "hidden_size": "hidden_size",
    "num_groups": "num_heads",
    "patch_size": "patch_size",
    "patch_depth": "patch_depth",
    "pixel_hidden_size": "pixel_hidden_size",
    "pixel_attn_hidden_size": "pixel_attn_hidden_size",
    "pixel_num_groups": "pixel_num_heads",
    "pixel_depth": "pixel_depth",
    "in_channels": "in_channels",
    "txt_embed_dim": "text_dim",
    "txt_max_length": "text_max_length",
    "text_rope_theta": "text_rope_theta",
    "lq_latent_channels": "latent_channels",
    "latent_spatial_down_factor": "latent_downsample",
    "lq_latent_unpatchify_factor": "latent_unpatchify",
    "sr_scale": "sr_scale",
    "lq_hidden_dim": "adapter_hidden",
    "lq_num_res_blocks": "adapter_res_blocks",
    "lq_conv_padding_mode": "adapter_padding",
    "lq_interval": "gate_interval",
    "pit_lq_inject": "pixel_gate",
    "lq_aux_rgb_head": "aux_rgb_head",
}


def _config_from_official_kwargs(kwargs: dict[str, Any], latent_space: str | None) -> PiDConfig:
    for key, required in _REQUIRED_OFFICIAL_VALUES.items():
        if key in kwargs and kwargs[key] != required:
            raise ValueError(
                f"official option {key}={kwargs[key]!r} is not supported (every released PiD uses "
                f"{key}={required!r})"
            )
    ours: dict[str, Any] = {}
    unknown = []
    for key, value in kwargs.items():
        if key in _OFFICIAL_TO_OURS:
            ours[_OFFICIAL_TO_OURS[key]] = value
        elif key == "lq_gate_type":
            if value not in _OFFICIAL_GATE_TYPES:
                raise ValueError(
                    f"official lq_gate_type {value!r} is not one of {sorted(_OFFICIAL_GATE_TYPES)}"
                )
            ours["gate_type"] = _OFFICIAL_GATE_TYPES[value]
        elif key in ("rope_ref_h", "rope_ref_w"):
            pass
        elif key not in _REQUIRED_OFFICIAL_VALUES and key not in _IGNORED_OFFICIAL_KEYS:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown official PidNet arguments: {sorted(unknown)}")
    # The official constructor's default reference size is 1024 (v1 configs never set it).
    ours["rope_ref_size"] = (int(kwargs.get("rope_ref_h", 1024)), int(kwargs.get("rope_ref_w", 1024)))
    ours["latent_space"] = latent_space or _guess_latent_space(ours)
    base = PiDConfig()
    cfg = dataclasses.replace(base, **ours)
    cfg.validate()
    return cfg


def _guess_latent_space(ours: dict[str, Any]) -> str:
    """The latent space a net most likely decodes, from its channel count (16 ch is ambiguous: flux1)."""
    by_channels = {4: "sdxl", 16: "flux1", 128: "flux2", 768: "dinov2-rae", 1152: "siglip2-rae"}
    return by_channels.get(int(ours.get("latent_channels", 16)), "flux1")


# ---- presets ------------------------------------------------------------------------------
def _v1(**changes: Any) -> PiDConfig:
    return dataclasses.replace(PiDConfig(trained_size=(2048, 2048)), **changes)


def _v1pt5(**changes: Any) -> PiDConfig:
    base = dataclasses.replace(
        PiDConfig(),
        adapter_hidden=1024,
        adapter_padding="replicate",
        gate_type="per_token",
        pixel_gate=True,
        aux_rgb_head=True,
        rope_ref_size=(2048, 2048),
        trained_size=(4096, 4096),  # every released v1.5 variant is a 2k -> 4k model
    )
    return dataclasses.replace(base, **changes)


def _tiny(**changes: Any) -> PiDConfig:
    """Tiny test models with the fixtures' shapes (hidden 32, 2 heads, 4 patch + 1 pixel block)."""
    base = dataclasses.replace(
        PiDConfig(),
        hidden_size=32,
        num_heads=2,
        patch_depth=4,
        pixel_hidden_size=8,
        pixel_attn_hidden_size=48,
        pixel_num_heads=2,
        pixel_depth=1,
        text_dim=32,
        text_max_length=16,
        adapter_hidden=32,
        rope_ref_size=(64, 64),
    )
    return dataclasses.replace(base, **changes)


# Preset names are the variant keys of the official released-model list.
PRESETS: dict[str, PiDConfig] = {
    "2k_flux": _v1(latent_space="flux1"),
    "2k_sd3": _v1(latent_space="sd3"),
    "2k_flux2": _v1(latent_channels=128, latent_downsample=16, latent_space="flux2"),
    "2k_rae": _v1(latent_channels=768, latent_downsample=16, latent_space="dinov2-rae"),
    "2k_scale_rae": _v1(latent_channels=1152, latent_downsample=16, sr_scale=8, latent_space="siglip2-rae"),
    "2kto4k_sd3": _v1(latent_space="sd3", trained_size=(4096, 4096)),
    "2kto4k_sdxl": _v1(latent_channels=4, latent_space="sdxl", trained_size=(4096, 4096)),
    "2kto4k_v1pt5_flux": _v1pt5(latent_space="flux1"),
    "2kto4k_v1pt5_flux2": _v1pt5(
        latent_channels=128, latent_downsample=16, latent_unpatchify=2, latent_space="flux2"
    ),
    "2kto4k_v1pt5_qwenimage": _v1pt5(latent_space="qwenimage"),
    # Test-sized analogues of a v1 FLUX student and a v1.5 FLUX.2 student (the fixtures' models).
    "tiny_v1": _tiny(latent_space="flux1"),
    "tiny_v1.5": _tiny(
        latent_channels=128,
        latent_downsample=16,
        latent_unpatchify=2,
        adapter_padding="replicate",
        gate_type="per_token",
        pixel_gate=True,
        aux_rgb_head=True,
        rope_ref_size=(128, 128),
        latent_space="flux2",
    ),
    # The embedded default (model/weights/): a real PiD at small width decoding tiny-ae latents 4x
    # (latent of a 64x64 image -> 256x256). Trained on a 2-core CPU by recipes/pid_tiny_*.toml.
    "pid-tiny": _tiny(
        latent_space="tiny-ae",
        hidden_size=128,
        num_heads=4,
        patch_depth=4,
        patch_size=8,  # v3: 8-px patches (v2's 16-px grid showed in every image)
        pixel_hidden_size=16,
        pixel_attn_hidden_size=64,
        pixel_num_heads=2,
        pixel_depth=2,
        adapter_hidden=128,
        adapter_res_blocks=2,
        rope_ref_size=(256, 256),
    ),
}

# The checkpoint file of each released variant on the hub repo nvidia/PiD.
RELEASED_CHECKPOINTS: dict[str, str] = {
    "2k_flux": "PiD_res2k_sr4x_official_flux_distill_4step",
    "2k_sd3": "PiD_res2k_sr4x_official_sd3_distill_4step",
    "2k_flux2": "PiD_res2k_sr4x_official_flux2_distill_4step",
    "2k_rae": "PiD_res2k_sr4x_official_dinov2_distill_4step",
    "2k_scale_rae": "PiD_res2k_sr8x_official_siglip_distill_4step",
    "2kto4k_sd3": "PiD_res2kto4k_sr4x_official_sd3_distill_4step",
    "2kto4k_sdxl": "PiD_res2kto4k_sr4x_official_sdxl_distill_4step",
    "2kto4k_v1pt5_flux": "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step",
    "2kto4k_v1pt5_flux2": "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step",
    "2kto4k_v1pt5_qwenimage": "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step",
}


def ntk_theta(base: float, grid: int, ref_grid: int, rotary_dim: int) -> float:
    """NTK-aware RoPE base for one axis: base * (grid/ref)^(d/(d-2)), d = rotary dims of that axis.

    Computed in double precision (the caller rounds to float32), as the official code does.
    """
    return base * math.pow(grid / ref_grid, rotary_dim / (rotary_dim - 2))


def parse_image_size(text: str, what: str = "the size") -> tuple[int, int]:
    """'2048x1024' (HEIGHTxWIDTH) -> (2048, 1024): the one parser of output sizes (CLI, server settings).

    Raises ValueError naming `what` (an option or setting) and the expected form.
    """
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{what} must look like 2048x2048 (HEIGHTxWIDTH), got {text!r}") from None
    return height, width
