"""Cells and cytoplasm grown from the nuclei, and every channel measured in every compartment.

**Cells**: each nucleus grows by ``distance`` pixels into the background, never into another
nucleus or cell: a background pixel within ``distance`` of a nucleus joins the nearest one
(:func:`skimage.segmentation.expand_labels`, as QuPath's ``cellExpansionMicrons``). The
cytoplasm is the cell without its nucleus. Ids are the nuclei's. Painted tile by tile: a
tile's core reads the nuclei of its core plus ``distance + 1`` pixels around it, so every
pixel sees every nucleus that could claim it and the tiled result equals the whole image's.

**Measurements** (:func:`measure_compartments`), one row per nucleus, columns
``<compartment>.<measurement>`` and ``<compartment>.<statistic>.<channel>``:

- morphology: ``area``, ``perimeter``, ``eccentricity``, ``solidity``, ``axis_major_length``,
  ``axis_minor_length``, ``centroid_y``, ``centroid_x`` (pixels, skimage's definitions); with a
  known pixel size also ``area_um2``, ``perimeter_um``, ``axis_major_length_um``,
  ``axis_minor_length_um``, ``centroid_y_um``, ``centroid_x_um``;
- every channel (named from the OME metadata, else ``ch0``, ``ch1``...; "R", "G", "B" for
  colour): ``mean``, ``median``, ``min``, ``max``, ``std`` (population), ``sum``.

``nucleus.mean.DAPI``, ``cell.mean.CD45``, ``cytoplasm.area_um2``. Objects are measured in
groups (those whose nucleus box starts in the same tile), each group on one region read once,
so a slide larger than memory is measured with the memory of a few tiles.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

COMPARTMENTS = ("nucleus", "cytoplasm", "cell")
MORPHOLOGY = ("area", "perimeter", "eccentricity", "solidity", "axis_major_length",
              "axis_minor_length", "centroid")
STATISTICS = ("mean", "median", "min", "max", "std", "sum")
#: Morphology columns with a physical counterpart: name -> (suffix, power of the pixel size).
_PHYSICAL = {"area": ("_um2", 2), "perimeter": ("_um", 1), "axis_major_length": ("_um", 1),
             "axis_minor_length": ("_um", 1), "centroid_y": ("_um", 1),
             "centroid_x": ("_um", 1)}


def margin(distance: float) -> int:
    """Pixels of context a tile needs to grow its cells exactly."""
    return int(math.ceil(distance)) + 1


def grow_cells(nuclei: np.ndarray, distance: float) -> np.ndarray:
    """Cell labels ``(h, w)`` of nucleus labels ``(h, w)``, each grown by ``distance`` px."""
    from skimage.segmentation import expand_labels

    if distance <= 0:
        return nuclei.copy()
    return expand_labels(nuclei, distance)


def cells_of_region(nuclei_level0, region: tuple[int, int, int, int], distance: float,
                    shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(nucleus, cell, cytoplasm)`` labels of ``region`` ``(y0, y1, x0, x1)``, reading the
    nuclei of the region plus :func:`margin` pixels (clipped to ``shape``)."""
    y0, y1, x0, x1 = region
    m = margin(distance)
    wy0, wx0 = max(0, y0 - m), max(0, x0 - m)
    wy1, wx1 = min(shape[0], y1 + m), min(shape[1], x1 + m)
    window = np.asarray(nuclei_level0[wy0:wy1, wx0:wx1])
    core = (slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0))
    nucleus = window[core]
    cell = grow_cells(window, distance)[core]
    return nucleus, cell, np.where(nucleus == 0, cell, 0)


