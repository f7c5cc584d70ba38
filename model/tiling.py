"""Tiled decoding: any output size as overlapping windows of the network's native size, blended at
every sampler step (MultiDiffusion-style), so cost grows with the area and memory with one window batch.

    Tiling         what a user asks for: off, auto (windows of the native size), or a window size
                   and overlap ("256x256", "256x256:32")
    TilePlan       the windows of one output size: origins (stride tile - overlap, the last window of
                   each axis shifted inward to end at the border, never padded with made-up content,
                   every origin on the latent grid so a window is a whole latent crop) and the
                   normalised blend weights (1 inside, ramping down across the overlap, never 0;
                   one ramp and one image-sized normaliser, not a map per window)
    tiled_velocity the one tiled code path of every backend: wraps a backend's network-on-window-rows
                   into a velocity over the whole image, for the shared student sampler
    sample_tiled   the eager PiDNet rollout through tiled_velocity (tests, bench quality)

Why blending velocities is blending x0: each window's x0 is x_w - t v_w and the normalised weights sum
to 1 at every pixel, so sum_i w_i x0_i = x - t sum_i w_i v_i. The sampler itself (student_steps, the
re-noising with one whole-image draw) is therefore the untiled one, untouched: a seed's noise does not
depend on the window layout, and with one window covering the image (weight exactly 1) tiled equals
untiled bit for bit.

Rows: a batch of B images in N windows is N * B network rows, window-major (window 0's B samples,
then window 1's, ...). Backends run the rows `row_batch` at a time, each chunk a batch of windows of
one shape: what bounds activation memory, and what lets one fixed-shape engine (a TensorRT profile, a
CUDA graph) serve every output size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .network import PiDNet
from .sampler import StepCallback, noise_source, student_steps, student_timesteps

# "256x256" or "256x256:32" (window height x width, optional overlap), in output pixels
_TILE_PATTERN = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*(?::\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class Tiling:
    """How decodes are cut into windows.

    enabled False: never (an output the engine cannot decode whole is refused). size None: windows of
    the network's native output size ("auto"). overlap None: a quarter of the window's shorter side,
    rounded down to the latent grid. Outputs that fit in one window always decode untiled.
    """

    enabled: bool = True
    size: tuple[int, int] | None = None
    overlap: int | None = None

    @classmethod
    def parse(cls, text: str) -> Tiling:
        """'off', 'auto', 'HxW' or 'HxW:OVERLAP' (output pixels); ValueError says what was wrong."""
        word = text.strip().lower()
        if word == "off":
            return OFF
        if word == "auto":
            return cls()
        match = _TILE_PATTERN.match(word)
        if match is None:
            raise ValueError(f"tile {text!r} is not 'off', 'auto', 'HxW' or 'HxW:OVERLAP' (e.g. 256x256:64)")
        height, width = int(match[1]), int(match[2])
        overlap = None if match[3] is None else int(match[3])
        if height <= 0 or width <= 0:
            raise ValueError(f"tile {text!r}: the window must be at least 1x1")
        return cls(True, (height, width), overlap)

    def __str__(self) -> str:
        if not self.enabled:
            return "off"
        if self.size is None:
            return "auto" if self.overlap is None else f"auto:{self.overlap}"
        text = f"{self.size[0]}x{self.size[1]}"
        return text if self.overlap is None else f"{text}:{self.overlap}"

    def plan(self, output: tuple[int, int], native: tuple[int, int], grid: int) -> TilePlan | None:
        """The windows for an `output` (H, W), or None when it decodes untiled (off, or one window).

        native: the network's trained output size (what `auto` cuts into); grid: output pixels per
        latent cell (windows start on it). ValueError for a window or overlap off the grid."""
        if not self.enabled:
            return None
        tile = self.size or native
        if output[0] <= tile[0] and output[1] <= tile[1]:
            return None
        tile = (min(tile[0], output[0]), min(tile[1], output[1]))
        overlap = self.overlap
        if overlap is None:
            overlap = min(tile) // 4 // grid * grid
        return TilePlan.build(output, tile, overlap, grid)


OFF = Tiling(enabled=False)


def windows(size: int, tile: int, overlap: int, grid: int) -> list[int]:
    """Origins of windows of `tile` pixels covering [0, size) along one axis, on multiples of `grid`."""
    if tile % grid or overlap % grid:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {grid} output pixels")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile {tile})")
    if size <= tile:
        return [0]
    stride = tile - overlap
    origins = list(range(0, size - tile, stride))
    return [*origins, size - tile]  # the last window ends at the border (shifted inward)


def blend_weights(tile: tuple[int, int], overlap: int, device: torch.device) -> torch.Tensor:
    """[1, 1, th, tw] float64: a separable ramp, 1 inside and (i + 1) / (overlap + 1) across the
    overlap at every edge, so that overlapping windows fade into each other and no weight is 0."""
    axes = []
    for length in tile:
        ramp = torch.ones(length, dtype=torch.float64, device=device)
        if overlap:
            edge = torch.arange(1, overlap + 1, dtype=torch.float64, device=device) / (overlap + 1)
            ramp[:overlap] = torch.minimum(ramp[:overlap], edge)
            ramp[-overlap:] = torch.minimum(ramp[-overlap:], edge.flip(0))
        axes.append(ramp)
    return (axes[0][:, None] * axes[1][None, :])[None, None]


@dataclass(frozen=True)
class TilePlan:
    """The windows of one output size. Sizes in output pixels; `grid` = output pixels per latent cell."""

    output: tuple[int, int]
    tile: tuple[int, int]
    overlap: int
    grid: int
    origins: tuple[tuple[int, int], ...]  # (top, left) of each window, row-major

    @classmethod
    def build(cls, output: tuple[int, int], tile: tuple[int, int], overlap: int, grid: int) -> TilePlan:
        """ValueError when the window, the overlap or the output is off the latent grid."""
        height, width = output
        if height % grid or width % grid:
            raise ValueError(f"output {height}x{width} is not a multiple of {grid} pixels (one latent cell)")
        overlap = min(overlap, tile[0] - grid, tile[1] - grid)
        origins = tuple(
            (top, left)
            for top in windows(height, tile[0], overlap, grid)
            for left in windows(width, tile[1], overlap, grid)
        )
        return cls(output, tile, overlap, grid, origins)

    @property
    def count(self) -> int:
        return len(self.origins)

    @property
    def window_pixels(self) -> int:
        return self.tile[0] * self.tile[1]

    def crop(self, image: torch.Tensor, window: int) -> torch.Tensor:
        """Window `window` of an image tensor [..., H, W] (output pixels)."""
        top, left = self.origins[window]
        return image[..., top : top + self.tile[0], left : left + self.tile[1]]

    def latent_rows(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [N * B, C, th / grid, tw / grid]: every window's latent crop, window-major."""
        g, (th, tw) = self.grid, self.tile
        return torch.cat(
            [latent[..., t // g : (t + th) // g, l // g : (l + tw) // g] for t, l in self.origins]
        )

    def repeat_rows(self, per_sample: torch.Tensor) -> torch.Tensor:
        """A per-sample tensor [B, ...] (sigma, text) as one row per window and sample, window-major."""
        return per_sample.repeat(self.count, *([1] * (per_sample.ndim - 1)))

    def chunk_inputs(
        self,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        text: torch.Tensor | None,
        row_batch: int,
        window_latents: WindowLatents | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per chunk of rows (chunk_ranges), its (latent, sigma, text) rows: what a backend conditions on.

        window_latents: how each window's latent is made from the whole one (model/window_latents.py;
        None: its crop, `latent_rows`)."""
        latent_rows = (window_latents or TilePlan.latent_rows)(self, latent)
        sigma_rows = self.repeat_rows(sigma)
        text_rows = None if text is None else self.repeat_rows(text)
        return [
            (
                latent_rows[rows.start : rows.stop],
                sigma_rows[rows.start : rows.stop],
                None if text_rows is None else text_rows[rows.start : rows.stop],
            )
            for rows in chunk_ranges(self, latent.shape[0], row_batch)
        ]

    def normaliser(self, device: torch.device) -> torch.Tensor:
        """[1, 1, H, W] float64: 1 / the sum of every window's blend weight at each pixel. Window i's
        normalised weight is blend_weights * crop(normaliser, i), computed when needed: one
        image-sized map instead of one window-sized map per window (1.9x the image at 2048²)."""
        weight = blend_weights(self.tile, self.overlap, device)
        total = torch.zeros(1, 1, *self.output, dtype=torch.float64, device=device)
        for window in range(self.count):
            self.crop(total, window).add_(weight)
        return total.reciprocal_()

    def window_weight(
        self, window: int, ramp: torch.Tensor, normaliser: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Window `window`'s normalised blend weight [1, 1, th, tw] (they sum to 1 at each pixel):
        ramp (blend_weights) times its crop of `normaliser`, into `out` when given. With a single
        window it is exactly 1 (1 * 1 / 1), so tiled equals untiled bit for bit."""
        return torch.mul(ramp, self.crop(normaliser, window), out=out)


# window_latents(plan, latents [B, C, h, w]) -> latent rows [N * B, C, th / grid, tw / grid], window-major:
# what each window is conditioned on (model/window_latents.py: the crop, or the crop corrected)
WindowLatents = Callable[[TilePlan, torch.Tensor], torch.Tensor]
# velocity_rows(chunk, x_rows, t_rows) -> v_rows: the network on rows [chunk * row_batch, ...)
RowVelocity = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
# progress(done, total): network chunks evaluated so far in this decode, of all its steps
Progress = Callable[[int, int], None]


def chunk_ranges(plan: TilePlan, batch: int, row_batch: int) -> list[range]:
    """The row ranges run together: N * B rows, `row_batch` at a time (the last chunk may be short)."""
    rows = plan.count * batch
    return [range(start, min(start + row_batch, rows)) for start in range(0, rows, row_batch)]


def tiled_velocity(
    plan: TilePlan,
    batch: int,
    row_batch: int,
    velocity_rows: RowVelocity,
    steps: int,
    progress: Progress | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A velocity over whole images [B, 3, H, W] built from a backend's network on window rows.

    Each call crops every window of x, runs the chunks through `velocity_rows`, and blends the window
    velocities with the normalised weights (summed in float64, applied and accumulated in float32:
    at most four windows overlap a pixel, and the sampler reads the velocity in float32 anyway).
    `steps` only sizes the progress total. Image-sized state: the float32 blend and one float32
    normaliser map, whatever the number of windows."""
    chunks = chunk_ranges(plan, batch, row_batch)
    blend: dict[str, torch.Tensor] = {}
    done = 0

    def weight(window: int) -> torch.Tensor:
        """Window `window`'s normalised weight, written into one reused buffer (no allocation per
        window and step: small temporaries fragment the CPU heap)."""
        return plan.window_weight(window, blend["ramp"], blend["normaliser"], out=blend["scratch"])

    def velocity(x: torch.Tensor, t_scaled: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if not blend:
            blend["ramp"] = blend_weights(plan.tile, plan.overlap, x.device).float()
            blend["normaliser"] = plan.normaliser(x.device).float()
            blend["scratch"] = torch.empty_like(blend["ramp"])
        blended = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for index, rows in enumerate(chunks):
            # row r is window r // B, sample r % B
            x_rows = torch.cat([plan.crop(x[r % batch : r % batch + 1], r // batch) for r in rows])
            t_rows = t_scaled.repeat(plan.count)[rows.start : rows.stop]
            v_rows = velocity_rows(index, x_rows, t_rows)
            for j, r in enumerate(rows):
                window, sample = divmod(r, batch)
                target = plan.crop(blended[sample : sample + 1], window)
                target.addcmul_(weight(window), v_rows[j : j + 1].float())
            done += 1
            if progress is not None:
                progress(done, len(chunks) * steps)
        return blended

    return velocity


def sample_tiled(
    net: PiDNet,
    latent: torch.Tensor,
    sigma: torch.Tensor | float,
    text: torch.Tensor | None = None,
    steps: int = 4,
    tile: tuple[int, int] | None = None,
    overlap: int | None = None,
    noises: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    window_batch: int = 4,
    callback: StepCallback | None = None,
    window_latents: WindowLatents | None = None,
) -> torch.Tensor:
    """Decode `latent` [B, C, h, w] in windows; float32 [B, 3, H, W] in [-1, 1], like `sample`.

    tile: the window's output size (default: the network's native size, `cfg.native_size`);
    overlap: output pixels neighbouring windows share (default a quarter of the window);
    window_batch: windows run through the network together (a memory bound; any value gives the same
    result up to float rounding); window_latents: what each window is conditioned on (None: its crop
    of `latent`; model/window_latents.py). Random draws as in `sample`.
    """
    cfg = net.cfg
    batch = latent.shape[0]
    output = cfg.output_size(latent.shape[-2], latent.shape[-1])
    tiling = Tiling(True, tile, overlap)
    plan = tiling.plan(output, cfg.native_size, cfg.output_scale)
    if plan is None:  # fits in one window: a window covering the image
        plan = TilePlan.build(output, output, 0, cfg.output_scale)
    sigmas = torch.as_tensor(sigma, dtype=torch.float32, device=latent.device).expand(batch).contiguous()
    row_batch = window_batch * batch
    conds = [
        net.condition(latent_rows, sigma_rows, text_rows, image_size=plan.tile)
        for latent_rows, sigma_rows, text_rows in plan.chunk_inputs(
            latent, sigmas, text, row_batch, window_latents
        )
    ]

    def velocity_rows(chunk: int, x_rows: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
        return net.velocity(x_rows, t_rows, conds[chunk])

    velocity = tiled_velocity(plan, batch, row_batch, velocity_rows, steps)
    draw = noise_source((batch, 3, *output), latent.device, noises, generator, expected=steps)
    return student_steps(velocity, draw, student_timesteps(steps), callback)


def tiled_window_count(
    size: tuple[int, int], tile: tuple[int, int], grid: int, overlap: int | None = None
) -> int:
    """How many windows an output `size` decodes in (1: untiled); the server's cost model counts them."""
    plan = Tiling(True, tile, overlap).plan(size, tile, grid)
    return 1 if plan is None else plan.count


__all__ = [
    "OFF",
    "Progress",
    "RowVelocity",
    "TilePlan",
    "Tiling",
    "WindowLatents",
    "blend_weights",
    "chunk_ranges",
    "sample_tiled",
    "tiled_velocity",
    "tiled_window_count",
    "windows",
]
