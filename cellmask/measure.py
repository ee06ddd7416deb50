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

from cellmask.errors import InputError
from cellmask.sources import sync_scheduler

SHAPE_PROPERTIES = ("label", "area", "centroid", "bbox", "eccentricity", "solidity", "perimeter",
                    "axis_major_length", "axis_minor_length", "orientation")
INTENSITY_PROPERTIES = ("intensity_mean", "intensity_min", "intensity_max")

# skimage.measure.perimeter (4-neighbourhood): weights of the codes of border pixels.
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2


def measure(labels: np.ndarray, image: np.ndarray | None = None) -> pd.DataFrame:
    """One row per object of ``labels`` ``(H, W)``; ``image`` ``(H, W)`` or ``(H, W, C)``.

    The values are those of ``skimage.measure.regionprops_table`` (same definitions, tested to
    1e-6), computed for all objects at once with array reductions instead of one Python
    object per region (convex hulls included).
    ``orientation`` is +-pi/2 alike for objects whose axes are exactly along the image axes
    (the sign there depends on rounding, in regionprops too).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InputError(f"labels must be 2-D (H, W), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be an integer array, got {labels.dtype}")
    intensity = None
    if image is not None:
        intensity = np.asarray(image)
        if intensity.shape[:2] != labels.shape:
            raise InputError(f"image {intensity.shape} and labels {labels.shape} differ in size")
    padded = np.pad(labels.astype(np.int64, copy=False), 1)
    if intensity is not None:
        intensity = np.pad(intensity.astype(np.float64, copy=False),
                           ((1, 1), (1, 1)) + ((0, 0),) * (intensity.ndim - 2))
    table = _measure_padded(padded, intensity)
    for col in ("centroid-0", "centroid-1", "bbox-0", "bbox-1", "bbox-2", "bbox-3"):
        table[col] -= 1
    return table


def _measure_padded(lab: np.ndarray, image: np.ndarray | None,
                    hulls: list | None = None) -> pd.DataFrame:
    """Measurements of ``lab`` ``(H, W)`` int, whose outermost rows and columns are 0.

    Coordinates are in ``lab``'s frame. ``image``: ``(H, W)`` or ``(H, W, C)`` float64 or None.
    ``hulls``: if a list, the convex hulls are left to the caller (one pass over the objects
    of many frames costs less than one per frame): the inputs of :func:`_convex_areas` are
    appended to it and ``solidity`` holds the area until divided by the hull's.
    """
    h, w = lab.shape
    flat = lab.ravel()
    pix = np.flatnonzero(flat)
    ids = flat[pix]
    order = np.argsort(ids, kind="stable")  # by label, then raster order inside each label
    pix, ids = pix[order], ids[order]
    label, starts, area = np.unique(ids, return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(label)), area)
    r, c = (pix // w).astype(np.float64), (pix % w).astype(np.float64)
    cr = np.add.reduceat(r, starts) / area if len(label) else np.zeros(0)
    cc = np.add.reduceat(c, starts) / area if len(label) else np.zeros(0)
    dr, dc = r - cr[group], c - cc[group]
    mu20, mu02, mu11 = (_sums(v, starts) for v in (dr * dr, dc * dc, dr * dc))
    # inertia tensor [[a, b], [b, c]] as regionprops builds it from the central moments
    a, b, cz = mu02 / area, -mu11 / area, mu20 / area
    half_trace, root = (a + cz) / 2, np.sqrt(((a - cz) / 2) ** 2 + b ** 2)
    l1 = np.clip(half_trace + root, 0, None)
    l2 = np.clip(half_trace - root, 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where(l1 == 0, 0.0, np.sqrt(np.clip(1 - l2 / np.where(l1 == 0, 1, l1), 0, 1)))
    orientation = np.where(a - cz == 0, np.where(b < 0, np.pi / 4, -np.pi / 4),
                           0.5 * np.arctan2(-2 * b, cz - a))
    rows, cols = pix // w, pix % w
    bbox = (_reduce(np.minimum, rows, starts), _reduce(np.minimum, cols, starts),
            _reduce(np.maximum, rows, starts) + 1, _reduce(np.maximum, cols, starts) + 1)
    table = {"label": label, "area": area.astype(np.float64), "centroid-0": cr,
             "centroid-1": cc, "bbox-0": bbox[0], "bbox-1": bbox[1], "bbox-2": bbox[2],
             "bbox-3": bbox[3], "eccentricity": ecc,
             "solidity": (area / _convex_areas(group, rows, cols, len(label), bbox)
                          if hulls is None else area.astype(np.float64)),
             "perimeter": _perimeters(lab, label),
             "axis_major_length": 4 * np.sqrt(l1), "axis_minor_length": 4 * np.sqrt(l2),
             "orientation": orientation}
    if hulls is not None:
        hulls.append((group, rows, cols, bbox))
    if image is not None:
        values = image.reshape(h * w, -1)[pix]
        channels = values.shape[1]
        for k in range(channels):
            suffix = f"-{k}" if image.ndim == 3 else ""
            v = values[:, k]
            table[f"intensity_mean{suffix}"] = _sums(v, starts) / area
            table[f"intensity_min{suffix}"] = _reduce(np.minimum, v, starts)
            table[f"intensity_max{suffix}"] = _reduce(np.maximum, v, starts)
        for k in range(channels):
            suffix = f"-{k}" if image.ndim == 3 else ""
            table[f"intensity_sum{suffix}"] = table[f"intensity_mean{suffix}"] * area
    return pd.DataFrame(table)


def _sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.add.reduceat(values, starts) if len(starts) else np.zeros(0)


def _reduce(ufunc, values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return ufunc.reduceat(values, starts) if len(starts) else np.zeros(0, values.dtype)


def _perimeters(lab: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``skimage.measure.perimeter(obj, 4)`` of every object at once.

    A pixel is a border pixel of its object when a 4-neighbour belongs to another label; its
    code is 1 + 2 x (4-neighbours that are border pixels of the same object) + 10 x (diagonal
    ones), which is what skimage's convolution of each object's own border image gives there.
    """
    h, w = lab.shape
    flat = lab.ravel()
    px = np.flatnonzero(flat)
    own = flat[px]
    inner = np.ones(len(px), bool)
    for d in (-w, w, -1, 1):
        inner &= flat[px + d] == own
    border = np.zeros(flat.shape, bool)
    bpx = px[~inner]
    border[bpx] = True
    bown = flat[bpx]
    code = np.ones(len(bpx), np.int64)
    for d, weight in ((-w, 2), (w, 2), (-1, 2), (1, 2), (-w - 1, 10), (-w + 1, 10),
                      (w - 1, 10), (w + 1, 10)):
        code += weight * (border[bpx + d] & (flat[bpx + d] == bown))
    index = np.searchsorted(label, bown)
    return np.bincount(index, weights=_PERIMETER_WEIGHTS[code], minlength=len(label))


