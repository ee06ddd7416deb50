"""Input checking and intensity normalisation shared by training and inference.

Frames: an image arrives as ``(H, W)`` (grey) or ``(H, W, C)`` with ``C`` in {1, 3} (channels
last, as numpy, tifffile and napari give them) and leaves as a float32 ``(3, H, W)`` array,
channels first, each channel mapped so that its low percentile goes to 0 and its high
percentile to 1. Grey images are replicated to three channels, so one network serves
fluorescence, brightfield and H&E.
"""

from __future__ import annotations

import numpy as np

from cellmask.errors import InputError  # noqa: F401  (re-exported)

#: The conversions ``as_channels_first`` performs, for the documentation of ``segment``.
SUPPORTED = ("(H, W) grey or (H, W, 1), (H, W, 3) RGB; any integer, float or bool dtype "
             "(bool becomes 0/1)")


def as_channels_first(image: np.ndarray) -> np.ndarray:
    """Check ``image`` and return it as float32 ``(C, H, W)`` with C in {1, 3}, unnormalised."""
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"image dtype {arr.dtype} is not numeric: pass an integer or float array")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3):
        arr = np.moveaxis(arr, -1, 0)
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        raise InputError(f"image of shape {arr.shape} has 4 channels: if it is RGBA, pass "
                         "image[..., :3]; otherwise pass the nuclear channel alone")
    else:
        raise InputError(f"image of shape {arr.shape} is not (H, W) or (H, W, 3): select one "
                         "plane and the nuclear channel first, e.g. image[z, c]")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InputError(f"image of shape {np.asarray(image).shape} is empty")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InputError(f"image has {bad} NaN or infinite pixels: replace them (e.g. "
                         "np.nan_to_num(image)) before segmenting")
    return arr


def percentile_range(chw: np.ndarray, percentiles: tuple[float, float],
                     max_samples: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) intensity percentiles of a ``(C, H, W)`` array.

    Large images are subsampled on a regular grid (at most ``max_samples`` pixels per channel),
    so the statistics are those of the whole image, never of a tile.
    """
    lo, hi = np.percentile(sample_pixels(chw, max_samples), percentiles, axis=0)
    return lo.astype(np.float32), hi.astype(np.float32)


def sample_step(shape: tuple[int, int], max_samples: int = 4_000_000) -> int:
    """Stride of the regular sample of at most about ``max_samples`` pixels of an image of
    ``shape`` ``(h, w)`` that every whole-image estimate is taken from."""
    h, w = shape
    return max(1, int(np.ceil(np.sqrt(h * w / max_samples))))


def sample_view(chw: np.ndarray, max_samples: int = 4_000_000) -> tuple[np.ndarray, int]:
    """The regular strided sample of an in-memory ``(C, H, W)`` image as a low-resolution
    ``(h, w, C)`` view, and its stride: at most ``max_samples`` pixels per channel (the same
    grid whole-slide runs take, so both estimate alike)."""
    step = sample_step(chw.shape[1:], max_samples)
    return np.moveaxis(chw[:, ::step, ::step], 0, -1), step


def sample_pixels(chw: np.ndarray, max_samples: int = 4_000_000) -> np.ndarray:
    """:func:`sample_view` as pixels ``(N, C)``."""
    view, _ = sample_view(chw, max_samples)
    return view.reshape(-1, chw.shape[0])


def apply_range(chw: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Map each channel of ``(C, H, W)`` (any real dtype) so ``lo`` -> 0 and ``hi`` -> 1, in
    float32; returns 3 channels, written once into one array."""
    lo = np.asarray(lo, np.float32)
    span = np.maximum(hi - lo, 1e-6).astype(np.float32)
    c = chw.shape[0]
    out = np.empty((3 if c == 1 else c,) + chw.shape[1:], np.float32)
    np.subtract(chw, lo[:, None, None], out=out[:c], dtype=np.float32)
    np.divide(out[:c], span[:, None, None], out=out[:c])
    if c == 1:
        out[1:] = out[0]
    return out


def normalize(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.8)) -> np.ndarray:
    """Check and normalise one image: any accepted input -> float32 ``(3, H, W)``."""
    chw = as_channels_first(image)
    lo, hi = percentile_range(chw, percentiles)
    return apply_range(chw, lo, hi)
