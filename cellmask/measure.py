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


def measure_instances(kept, source, cell: int = 1024, read=None) -> pd.DataFrame:
    """Measurements of resolved whole-image instances (:class:`cellmask.stitch.InstanceSet`,
    id = position + 1), reading ``source`` (:class:`cellmask.sources.ImageSource`) region by region.

    Each object is measured on its complete mask, wherever tile or chunk borders fall, so the
    table equals ``regionprops_table`` of the whole label image. Objects are grouped by the
    ``cell`` the top-left corner of their window falls in; each group's bounding region is read
    once, with ``read(region)`` (``(y0, y1, x0, x1)`` -> ``(h, w, C)``) if given.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (x0, y0, _, _) in enumerate(kept.windows):
        groups.setdefault((int(y0) // cell, int(x0) // cell), []).append(k)
    frames = []
    for key in sorted(groups):
        ks = groups[key]
        w = kept.windows[ks]
        rx0, ry0 = int(w[:, 0].min()), int(w[:, 1].min())
        rx1, ry1 = int(w[:, 2].max()), int(w[:, 3].max())
        local = np.zeros((ry1 - ry0 + 2, rx1 - rx0 + 2), np.int32)  # 1 px margin: perimeter
        for k in ks:
            x0, y0, x1, y1 = (int(v) for v in kept.windows[k])
            local[y0 - ry0 + 1:y1 - ry0 + 1, x0 - rx0 + 1:x1 - rx0 + 1][kept.masks[k]] = k + 1
        region = (read((ry0, ry1, rx0, rx1)) if read is not None
                  else source.array[ry0:ry1, rx0:rx1].compute())
        region = np.asarray(region, dtype=np.float64)
        image = np.zeros(local.shape + region.shape[2:], np.float64)
        image[1:-1, 1:-1] = region
        if image.shape[-1] == 1:
            image = image[..., 0]
        table = measure(local, image)
        for col, off in (("centroid-0", ry0 - 1), ("centroid-1", rx0 - 1), ("bbox-0", ry0 - 1),
                         ("bbox-1", rx0 - 1), ("bbox-2", ry0 - 1), ("bbox-3", rx0 - 1)):
            table[col] += off
        frames.append(table)
    if not frames:
        return measure(np.zeros((1, 1), np.int32), np.zeros((1, 1)))
    return pd.concat(frames).sort_values("label").reset_index(drop=True)