def _convex_areas(group: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int,
                  bbox, lockstep_min: int = 24) -> np.ndarray:
    """``count_nonzero(convex_hull_image(obj))`` of every object, all objects at once.

    ``group``/``rows``/``cols``: object index and pixel coordinates of every object pixel,
    grouped by object and in raster order inside each. skimage hulls the edge midpoints of the
    pixels and counts the pixel centres inside or on the hull; a hull's left side at height y
    is the lower convex envelope of the leftmost midpoints there (and its right side the upper
    envelope of the rightmost ones), so each object needs only its row extremes on a half-pixel
    grid of heights. The envelopes are built by Andrew's monotone chain run in lockstep over
    all objects of similar height, then read at the pixel rows. Height classes with fewer than
    ``lockstep_min`` objects are hulled one by one by skimage itself.
    """
    out = np.zeros(n, np.int64)
    if n == 0:
        return out
    r0 = bbox[0]
    height = bbox[2] - r0
    # leftmost and rightmost column of each (object, row) run
    key = group * (int(rows.max()) + 1) + rows
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    last = np.r_[first[1:], len(key)] - 1
    run_obj, run_row = group[first], rows[first] - r0[group[first]]
    for lo, hi in ((1, 8), (9, 16), (17, 32), (33, 64), (65, 128), (129, 1 << 62)):
        members = np.flatnonzero((height >= lo) & (height <= hi))
        if len(members) == 0:
            continue
        if len(members) < lockstep_min:  # a few tall objects: lockstep steps cost more
            # imported here: scikit-image's morphology costs 0.5 s of every start-up
            from skimage.morphology import convex_hull_image

            for k in members:
                sel = slice(*np.searchsorted(group, [k, k + 1]))
                mask = np.zeros((height[k], bbox[3][k] - bbox[1][k]), bool)
                mask[rows[sel] - r0[k], cols[sel] - bbox[1][k]] = True
                out[k] = np.count_nonzero(convex_hull_image(mask))
            continue
        h = int(height[members].max())
        slot = np.full(n, -1)
        slot[members] = np.arange(len(members))
        sel = slot[run_obj] >= 0
        left = np.full((len(members), h), np.inf)
        right = np.full((len(members), h), -np.inf)
        left[slot[run_obj[sel]], run_row[sel]] = cols[first[sel]]
        right[slot[run_obj[sel]], run_row[sel]] = cols[last[sel]]
        xl = _envelope(_half_grid(left))
        xr = -_envelope(_half_grid(-right))  # the right side: the same, mirrored
        counts = np.floor(xr + 1e-9) - np.ceil(xl - 1e-9) + 1
        inside = np.arange(h)[None] < height[members][:, None]
        out[members] = np.where(inside, np.clip(counts, 0, None), 0).sum(1).astype(np.int64)
    return out


