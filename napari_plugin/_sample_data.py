"""Sample data: real nuclei shipped with cellmask."""

from __future__ import annotations

import numpy as np

from cellmask.samples import SAMPLES, load_sample


def nuclei():
    """The 512x512 StarDist sample (BSD-3-Clause) and its annotation."""
    image, truth = load_sample()
    return [(image, {"name": "nuclei", "metadata": {"source": SAMPLES["nuclei_stardist"]}},
             "image"),
            (truth.astype(np.int32), {"name": "nuclei annotation", "visible": False}, "labels")]


def nuclei_mosaic(size: int = 3072):
    """A larger image for trying tiling: the sample mirrored into a ``size`` x ``size`` mosaic
    (every tile is the real image, flipped, so seams hold real nuclei)."""
    image, _ = load_sample()
    reps = -(-size // image.shape[0])
    rows = []
    for i in range(reps):
        row = [image[:: (-1) ** i, :: (-1) ** j] for j in range(reps)]
        rows.append(np.concatenate(row, axis=1))
    mosaic = np.ascontiguousarray(np.concatenate(rows, axis=0)[:size, :size])
    return [(mosaic, {"name": "nuclei mosaic"}, "image")]
