"""Dense test images built from real annotated nuclei: a mosaic of DSB2018 fluorescence crops.

Crops of ``crop`` x ``crop`` px are taken from the densest images of a split (objects per pixel),
so the mosaic holds real nuclei at real density with exact ground truth (labels offset per crop;
objects cut by a crop edge stay as the partial objects they are). Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018"


def dense_mosaic(size: int, *, data: Path = DEFAULT_DATA, split: str = "fluo_train.txt",
                 crop: int = 256, densest: int = 40, seed: int = 0):
    """``(image uint8 (size, size), labels int32 (size, size))`` of real dense nuclei."""
    ids = [s for s in (data / "splits" / split).read_text().split() if s]
    density = []
    for name in ids:
        m = tifffile.imread(data / "masks" / f"{name}.tif")
        density.append((m.max() / m.size, name))
    pool = [n for _, n in sorted(density, reverse=True)[:densest]]
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size), np.uint8)
    labels = np.zeros((size, size), np.int32)
    offset = 0
    for y in range(0, size, crop):
        for x in range(0, size, crop):
            name = pool[rng.integers(len(pool))]
            im = tifffile.imread(data / "images" / f"{name}.tif")
            m = tifffile.imread(data / "masks" / f"{name}.tif").astype(np.int32)
            if im.ndim == 3:
                im = im[..., :3].mean(-1)
            h, w = min(crop, size - y), min(crop, size - x)
            y0 = rng.integers(0, im.shape[0] - h + 1)
            x0 = rng.integers(0, im.shape[1] - w + 1)
            piece = im[y0:y0 + h, x0:x0 + w].astype(np.float32)
            # bring every crop to a common intensity range, as one slide would have
            lo, hi = np.percentile(piece, (1, 99.8))
            image[y:y + h, x:x + w] = np.clip((piece - lo) / max(hi - lo, 1) * 200 + 10, 0, 255)
            mp = m[y0:y0 + h, x0:x0 + w]
            ids_here, inv = np.unique(mp, return_inverse=True)
            relabelled = inv.reshape(mp.shape).astype(np.int32)
            if ids_here[0] != 0:
                relabelled += 1
            relabelled[mp == 0] = 0
            labels[y:y + h, x:x + w] = np.where(relabelled > 0, relabelled + offset, 0)
            offset = int(labels.max())
    return image, labels
