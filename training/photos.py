"""Rebuild the embedded default's training photographs from installable packages.

Sources (all redistributable; each file's source, licence and SHA-256 go into manifest.json):
- Debian `mate-backgrounds`: the 12 photos in usr/share/backgrounds/mate/nature (GPL-2+).
- Debian `lomiri-wallpapers-16.04` and `lomiri-wallpapers-20.04`: the photographs among them
  (CC-BY-4.0, CC-BY-SA-3.0/4.0 or CC0-1.0 per file, as their debian/copyright states; the
  illustrations in those packages are left out).
- scikit-image's bundled sample photos (public domain / CC0, per skimage.data docstrings).
- scikit-learn's two sample photos, china.jpg and flower.jpg (CC BY 2.0), read from its wheel.

Only the packages listed in DEB_SOURCES are read.

The split is fixed here, not random: HOLDOUT photos are never trained on and are what
docs/quality.md measures. Building needs the network only to download the packages
(`apt-get download`, `pip download`); pass --downloads DIR to use files you already have
(`<package>_*.deb`, `scikit_learn-*.whl`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DebPhotos:
    """Photos inside one Debian package: folder in the package -> {file name: licence}."""

    package: str
    folder: str
    licences: dict[str, str]
    prefix: str  # prepended to the file name in the photo set (keeps names unique and traceable)


_MATE_GPL = "GPL-2+ (Debian package mate-backgrounds, debian/copyright lists the authors)"
_MATE_NATURE = (
    "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops",
    "Storm", "TwoWings", "Wood", "YellowFlower",
)  # fmt: skip

# Licences as stated per file in each package's debian/copyright (lomiri-wallpapers 20.04.0-2).
DEB_SOURCES: tuple[DebPhotos, ...] = (
    DebPhotos(
        "mate-backgrounds",
        "usr/share/backgrounds/mate/nature",
        {f"{name}.jpg": _MATE_GPL for name in _MATE_NATURE},
        "mate-",
    ),
    DebPhotos(
        "lomiri-wallpapers-16.04",
        "usr/share/backgrounds",
        {
            "aitzgorri_by_Aitzol_Berasategi.jpg": "CC-BY-4.0 (Aitzol Berasategi, 2018)",
            "analogpattern_by_Peter_Nerlich.jpg": "CC-BY-SA-4.0 (Peter Nerlich, 2018)",
            "Bridge_by_Sander_Klootwijk.jpg": "CC-BY-SA-4.0 (Sander Klootwijk, 2018)",
            "Dragonfly_by_Bolly.jpg": 'CC-BY-SA-4.0 ("Bolly", 2018)',
            "free_by_Peter_Nerlich.jpg": "CC-BY-SA-4.0 (Peter Nerlich, 2018)",
            "friends_by_Aitzol_Berasategi.jpg": "CC-BY-4.0 (Aitzol Berasategi, 2018)",
            "greentock_by_Peter_Nerlich.jpg": "CC-BY-SA-4.0 (Peter Nerlich, 2018)",
            "life_by_Aitzol_Berasategi.jpg": "CC-BY-4.0 (Aitzol Berasategi, 2018)",
            "picosdeeuropa_by_Aitzol_Berasategi.jpg": "CC-BY-4.0 (Aitzol Berasategi, 2018)",
            "Picture_0B_by_freespace.jpg": 'CC-BY-4.0 (Trevor "Freespace", 2018)',
            "Picture_1A_by_freespace.jpg": 'CC-BY-4.0 (Trevor "Freespace", 2018)',
            "seeding_by_Clements_Engelhardt.jpg": "CC0-1.0 (Clemens Engelhardt, 2018)",
            "sunset_by_Aitzol_Berasategi.jpg": "CC-BY-4.0 (Aitzol Berasategi, 2018)",
            "Wine_by_Jakkub_Mede.jpg": "CC-BY-4.0 (Jakub Mede, 2018)",
        },
        "lomiri-",
    ),
    DebPhotos(
        "lomiri-wallpapers-20.04",
        "usr/share/backgrounds",
        {
            "Infinite-Sea_by_Aury88.jpg": "CC-BY-SA-3.0 (Aury88, 2019)",
            "Kleiber_by_Lukas_Baubkus.jpg": "CC-BY-SA-3.0 (Lukas Baubkus, 2021)",
        },
        "lomiri-",
    ),
)
# The packages this module reads.
PACKAGES = tuple(source.package for source in DEB_SOURCES)

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

# scikit-learn's sample images, read from its wheel (sklearn/datasets/images/README.txt).
SKLEARN_WHEEL = "scikit-learn==1.9.1"
SKLEARN_PHOTOS: dict[str, str] = {
    "china.jpg": "CC BY 2.0 (danielbuechele on Flickr)",
    "flower.jpg": "CC BY 2.0 (vultilion on Flickr)",
}

# Never trained on: two colour-rich nature photos and two everyday photos (the v1 set), plus
# dogs (fur), a mountain landscape, a strongly coloured still life and a building (v2).
HOLDOUT = frozenset({
    "mate-LadyBird.jpg", "mate-Dune.jpg", "skimage-coffee.png", "skimage-rocket.png",
    "lomiri-friends_by_Aitzol_Berasategi.jpg", "lomiri-picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "lomiri-Picture_0B_by_freespace.jpg", "sklearn-china.jpg",
})  # fmt: skip


@dataclass
class PhotoRecord:
    file: str  # relative to the photo-set root: train/<name> or holdout/<name>
    split: str  # "train" | "holdout"
    source: str
    licence: str
    sha256: str
    width: int
    height: int


def build_photo_set(out_dir: Path, downloads: Path | None = None) -> list[PhotoRecord]:
    """Write <out_dir>/{train,holdout}/* and manifest.json; returns the records.

    `downloads`: a folder holding the packages already (`<package>_*.deb`, `scikit_learn-*.whl`);
    whatever is missing there is downloaded into a temporary folder.
    """
    out_dir = Path(out_dir)
    if downloads is not None and not Path(downloads).is_dir():
        raise FileNotFoundError(f"{downloads} is not a folder; pass the folder holding the .deb/.whl files")
    for split in ("train", "holdout"):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    records: list[PhotoRecord] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        for source in DEB_SOURCES:
            deb = _find(downloads, f"{source.package}_*.deb") or _download_deb(source.package, tmp_dir)
            root = _extract_deb(deb, tmp_dir / source.package)
            for file_name, licence in sorted(source.licences.items()):
                src = root / source.folder / file_name
                if not src.is_file():
                    raise RuntimeError(f"{deb.name} has no {source.folder}/{file_name}: a different version?")
                name = source.prefix + file_name
                dest = out_dir / _split(name) / name
                shutil.copyfile(src, dest)
                source_text = f"{source.package} ({deb.name}): {source.folder}/{file_name}"
                records.append(_record(out_dir, dest, source_text, licence))
        wheel = _find(downloads, "scikit_learn-*.whl") or _download_wheel(SKLEARN_WHEEL, tmp_dir)
        with zipfile.ZipFile(wheel) as archive:
            for file_name, licence in sorted(SKLEARN_PHOTOS.items()):
                name = f"sklearn-{file_name}"
                dest = out_dir / _split(name) / name
                dest.write_bytes(archive.read(f"sklearn/datasets/images/{file_name}"))
                source_text = f"scikit-learn ({wheel.name}): sklearn/datasets/images/{file_name}"
                records.append(_record(out_dir, dest, source_text, licence))
    for loader, licence in SKIMAGE_PHOTOS.items():
        name = f"skimage-{loader}.png"
        dest = out_dir / _split(name) / name
        Image.fromarray(_skimage_photo(loader)).save(dest)
        records.append(_record(out_dir, dest, f"scikit-image: skimage.data.{loader}()", licence))
    missing = HOLDOUT - {Path(r.file).name for r in records}
    if missing:
        raise RuntimeError(f"holdout photos missing from the sources: {sorted(missing)}")
    manifest = {
        "sources": [*PACKAGES, "scikit-image", SKLEARN_WHEEL],
        "photos": [asdict(r) for r in records],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %d photos (%d held out) to %s", len(records), len(HOLDOUT), out_dir)
    return records


def _split(name: str) -> str:
    return "holdout" if name in HOLDOUT else "train"


def _find(folder: Path | None, pattern: str) -> Path | None:
    """The newest file matching `pattern` in `folder` (None if no folder or no match)."""
    if folder is None:
        return None
    matches = sorted(Path(folder).glob(pattern))
    return matches[-1] if matches else None


def _download_deb(package: str, where: Path) -> Path:
    """`apt-get download PACKAGE` into `where` (needs the network and a Debian system)."""
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"apt-get is not available: download {package}_*.deb yourself and pass --downloads DIR"
        )
    done = subprocess.run(["apt-get", "download", package], cwd=where, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"apt-get download {package} failed: {done.stderr.strip()[-500:]}")
    debs = sorted(where.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} produced no .deb in {where}")
    return debs[-1]


def _download_wheel(requirement: str, where: Path) -> Path:
    """`pip download --no-deps REQUIREMENT` (a wheel for this interpreter) into `where`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(where)]
    done = subprocess.run([*command, requirement], capture_output=True, text=True)
    wheels = sorted(where.glob("scikit_learn-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(
            f"pip download {requirement} failed ({done.stderr.strip()[-300:]}); download the wheel "
            "yourself and pass --downloads DIR"
        )
    return wheels[-1]


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
        if im.mode != "RGB":  # keep every photo plain RGB (the trainers read them as such anyway)
            rgb = im.convert("RGB")
            buffer = io.BytesIO()
            rgb.save(buffer, format=im.format or "PNG")
            path.write_bytes(buffer.getvalue())
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