def _half_grid(edge: np.ndarray) -> np.ndarray:
    """Leftmost columns per row ``(m, h)`` (inf: no pixel) -> the hull's candidate x on the
    heights -0.5, 0, 0.5, ..., h - 0.5 ``(m, 2h + 1)``: pixel-centre rows get the left edge
    midpoint (``edge - 0.5``), half rows the smaller of the rows on either side."""
    m, h = edge.shape
    grid = np.full((m, 2 * h + 1), np.inf)
    grid[:, 1::2] = edge - 0.5
    pad = np.full((m, 1), np.inf)
    grid[:, 0::2] = np.fmin(np.hstack([pad, edge]), np.hstack([edge, pad]))
    return grid


def _envelope(f: np.ndarray) -> np.ndarray:
    """Lower convex envelope of each row of ``f`` ``(m, k)`` (inf = no point), evaluated at the
    odd positions 1, 3, ... (the pixel rows): Andrew's monotone chain, all rows in lockstep."""
    m, k = f.shape
    sx = np.zeros((m, k))
    sy = np.zeros((m, k))
    size = np.zeros(m, np.int64)
    rows = np.arange(m)
    for t in range(k):
        active = np.isfinite(f[:, t])
        y = np.where(active, f[:, t], 0.0)
        while True:
            can = active & (size >= 2)
            i1 = np.where(can, size - 1, 0)
            i0 = np.where(can, size - 2, 0)
            x0, y0 = sx[rows, i0], sy[rows, i0]
            x1, y1 = sx[rows, i1], sy[rows, i1]
            pop = can & ((x1 - x0) * (y - y0) - (y1 - y0) * (t - x0) <= 0)
            if not pop.any():
                break
            size -= pop
        idx = np.where(active, size, 0)
        sx[rows[active], idx[active]] = t
        sy[rows[active], idx[active]] = y[active]
        size += active
    # read the chain at the odd positions
    q = np.arange(1, k, 2)
    valid = np.arange(k)[None] < size[:, None]
    below = (sx[:, None, :] <= q[None, :, None]) & valid[:, None, :]
    seg = np.clip(below.sum(2) - 1, 0, np.maximum(size - 2, 0)[:, None])
    xa = np.take_along_axis(sx, seg, 1)
    ya = np.take_along_axis(sy, seg, 1)
    nxt = np.minimum(seg + 1, np.maximum(size - 1, 0)[:, None])
    xb = np.take_along_axis(sx, nxt, 1)
    yb = np.take_along_axis(sy, nxt, 1)
    span = np.where(xb > xa, xb - xa, 1.0)
    return ya + (yb - ya) * np.clip((q[None] - xa) / span, 0, 1)


