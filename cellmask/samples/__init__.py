"""Real nuclei images shipped with cellmask, with their annotations.

``nuclei_stardist``: a 512x512 uint16 fluorescence image of 125 annotated nuclei, the sample
bundled with StarDist (BSD-3-Clause, (c) 2018-2024 Uwe Schmidt, Martin Weigert;
https://github.com/stardist/stardist).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import tifffile

SAMPLES = {"nuclei_stardist": "BSD-3-Clause, StarDist sample image (Schmidt & Weigert)"}


def sample_path(name: str = "nuclei_stardist", masks: bool = False):
    if name not in SAMPLES:
        raise KeyError(f"no sample {name!r}; available: {', '.join(SAMPLES)}")
    suffix = "_masks" if masks else ""
    return resources.files(__name__) / f"{name}{suffix}.tif"


def load_sample(name: str = "nuclei_stardist") -> tuple[np.ndarray, np.ndarray]:
    """``(image, ground-truth labels)`` of a shipped sample."""
    with resources.as_file(sample_path(name)) as p:
        image = tifffile.imread(p)
    with resources.as_file(sample_path(name, masks=True)) as p:
        labels = tifffile.imread(p)
    return image, labels
