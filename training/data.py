"""Training data: random crops of photos from an image folder, and the official degradation path.

Every sample is a pure function of (seed, index): index is a global sample counter, so
sample k of a run is the same whatever the number of processes, workers or restarts. That
is what makes resume exact and a 2-process run equal to a 1-process run with the same
global batch (see `StepSampler`).

    photo (cached, decoded once) -> random crop size x size -> random h-flip   = hr [3, S, S] in [-1, 1]
    hr -> antialiased bicubic downsample by `scale`                            = lr [3, S/s, S/s] in [-1, 1]

With a latent context k > 1 (CropSpec.context) the crop is cut from a random region k times its
side, at a whole number of latent cells from the region's corner, and the region's own low-res
image comes with it (lr_context, context_cell): the trainer can then encode the region and cut the
crop's latent out of it, as a tiled decode cuts a window's latent out of a whole image's latent.

The latent-space encoding of lr and the latent noise augmentation run in the trainer
(they need the encoder network); their random draws come from the sample's `seed`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class CropSpec:
    size: int  # side of the high-resolution crop (the decoder's output size)
    scale: int  # super-resolution factor: lr side = size / scale
    short_side: int | None = 640  # photos are resized once so their short side is this (None: keep)
    upscale: bool = True  # False: only photos larger than short_side are resized (see load_photo)
    flip: bool = True
    caption_dropout: float = 0.1  # probability the caption is replaced by "" (official: 0.1)
    # Multi-resolution training: step k uses cycle[k % len(cycle)] (all samples of a step share a
    # size); empty means always `size`. `step_samples` (the global batch) maps a sample to its step.
    cycle: tuple[int, ...] = ()
    step_samples: int = 1
    # Latent context (1: off): crops come from regions `context` times their side, placed on the
    # `cell`-pixel latent grid of the region (cell = high-res pixels per latent cell).
    context: int = 1
    cell: int = 1

    def __post_init__(self) -> None:
        if self.context < 1:
            raise ValueError(f"latent context {self.context} must be at least 1 (1: the crop alone)")
        for size in (self.size, *self.cycle):
            if size % self.scale:
                raise ValueError(f"crop size {size} is not a multiple of the scale factor {self.scale}")
            if self.context > 1 and size % self.cell:
                raise ValueError(f"crop size {size} is not a whole number of {self.cell}-px latent cells")
            region = size * self.context
            if self.short_side is not None and self.short_side < region:
                what = "crop size" if self.context == 1 else f"context region ({self.context} x {size})"
                raise ValueError(f"short_side {self.short_side} is smaller than the {what} {region}")

    def size_at(self, index: int) -> int:
        """Crop side of sample `index`."""
        if not self.cycle:
            return self.size
        return self.cycle[(index // self.step_samples) % len(self.cycle)]


def crop_spec(cfg, scale: int, step_samples: int, cell: int = 1) -> CropSpec:
    """The CropSpec of a training config (crop, crop_cycle, short_side, caption_dropout and
    latent_context keys); `cell`: high-res pixels per latent cell (the network's output_scale)."""
    prob = getattr(cfg, "latent_context_prob", 0.0)  # used by the trainer; checked here, before step 1
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"latent_context_prob {prob} must be in [0, 1]")
    return CropSpec(
        cfg.crop,
        scale,
        cfg.short_side,
        upscale=cfg.upscale,
        caption_dropout=getattr(cfg, "caption_dropout", 0.0),
        cycle=tuple(cfg.crop_cycle),
        step_samples=step_samples,
        context=getattr(cfg, "latent_context", 1),
        cell=cell,
    )


