"""Quality signals: per object, where the model may be failing; per run, a summary.

Per object (columns of the measurements table): ``score`` (detection score), ``mask_confidence``
(mean mask probability over the object's pixels: near 1 for a sure outline), ``touches_border``
(the object's box reaches the image edge: it may be cut by the field of view) and
``crosses_seam`` (its box spans two tile cores: it was stitched).

Per run (``qc.json`` beside the table, and the log): object count, area quantiles, size
outliers (area beyond 3 interquartile ranges of the quartiles, by label), low-confidence objects
(score or mask confidence under :data:`LOW`), objects larger than the halo (they can be cut at
seams: raise the halo), and a coarse map of the mean score per tile (where on the slide the
model is unsure; tiles without objects are null).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Score or mask confidence under which an object counts as low-confidence.
LOW = 0.6


def object_signals(table: pd.DataFrame, scores: np.ndarray, confidence: np.ndarray,
                   shape: tuple[int, int], tile: int) -> pd.DataFrame:
    """``table`` (one row per label, id = position + 1 of ``scores``) with the per-object
    signals added."""
    ids = table["label"].to_numpy(np.int64) - 1
    out = table.copy()
    out["score"] = scores[ids].astype(np.float64)
    out["mask_confidence"] = confidence[ids].astype(np.float64)
    y0, x0 = table["bbox-0"].to_numpy(), table["bbox-1"].to_numpy()
    y1, x1 = table["bbox-2"].to_numpy(), table["bbox-3"].to_numpy()
    out["touches_border"] = (y0 <= 0) | (x0 <= 0) | (y1 >= shape[0]) | (x1 >= shape[1])
    out["crosses_seam"] = ((y0 // tile) != ((y1 - 1) // tile)) | ((x0 // tile) != ((x1 - 1)
                                                                                   // tile))
    return out


def run_summary(table: pd.DataFrame, shape: tuple[int, int], tile: int, halo: int) -> dict:
    """The run's quality summary from a table with :func:`object_signals`."""
    n = len(table)
    summary: dict = {"objects": n, "low_confidence_threshold": LOW}
    if n == 0:
        return summary
    area = table["area"].to_numpy(np.float64)
    q1, q3 = np.percentile(area, [25, 75])
    spread = 3 * (q3 - q1)
    outliers = table["label"][(area > q3 + spread) | (area < q1 - spread)]
    low = (table["score"] < LOW) | (table["mask_confidence"] < LOW)
    side = np.maximum(table["bbox-2"] - table["bbox-0"], table["bbox-3"] - table["bbox-1"])
    ny, nx = -(-shape[0] // tile), -(-shape[1] // tile)
    cy = ((table["bbox-0"] + table["bbox-2"]) // 2 // tile).clip(0, ny - 1).to_numpy()
    cx = ((table["bbox-1"] + table["bbox-3"]) // 2 // tile).clip(0, nx - 1).to_numpy()
    sums = np.zeros((ny, nx))
    counts = np.zeros((ny, nx))
    np.add.at(sums, (cy, cx), table["score"].to_numpy())
    np.add.at(counts, (cy, cx), 1)
    grid = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    summary.update({
        "area_px_quantiles": dict(zip(("5", "25", "50", "75", "95"),
                                      np.percentile(area, [5, 25, 50, 75, 95]).round(1)
                                      .tolist())),
        "size_outliers": int(len(outliers)), "size_outlier_labels": outliers.tolist()[:100],
        "low_confidence": int(low.sum()),
        "touching_border": int(table["touches_border"].sum()),
        "crossing_seams": int(table["crosses_seam"].sum()),
        "larger_than_halo": int((side > halo).sum()),
        "mean_score_per_tile": [[None if np.isnan(v) else round(float(v), 3) for v in row]
                                for row in grid],
    })
    return summary
