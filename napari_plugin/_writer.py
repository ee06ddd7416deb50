"""Writers for labels layers: an NGFF labels image in an OME-Zarr, or a TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_labels_zarr(path: str, data, meta: dict) -> list[str]:
    """Write ``data`` ``(Y, X)`` as ``labels/<layer name>`` (NGFF, 3-level pyramid) in ``path``;
    an existing image in ``path`` is kept, only its ``labels`` group is added to."""
    from cellmask.labels_store import create_labels, write_pyramid

    labels = np.asarray(data[0] if isinstance(data, list) else data)
    if labels.ndim != 2:
        raise ValueError(f"only 2-D labels can be written (got shape {labels.shape})")
    name = str(meta.get("name") or "labels").replace("/", "_")
    scale = meta.get("scale")
    pixel = (float(scale[-2]), float(scale[-1])) if scale is not None else None
    group = create_labels(Path(path), name, labels.shape, 1024, pixel_size=pixel, source=None)
    group["0"][:] = labels.astype(np.int32)
    write_pyramid(group)
    return [path]


def write_labels_tiff(path: str, data, meta: dict) -> list[str]:
    import tifffile

    labels = np.asarray(data[0] if isinstance(data, list) else data)
    tifffile.imwrite(path, labels.astype(np.int32 if labels.max() > 65535 else np.uint16),
                     compression="zlib")
    return [path]
