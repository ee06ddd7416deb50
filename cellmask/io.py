"""Reading images and writing results: TIFF / numpy in, OME-Zarr labels and tables out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cellmask.normalize import InputError

log = logging.getLogger(__name__)

LABELS_NAME = "cellmask"


def read_image(path: str | Path) -> np.ndarray:
    """An in-memory image from a TIFF, PNG/JPEG or ``.npy`` file, with a clear error if unreadable."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff", ".svs"):
            import tifffile

            return tifffile.imread(path)
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        import imageio.v3 as iio

        return iio.imread(path)
    except Exception as err:  # a parser meeting a broken file raises many types
        raise InputError(f"cannot read {path} as an image ({type(err).__name__}: {err}); "
                         "is it a complete TIFF/PNG/.npy file?") from None


def write_ome_zarr(path: str | Path, image: np.ndarray, labels: np.ndarray,
                   name: str = LABELS_NAME, *, properties: list[dict] | None = None) -> Path:
    """Write ``image`` as an NGFF 0.5 image and ``labels`` as its ``labels/<name>`` image.

    ``image`` is ``(H, W)`` or ``(H, W, C)``; it is stored as ``(C, Y, X)`` or ``(Y, X)``.
    Labels get a 3-level pyramid (nearest-neighbour) and ``image-label`` metadata whose
    ``source`` points back at the image. An existing ``path`` is refused, never overwritten.
    """
    import zarr
    from ome_zarr.writer import write_image, write_labels

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists: choose a new output path or delete it")
    root = zarr.open_group(str(path), mode="w-")
    img = np.asarray(image)
    axes = "yx"
    if img.ndim == 3:
        img = np.moveaxis(img, -1, 0)
        axes = "cyx"
    write_image(img, root, axes=axes, scale_factors=(2, 4))
    meta = {"source": {"image": "../../"}}
    if properties:
        meta["properties"] = properties
    write_labels(np.asarray(labels, dtype=np.int32), root, name=name, axes="yx", scaler=None,
                 scale_factors=(2, 4), label_metadata=meta)
    log.info("wrote %s (labels/%s)", path, name)
    return path


def read_ome_zarr_labels(path: str | Path, name: str = LABELS_NAME) -> np.ndarray:
    """The level-0 labels of ``labels/<name>`` in an OME-Zarr, in memory."""
    from cellmask.labels_store import labels_level0

    return np.asarray(labels_level0(path, name))
