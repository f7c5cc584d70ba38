"""Rebuild pid-tiny's training photographs from two installable packages.

Sources (both redistributable, recorded per file in manifest.json):
- Debian's `mate-backgrounds` package: the 12 photos in usr/share/backgrounds/mate/nature
  (GPL-2+, authors per debian/copyright).
- scikit-image's bundled sample photos (public domain / CC0, per skimage.data docstrings).

The split is fixed here, not random: HOLDOUT photos are never trained on and are what
docs/quality.md measures. Building needs the network only to download the .deb
(`apt-get download`); pass --deb to use a file you already have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

MATE_PACKAGE = "mate-backgrounds"
MATE_NATURE_DIR = "usr/share/backgrounds/mate/nature"
MATE_LICENCE = "GPL-2+ (Debian package mate-backgrounds, debian/copyright lists the authors)"

# skimage.data loader name -> licence, as stated in that function's docstring.
SKIMAGE_PHOTOS: dict[str, str] = {
    "astronaut": "public domain (NASA Great Images database)",
    "chelsea": "CC0 (photographer Stefan van der Walt)",
    "coffee": "CC0 (photographer Rachel Michetti)",
    "rocket": "public domain (SpaceX)",
    "hubble_deep_field": "public domain (NASA)",
    "retina": "CC0 1.0 (Wikimedia Commons)",
    "immunohistochemistry": "no known copyright restrictions",
    "brick": "CC0 (CC0Textures Bricks25), grayscale",
    "grass": "CC0 (CC0Textures), grayscale",
    "gravel": "CC0 (CC0Textures Gravel04), grayscale",
    "camera": "CC0 (photographer Lav Varshney), grayscale",
    "stereo_motorcycle": "Middlebury 2014 stereo benchmark (Scharstein et al.), left view, research data",
}

# Never trained on. Two colour-rich nature photos and two everyday skimage photos.
HOLDOUT = frozenset({"mate-LadyBird.jpg", "mate-Dune.jpg", "skimage-coffee.png", "skimage-rocket.png"})


@dataclass
class PhotoRecord:
    file: str  # relative to the photo-set root: train/<name> or holdout/<name>
    split: str  # "train" | "holdout"
    source: str
    licence: str
    sha256: str
    width: int
    height: int


def build_photo_set(out_dir: Path, deb: Path | None = None) -> list[PhotoRecord]:
    """Write <out_dir>/{train,holdout}/*.{jpg,png} and manifest.json; returns the records."""
    out_dir = Path(out_dir)
    for split in ("train", "holdout"):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    if deb is not None and not Path(deb).is_file():
        raise FileNotFoundError(f"{deb} does not exist; pass the mate-backgrounds_*.deb file, or omit --deb")
    records: list[PhotoRecord] = []
    with tempfile.TemporaryDirectory() as tmp:
        deb = deb or _download_deb(Path(tmp))
        nature = _extract_deb(deb, Path(tmp) / "root") / MATE_NATURE_DIR
        for src in sorted(nature.glob("*.jpg")):
            name = f"mate-{src.name}"
            dest = out_dir / _split(name) / name
            shutil.copyfile(src, dest)
            records.append(
                _record(out_dir, dest, f"{MATE_PACKAGE}: {MATE_NATURE_DIR}/{src.name}", MATE_LICENCE)
            )
    for loader, licence in SKIMAGE_PHOTOS.items():
        name = f"skimage-{loader}.png"
        dest = out_dir / _split(name) / name
        Image.fromarray(_skimage_photo(loader)).save(dest)
        records.append(_record(out_dir, dest, f"scikit-image: skimage.data.{loader}()", licence))
    missing = HOLDOUT - {Path(r.file).name for r in records}
    if missing:
        raise RuntimeError(f"holdout photos missing from the sources: {sorted(missing)}")
    manifest = {"sources": [MATE_PACKAGE, "scikit-image"], "photos": [asdict(r) for r in records]}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %d photos (%d held out) to %s", len(records), len(HOLDOUT), out_dir)
    return records


def _split(name: str) -> str:
    return "holdout" if name in HOLDOUT else "train"


def _download_deb(where: Path) -> Path:
    """`apt-get download mate-backgrounds` into `where` (needs the network and a Debian system)."""
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            "apt-get is not available: download mate-backgrounds_*.deb yourself and pass --deb"
        )
    done = subprocess.run(["apt-get", "download", MATE_PACKAGE], cwd=where, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"apt-get download {MATE_PACKAGE} failed: {done.stderr.strip()[-500:]}")
    debs = sorted(where.glob(f"{MATE_PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {MATE_PACKAGE} produced no .deb in {where}")
    return debs[-1]


def _extract_deb(deb: Path, dest: Path) -> Path:
    if shutil.which("dpkg-deb") is None:
        raise RuntimeError("dpkg-deb is needed to unpack the .deb (Debian/Ubuntu: it is always installed)")
    dest.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dpkg-deb could not unpack {deb}: {done.stderr.strip()}")
    return dest


def _skimage_photo(loader: str) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array from skimage.data (grayscale replicated, stereo: left view)."""
    import skimage.data

    image = getattr(skimage.data, loader)()
    if loader == "stereo_motorcycle":
        image = image[0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def _record(root: Path, path: Path, source: str, licence: str) -> PhotoRecord:
    with Image.open(path) as im:
        width, height = im.size
    return PhotoRecord(
        file=str(path.relative_to(root)),
        split=path.parent.name,
        source=source,
        licence=licence,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        width=width,
        height=height,
    )