def degrade(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The official degradation: antialiased bicubic downsample by `scale`. [B,3,H,W] -> [B,3,H/s,W/s]."""
    h, w = hr.shape[-2:]
    lr = F.interpolate(hr, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return lr.clamp(-1, 1)


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run seeded `seed` (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist (build it with `pidserve data photos`)"
        )
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def load_photo(path: Path, short_side: int | None, min_side: int, upscale: bool = True) -> torch.Tensor:
    """uint8 [3, H, W] RGB, resized (Lanczos, once) so the short side is `short_side`.

    upscale=False: a photo whose short side is below `short_side` keeps its size, unless it is
    below `min_side` (the largest crop), where it is enlarged to exactly that.
    """
    with Image.open(path) as im:
        im = im.convert("RGB")
        target = short_side
        if target is not None and not upscale:
            target = max(min(target, min(im.size)), min_side)
        if target is not None and target != min(im.size):
            factor = target / min(im.size)
            im = im.resize(
                (max(1, round(im.width * factor)), max(1, round(im.height * factor))), Image.LANCZOS
            )
        array = np.asarray(im, dtype=np.uint8).copy()
    if min(array.shape[:2]) < min_side:
        raise ValueError(
            f"{path} is {array.shape[1]}x{array.shape[0]}, smaller than the crop size {min_side}"
        )
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def grid_crops(
    folder: str | Path, size: int, per_photo: int, short_side: int | None = 640, upscale: bool = True
) -> torch.Tensor:
    """Crops [N, 3, size, size] in [-1, 1] on a fixed grid (two rows) of every photo in `folder`.

    Deterministic: the held-out evaluation set of the trainers and of `pidserve bench quality`.
    """
    crops = []
    for path in list_images(folder):
        photo = load_photo(path, short_side, size, upscale)
        _, height, width = photo.shape
        per_row = max(1, per_photo // 2)
        for i in range(per_photo):
            row, col = divmod(i, per_row)
            top = (height - size) * row // max(1, (per_photo - 1) // per_row)
            left = (width - size) * col // max(1, per_row - 1)
            crops.append(photo[:, top : top + size, left : left + size])
    return torch.stack(crops).float().div(127.5).sub(1.0)


class PhotoCrops(Dataset):
    """Map-style dataset over an unbounded sample index: dataset[i] is sample i of the run.

    Photos are decoded once at construction and kept in memory as uint8 (DataLoader workers
    share them copy-on-write), so workers only crop, flip and downsample.
    Item: {"hr": float32 [3,S,S] in [-1,1], "lr": float32 [3,S/s,S/s], "seed": int64, "caption": str};
    with a latent context k > 1 also "lr_context" float32 [3,kS/s,kS/s] (the region's low-res image)
    and "context_cell" int64 [2] (the crop's row and column in the region, in latent cells).
    A photo's caption is the text of a sidecar file with the same stem and suffix .txt (else "").
    """

    def __init__(self, folder: str | Path, spec: CropSpec, seed: int = 0) -> None:
        self.spec, self.seed = spec, seed
        self.files = list_images(folder)
        min_side = max((spec.size, *spec.cycle)) * spec.context
        self.photos = [load_photo(p, spec.short_side, min_side, spec.upscale) for p in self.files]
        self.captions = [_caption(p) for p in self.files]
        # Pick photos in proportion to their area: every region of the data is equally likely.
        areas = torch.tensor([p.shape[1] * p.shape[2] for p in self.photos], dtype=torch.float64)
        self.weights = areas / areas.sum()
        log.info("loaded %d photos from %s", len(self.photos), folder)

    def __len__(self) -> int:
        return 2**62  # samples are indexed by a global counter; the sampler decides which ones

    def __getitem__(self, index: int) -> dict:
        seed = sample_seed(self.seed, int(index))
        gen = torch.Generator().manual_seed(seed)
        photo_idx = int(torch.multinomial(self.weights, 1, generator=gen))
        photo = self.photos[photo_idx]
        size = self.spec.size_at(int(index))
        side = size * self.spec.context  # the region's side: the crop's own without a context
        top = int(torch.randint(0, photo.shape[1] - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, photo.shape[2] - side + 1, (1,), generator=gen))
        region = photo[:, top : top + side, left : left + side].float().div(127.5).sub(1.0)
        if self.spec.flip and bool(torch.rand((), generator=gen) < 0.5):
            region = region.flip(-1)
        crop, context = region, {}
        if self.spec.context > 1:
            # the crop's place in the region, in whole latent cells
            cells = (side - size) // self.spec.cell + 1
            cell = torch.randint(0, cells, (2,), generator=gen)
            context["lr_context"] = degrade(region[None], self.spec.scale)[0]
            context["context_cell"] = cell
            row, col = (cell * self.spec.cell).tolist()
            crop = region[:, row : row + size, col : col + size]
        caption = self.captions[photo_idx]
        if bool(torch.rand((), generator=gen) < self.spec.caption_dropout):
            caption = ""
        lr = degrade(crop[None], self.spec.scale)[0]
        seed_tensor = torch.tensor(seed, dtype=torch.int64)
        return {"hr": crop, "lr": lr, "seed": seed_tensor, "caption": caption, **context}


def _caption(path: Path) -> str:
    side = path.with_suffix(".txt")
    return side.read_text().strip() if side.exists() else ""


class StepSampler(Sampler[int]):
    """Sample indices for steps start_step, start_step + 1, ...: step k of a run with global batch G
    uses samples [k*G, (k+1)*G); rank r of W processes takes the r-th contiguous slice of G/W."""

    def __init__(self, global_batch: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world_size} processes")
        self.global_batch, self.start_step, self.rank, self.world = global_batch, start_step, rank, world_size

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        while True:
            first = step * self.global_batch + self.rank * self.local_batch
            yield from range(first, first + self.local_batch)
            step += 1

    def __len__(self) -> int:
        return 2**62


def make_loader(
    dataset: PhotoCrops, global_batch: int, start_step: int, rank: int, world_size: int, workers: int
) -> Iterator[dict]:
    """An endless iterator of local batches, one per step, starting at `start_step`."""
    sampler = StepSampler(global_batch, start_step, rank, world_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=sampler.local_batch,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return iter(loader)


@dataclass
class LatentNoise:
    """The official latent noise augmentation: sigma ~ U[0, max_sigma] with probability `prob`
    (else 0), applied in the latent space's own noising form; plus latent dropout."""

    prob: float = 0.75
    max_sigma: float = 0.8
    latent_dropout: float = 0.1  # official LQ dropout: the latent is zeroed

    def draw(self, seeds: torch.Tensor, latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Per-sample draws from each sample's seed: sigma [B], eps [B, C, h, w], keep [B] (bool)."""
        sigmas, epss, keeps = [], [], []
        for seed in seeds.tolist():
            gen = torch.Generator().manual_seed((seed + 0x5EED) & 0x7FFFFFFFFFFFFFFF)
            noisy = bool(torch.rand((), generator=gen) < self.prob)
            sigma = float(torch.rand((), generator=gen)) * self.max_sigma if noisy else 0.0
            keep = bool(torch.rand((), generator=gen) >= self.latent_dropout)
            sigmas.append(sigma)
            keeps.append(keep)
            epss.append(torch.randn(latent_shape, generator=gen))
        return {"sigma": torch.tensor(sigmas), "eps": torch.stack(epss), "keep": torch.tensor(keeps)}


def per_sample_normal(seeds: torch.Tensor, shape: tuple[int, ...], salt: int) -> torch.Tensor:
    """One N(0, 1) tensor of `shape` per sample, drawn from that sample's seed (and a salt per use)."""
    out = []
    for seed in seeds.tolist():
        gen = torch.Generator().manual_seed((seed ^ salt) & 0x7FFFFFFFFFFFFFFF)
        out.append(torch.randn(shape, generator=gen))
    return torch.stack(out)


def per_sample_uniform(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """One U[0, 1) float per sample, from that sample's seed and a salt."""
    out = []
    for seed in seeds.tolist():
        gen = torch.Generator().manual_seed((seed ^ salt) & 0x7FFFFFFFFFFFFFFF)
        out.append(float(torch.rand((), generator=gen)))
    return torch.tensor(out)
