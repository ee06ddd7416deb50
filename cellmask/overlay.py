"""An RGB picture of labels over their image, for a quick look without a viewer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries

from cellmask.normalize import normalize


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8: the image (percentile-stretched) with object outlines in yellow."""
    base = np.clip(normalize(image), 0, 1).transpose(1, 2, 0)
    rgb = (base * 255).astype(np.uint8)
    edges = find_boundaries(labels, mode="inner")
    rgb[edges] = (255, 220, 0)
    return rgb


def save_overlay(path: str | Path, image: np.ndarray, labels: np.ndarray) -> Path:
    import imageio.v3 as iio

    path = Path(path)
    iio.imwrite(path, overlay(image, labels))
    return path
