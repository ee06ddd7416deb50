"""Tissue drawn around the nuclei of fluorescence crops, for training on what H&E looks like.

In the nuclear channel of an H&E slide (hematoxylin optical density, after
:mod:`cellmask.appearance`) a nucleus is not the filled blob of a DNA stain: its chromatin is
rimmed and speckled, cytoplasm and cell borders carry a third to a half of the nucleus' signal,
and stroma fills the gaps with fibres. The permissive training data hold few H&E images, so
fluorescence crops are given that look: the nuclei's annotated masks stay the targets, and
the network learns that cytoplasm, borders and fibres are not nuclei.

The levels are relative to the crop's median nucleus signal and were read off the nuclear
channel of H&E tiles (nucleus about 0.45, one ring of cytoplasm 0.2, the rest 0.1 on the
network's scale).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import expand_labels, find_boundaries


def _unit_noise(rng: np.random.Generator, shape: tuple[int, int],
                sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-smoothed white noise ``shape`` rescaled to zero mean and unit deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def add_tissue(signal: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``signal`` ``(H, W)`` float32 (a fluorescence crop's nuclear channel, about [0, 1]) with
    chromatin texture inside the nuclei of ``labels`` ``(H, W)`` and cytoplasm, cell borders
    and stroma around them; same shape and frame. Every random choice comes from ``rng``."""
    shape = signal.shape
    nuclei = labels > 0
    level = float(np.median(signal[nuclei])) if nuclei.any() else 0.5
    out = signal.astype(np.float32, copy=True)

    # chromatin: a brighter rim (vesicular nuclei) and speckle
    inside = nuclei & ~find_boundaries(labels, mode="inner")
    depth = ndimage.distance_transform_edt(inside)
    rim_share = rng.uniform(0.0, 0.7)
    factor = 1.0 - rim_share + rim_share * np.exp(-depth / rng.uniform(1.0, 3.0))
    factor *= np.clip(1.0 + rng.uniform(0.0, 0.35) * _unit_noise(rng, shape, 0.8), 0.0, None)
    out[nuclei] *= factor[nuclei].astype(np.float32)

    # cells around the nuclei: cytoplasm with a smooth uneven stain, and their borders
    cells = expand_labels(labels, distance=rng.uniform(3.0, 12.0))
    cytoplasm = (cells > 0) & ~nuclei
    stain = np.clip(1.0 + 0.5 * _unit_noise(rng, shape, rng.uniform(2.0, 6.0)), 0.0, 2.0)
    out += (rng.uniform(0.05, 0.55) * level) * stain * cytoplasm
    borders = ndimage.gaussian_filter(
        (find_boundaries(cells, mode="inner") & ~nuclei).astype(np.float32), 0.6)
    out += (rng.uniform(0.0, 0.5) * level) * borders

    # stroma between the cells: fibres along one of the two axes
    sigma = (1.0, rng.uniform(3.0, 8.0)) if rng.random() < 0.5 else (rng.uniform(3.0, 8.0), 1.0)
    fibres = np.clip(_unit_noise(rng, shape, sigma), 0.0, None)
    out += (rng.uniform(0.0, 0.3) * level) * fibres * (cells == 0)

    out += (0.02 * level) * rng.standard_normal(shape).astype(np.float32)
    return np.clip(out, 0.0, None)