def _statistics(lab: np.ndarray, image: np.ndarray, labels: np.ndarray,
                stats: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per label of ``labels`` (sorted) and per channel of ``image`` ``(h, w, C)``: the
    ``stats``; NaN for labels without pixels."""
    flat = lab.ravel()
    pix = np.flatnonzero(flat)
    ids = flat[pix]
    values = image.reshape(-1, image.shape[-1])[pix]
    out: dict[str, np.ndarray] = {}
    present, area = np.unique(ids, return_counts=True)
    where = np.searchsorted(labels, present)
    for k in range(values.shape[1]):
        v = values[:, k]
        order = np.lexsort((v, ids))
        sv, sid = v[order], ids[order]
        starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]]) if len(sid) else np.zeros(
            0, np.int64)
        sums = np.add.reduceat(sv, starts) if len(starts) else np.zeros(0)
        mean = sums / area
        group = np.repeat(np.arange(len(present)), area)
        found = {"mean": mean, "sum": sums,
                 "min": sv[starts] if len(starts) else np.zeros(0),
                 "max": sv[starts + area - 1] if len(starts) else np.zeros(0)}
        if "std" in stats:
            dev = sv - mean[group]
            found["std"] = np.sqrt(np.add.reduceat(dev * dev, starts) / area) if len(
                starts) else np.zeros(0)
        if "median" in stats:
            found["median"] = (sv[starts + (area - 1) // 2] + sv[starts + area // 2]) / 2 \
                if len(starts) else np.zeros(0)
        for stat in stats:
            col = np.full(len(labels), np.nan)
            col[where] = found[stat]
            out[f"{stat}.{k}"] = col
    return out


def _morphology(lab: np.ndarray, labels: np.ndarray, offset: tuple[int, int]
                ) -> dict[str, np.ndarray]:
    """Morphology of every label of ``labels`` in ``lab`` (whose border is 0), in the image's
    frame (``offset`` = image position of ``lab[1, 1]``); NaN for labels without pixels."""
    from cellmask.measure import _measure_padded

    t = _measure_padded(lab.astype(np.int64), None)
    where = np.searchsorted(labels, t["label"].to_numpy())
    out = {}
    for name, col in (("area", "area"), ("perimeter", "perimeter"),
                      ("eccentricity", "eccentricity"), ("solidity", "solidity"),
                      ("axis_major_length", "axis_major_length"),
                      ("axis_minor_length", "axis_minor_length"),
                      ("centroid_y", "centroid-0"), ("centroid_x", "centroid-1")):
        values = np.full(len(labels), np.nan)
        values[where] = t[col].to_numpy(np.float64)
        out[name] = values
    out["centroid_y"] += offset[0] - 1
    out["centroid_x"] += offset[1] - 1
    return out


def measure_compartments(label_images: dict[str, object], read_image, channels: list[str],
                         nuclei_table: pd.DataFrame, tile: int, distance: float = 0.0,
                         pixel_size_um: float | None = None,
                         measurements: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per nucleus of ``nuclei_table`` (``label``, ``bbox-0..3``): the measurements of
    each compartment of ``label_images`` (name -> level-0 array ``(Y, X)``), ``read_image(
    region)`` giving the pixels ``(h, w, C)`` of all ``channels``.

    ``measurements``: the names of :data:`MORPHOLOGY` and :data:`STATISTICS` to compute
    (default all), for images with dozens of channels.
    """
    chosen = tuple(measurements) if measurements else MORPHOLOGY + STATISTICS
    unknown = sorted(set(chosen) - set(MORPHOLOGY) - set(STATISTICS))
    if unknown:
        from cellmask.errors import InputError

        raise InputError(f"unknown measurements {unknown}: choose from "
                         f"{', '.join(MORPHOLOGY + STATISTICS)}")
    stats = tuple(s for s in STATISTICS if s in chosen)
    shape_cols = [m for m in ("area", "perimeter", "eccentricity", "solidity",
                              "axis_major_length", "axis_minor_length") if m in chosen]
    if "centroid" in chosen:
        shape_cols += ["centroid_y", "centroid_x"]
    first = next(iter(label_images.values()))
    h, w = first.shape
    grow = margin(distance) if distance > 0 else 0
    table = nuclei_table.sort_values("label")
    frames = []
    key = (table["bbox-0"].to_numpy() // tile) * (w // tile + 1) + table["bbox-1"].to_numpy() \
        // tile
    for k in np.unique(key):
        rows = table[key == k]
        ids = rows["label"].to_numpy(np.int64)
        y0 = max(0, int(rows["bbox-0"].min()) - grow)
        x0 = max(0, int(rows["bbox-1"].min()) - grow)
        y1 = min(h, int(rows["bbox-2"].max()) + grow)
        x1 = min(w, int(rows["bbox-3"].max()) + grow)
        image = np.asarray(read_image((y0, y1, x0, x1)), np.float64)
        if image.ndim == 2:
            image = image[..., None]
        part = {"label": ids}
        for comp, array in label_images.items():
            lab = np.asarray(array[y0:y1, x0:x1]).astype(np.int64)
            lab = np.where(np.isin(lab, ids), lab, 0)  # neighbours of other groups: not ours
            padded = np.pad(lab, 1)
            if shape_cols:
                morph = _morphology(padded, ids, (y0, x0))
                for name in shape_cols:
                    part[f"{comp}.{name}"] = morph[name]
            if stats:
                for col, values in _statistics(lab, image, ids, stats).items():
                    stat, channel = col.split(".")
                    part[f"{comp}.{stat}.{channels[int(channel)]}"] = values
        frames.append(pd.DataFrame(part))
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"label": []})
    if pixel_size_um:
        for comp in label_images:
            for name, (suffix, power) in _PHYSICAL.items():
                col = f"{comp}.{name}"
                if col in out:
                    out[col + suffix] = out[col] * pixel_size_um ** power
    cols = ["label"] + sorted((c for c in out.columns if c != "label"),
                              key=lambda c: (COMPARTMENTS.index(c.split(".")[0])
                                             if c.split(".")[0] in COMPARTMENTS else 9, c))
    return out[cols].sort_values("label", ignore_index=True)
