"""Per-object measurements, as ``skimage.measure.regionprops_table`` names them.

Columns: ``label``, ``area``, ``centroid-0/1`` (row, column), ``bbox-0..3`` (min row, min col,
max row, max col; max exclusive), ``eccentricity``, ``solidity``, ``perimeter``,
``axis_major_length``, ``axis_minor_length``, ``orientation`` and, with an intensity image,
``intensity_mean``, ``intensity_min``, ``intensity_max`` and ``intensity_sum`` per channel
(suffixed ``-0``, ``-1``, ... for multichannel images, as regionprops_table does).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from skimage.measure import regionprops_table

SHAPE_PROPERTIES = ("label", "area", "centroid", "bbox", "eccentricity", "solidity", "perimeter",
                    "axis_major_length", "axis_minor_length", "orientation")
INTENSITY_PROPERTIES = ("intensity_mean", "intensity_min", "intensity_max")


def measure(labels: np.ndarray, image: np.ndarray | None = None) -> pd.DataFrame:
    """One row per object of ``labels`` ``(H, W)``; ``image`` ``(H, W)`` or ``(H, W, C)``."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (H, W), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got {labels.dtype}")
    props = list(SHAPE_PROPERTIES)
    intensity = None
    if image is not None:
        intensity = np.asarray(image)
        if intensity.shape[:2] != labels.shape:
            raise ValueError(f"image {intensity.shape} and labels {labels.shape} differ in size")
        intensity = intensity.astype(np.float64, copy=False)
        props += INTENSITY_PROPERTIES
    table = pd.DataFrame(regionprops_table(labels, intensity_image=intensity, properties=props))
    if intensity is not None:
        for col in [c for c in table.columns if c.startswith("intensity_mean")]:
            table[col.replace("intensity_mean", "intensity_sum")] = table[col] * table["area"]
    return table