def measure_instances(kept, source, cell: int = 1024, read=None,
                      threads: int = 1) -> pd.DataFrame:
    """Measurements of resolved whole-image instances (:class:`cellmask.stitch.InstanceSet`,
    id = position + 1), reading ``source`` (:class:`cellmask.sources.ImageSource`) region by region.

    Each object is measured on its complete mask, wherever tile or chunk borders fall, so the
    table equals ``regionprops_table`` of the whole label image. Objects are grouped by the
    ``cell`` the top-left corner of their window falls in; each group's bounding region is read
    once, with ``read(region)`` (``(y0, y1, x0, x1)`` -> ``(h, w, C)``) if given, and groups are
    measured by ``threads`` threads at once (numpy's reductions release the GIL); the convex
    hulls are found in one pass per run of groups of at most :data:`HULL_PASS_PIXELS`, so
    memory stays bounded on a slide of any size.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (x0, y0, _, _) in enumerate(kept.windows):
        groups.setdefault((int(y0) // cell, int(x0) // cell), []).append(k)

    def one(ks: list[int]) -> tuple[pd.DataFrame, tuple]:
        w = kept.windows[ks]
        rx0, ry0 = int(w[:, 0].min()), int(w[:, 1].min())
        rx1, ry1 = int(w[:, 2].max()), int(w[:, 3].max())
        local = np.zeros((ry1 - ry0 + 2, rx1 - rx0 + 2), np.int32)  # 1 px margin: perimeter
        for k in ks:
            x0, y0, x1, y1 = (int(v) for v in kept.windows[k])
            local[y0 - ry0 + 1:y1 - ry0 + 1, x0 - rx0 + 1:x1 - rx0 + 1][kept.masks[k]] = k + 1
        region = (read((ry0, ry1, rx0, rx1)) if read is not None
                  else source.array[ry0:ry1, rx0:rx1].compute(scheduler=sync_scheduler))
        region = np.asarray(region, dtype=np.float64)
        image = np.zeros(local.shape + region.shape[2:], np.float64)
        image[1:-1, 1:-1] = region
        if image.shape[-1] == 1:
            image = image[..., 0]
        hull: list = []
        table = _measure_padded(local.astype(np.int64), image, hull)
        for col, off in (("centroid-0", ry0 - 1), ("centroid-1", rx0 - 1), ("bbox-0", ry0 - 1),
                         ("bbox-1", rx0 - 1), ("bbox-2", ry0 - 1), ("bbox-3", rx0 - 1)):
            table[col] += off
        return table, hull[0]

    tables = []
    pool = None
    if threads > 1 and len(groups) > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(min(threads, len(groups)))
    try:
        for passed in _hull_passes(kept.windows, [groups[key] for key in sorted(groups)]):
            done = list(pool.map(one, passed) if pool is not None else map(one, passed))
            convex = _all_convex_areas([h for _, h in done])
            start = 0
            for table, _ in done:
                table["solidity"] /= convex[start:start + len(table)]
                start += len(table)
                tables.append(table)
    finally:
        if pool is not None:
            pool.shutdown()
    if not tables:
        return measure(np.zeros((1, 1), np.int32), np.zeros((1, 1)))
    return pd.concat(tables, ignore_index=True).sort_values("label").reset_index(drop=True)


#: Object-window pixels whose hull inputs (3 int64 per object pixel) one pass may hold: about
#: 200 MB at most, whatever the slide's size.
HULL_PASS_PIXELS = 8_000_000


def _hull_passes(windows: np.ndarray, parts: list[list[int]]):
    """``parts`` (lists of object indices) in consecutive runs whose objects' windows
    ``(x0, y0, x1, y1)`` cover at most :data:`HULL_PASS_PIXELS` (at least one part each)."""
    run, size = [], 0
    for ks in parts:
        w = windows[ks]
        area = int(((w[:, 2] - w[:, 0]) * (w[:, 3] - w[:, 1])).sum())
        if run and size + area > HULL_PASS_PIXELS:
            yield run
            run, size = [], 0
        run.append(ks)
        size += area
    if run:
        yield run


def _all_convex_areas(hulls: list) -> np.ndarray:
    """:func:`_convex_areas` of the objects of several frames (``(group, rows, cols, bbox)``
    each, as :func:`_measure_padded` appends them), in one pass: each object's hull depends on
    its own pixels only, so frames are joined by offsetting their object indices."""
    offset, groups = 0, []
    for group, _, _, bbox in hulls:
        groups.append(group + offset)
        offset += len(bbox[0])
    bbox = tuple(np.concatenate([h[3][i] for h in hulls]) for i in range(4))
    return _convex_areas(np.concatenate(groups), np.concatenate([h[1] for h in hulls]),
                         np.concatenate([h[2] for h in hulls]), offset, bbox)
