"""What a written plot must be: a readable PNG with something drawn on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def assert_is_plot(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 200
        pixels = np.asarray(image.convert("L"))
    # a blank canvas is one colour; a chart has axes, lines and text in several shades
    assert len(np.unique(pixels)) > 16, f"{path} looks blank"
