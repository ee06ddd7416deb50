"""Tissue detection for brightfield slides: which tiles hold tissue at all.

Most of a whole-slide image is empty glass. As QuPath and TIAToolbox do, the tissue is found on
a low-resolution view of the slide: the mean optical density of each pixel (glass is ~0,
stained tissue well above), thresholded by Otsu's method between bounds that keep faint
stroma, and grown by a margin. A tile whose whole read window (core and halo) holds no tissue
is recorded as empty without going through the network; the stitching and resume see an
ordinary, empty tile record.

Frames: the mask is ``(h, w)`` bool over the slide downsampled by ``step`` (level-0 pixel
``(y, x)`` lies in mask pixel ``(y // step, x // step)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cellmask.appearance import Appearance, optical_density

log = logging.getLogger(__name__)

#: Side, in pixels, of the longest edge of the low-resolution view.
VIEW_SIDE = 2048
#: Bounds of the optical-density threshold: Otsu's value is clipped into them, so that a
#: slide that is all tissue (Otsu then splits tissue from tissue) keeps its faint parts, and
#: one that is nearly all glass does not count scanner noise as tissue.
OD_BOUNDS = (0.02, 0.08)
#: Margin (level-0 pixels) added around the tissue.
MARGIN = 32


@dataclass(frozen=True)
class TissueMask:
    """Tissue of a slide on a grid of ``step`` level-0 pixels; ``threshold``: the optical
    density used."""

    mask: np.ndarray
    step: float
    threshold: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def covers(self, region: tuple[int, int, int, int]) -> bool:
        """Whether any tissue lies in the level-0 region ``(y0, y1, x0, x1)``."""
        y0, y1, x0, x1 = region
        s = self.step
        return bool(self.mask[int(y0 // s):int(np.ceil(y1 / s)),
                              int(x0 // s):int(np.ceil(x1 / s))].any())


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (``skimage.filters.threshold_otsu``, imported lazily)."""
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.min()) == float(values.max()):
        return float(values.max()) if values.size else 0.0
    return float(threshold_otsu(values, nbins=bins))


def tissue_mask(view: np.ndarray, step: float, appearance: Appearance) -> TissueMask:
    """The tissue of a low-resolution RGB view ``(h, w, 3)`` of the slide (each pixel one of
    ``step`` x ``step`` level-0 pixels), with the slide's glass brightness from
    ``appearance``."""
    from scipy import ndimage

    od = optical_density(np.moveaxis(view, -1, 0), np.asarray(appearance.background)).mean(0)
    threshold = float(np.clip(otsu(od.ravel()), *OD_BOUNDS))
    mask = od > threshold
    mask = ndimage.binary_opening(mask, iterations=1)  # lone noisy pixels
    grow = max(1, int(np.ceil(MARGIN / step)))
    mask = ndimage.binary_dilation(mask, iterations=grow)
    return TissueMask(mask, step, threshold)


def view_step(shape: tuple[int, int]) -> int:
    """Downsampling of the low-resolution view of a level-0 image of ``shape``."""
    return max(1, int(np.ceil(max(shape) / VIEW_SIDE)))
