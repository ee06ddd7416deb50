"""The tile engine: read a tile's window, prepare it for the network, detect the instances the
tile owns. One path for every runner (a local run, the dask.distributed tasks, threshold
tuning): a window ``(h, w, C)`` of the level-0 image (core + halo) goes through
:func:`prepare` (the image's one appearance mapping, then the run's scale) and the model's
batched network, and comes back as the :class:`~cellmask.stitch.InstanceSet` whose centres lie
in the tile's core, in level-0 pixels.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from cellmask.appearance import Appearance
from cellmask.errors import InputError
from cellmask.sources import ImageSource, sync_scheduler
from cellmask.stitch import InstanceSet
from cellmask.tiling import Tile

if TYPE_CHECKING:
    from cellmask.model.paint import Instances


def chunks_in(src: ImageSource, region):
    """``(i, j, (y0, y1, x0, x1))`` of the source chunks that intersect ``region``."""
    y0, y1, x0, x1 = region
    cy = np.cumsum((0,) + src.array.chunks[0])
    cx = np.cumsum((0,) + src.array.chunks[1])
    for i in range(np.searchsorted(cy, y0, "right") - 1, np.searchsorted(cy, y1, "left")):
        for j in range(np.searchsorted(cx, x0, "right") - 1, np.searchsorted(cx, x1, "left")):
            yield i, j, (int(cy[i]), int(cy[i + 1]), int(cx[j]), int(cx[j + 1]))


def chunk_name(src: ImageSource, i: int, j: int, box, level: int = 0) -> str:
    """A chunk's name for messages and records; the pixels it covers are given in level 0
    (``box`` is in the pixels of ``level``), so that the labels over it can be left empty."""
    key = {3: f"c/{i}/{j}", 2: f"{i}.{j}"}.get(src.zarr_format) if src.kind in (
        "zarr", "ome-zarr") else None
    if level:
        (fy, fx), (h, w) = level_factor(src, level), src.shape
        box = (int(np.floor(box[0] * fy)), min(h, int(np.ceil(box[1] * fy))),
               int(np.floor(box[2] * fx)), min(w, int(np.ceil(box[3] * fx))))
        key = f"level {level} " + (key or f"({i}, {j})")
    where = f"pixels y {box[0]}:{box[1]}, x {box[2]}:{box[3]}"
    return f"chunk ({i}, {j}) ({'key ' + key + ', ' if key else ''}{where})"


#: A pyramid level is read instead of level 0 when its pixels are at most this much coarser
#: than the run's scale asks for; the rest of the rescaling is done on the level's pixels.
LEVEL_TOLERANCE = 0.05


def level_factor(src: ImageSource, level: int) -> tuple[float, float]:
    """Level-0 pixels per pixel of pyramid ``level``, ``(y, x)``."""
    if level == 0:
        return 1.0, 1.0
    lh, lw = src.levels[level].shape[:2]
    return src.shape[0] / lh, src.shape[1] / lw


def pyramid_level(src: ImageSource, scale: float) -> int:
    """The pyramid level a run at ``scale`` reads: the coarsest whose pixels are no more than
    :data:`LEVEL_TOLERANCE` coarser than ``scale`` asks for (0 without a pyramid, or when
    ``scale`` is near or above 1). Reading it costs a fraction of level 0's pixels and
    replaces most of the resampling by the slide's own downsampled pixels."""
    best = 0
    for k in range(1, len(src.levels)):
        level = src.levels[k]
        if level.shape[2:] != src.array.shape[2:] or min(level.shape[:2]) < 1:
            continue
        if max(level_factor(src, k)) * scale <= 1 + LEVEL_TOLERANCE:
            best = k
    return best


def level_region(src: ImageSource, region, level: int) -> tuple[int, int, int, int]:
    """The pixels ``(y0, y1, x0, x1)`` of pyramid ``level`` that cover the level-0 ``region``."""
    if level == 0:
        return tuple(region)
    (fy, fx), (lh, lw) = level_factor(src, level), src.levels[level].shape[:2]
    y0, y1, x0, x1 = region
    ly0, lx0 = int(np.floor(y0 / fy)), int(np.floor(x0 / fx))
    return (ly0, min(lh, max(ly0 + 1, int(np.ceil(y1 / fy)))),
            lx0, min(lw, max(lx0 + 1, int(np.ceil(x1 / fx)))))


def read_window(src: ImageSource, region: tuple[int, int, int, int],
                skip_corrupt: bool = False, level: int = 0) -> tuple[np.ndarray, list[str]]:
    """Pixels ``(h, w, C)`` of the level-0 ``region`` ``(y0, y1, x0, x1)`` and the corrupt
    chunks met; with ``level``, the pixels of that pyramid level covering it
    (:func:`level_region`).

    A chunk that cannot be decoded raises :class:`InputError` naming it, or, with
    ``skip_corrupt``, reads as zeros and is reported.
    """
    level0 = src  # chunk names give level-0 pixels
    if level:
        src, region = replace(src, array=src.levels[level]), level_region(src, region, level)
    y0, y1, x0, x1 = region
    try:
        # synchronous: a window is a few chunks, read in the calling (reader) thread
        return np.asarray(src.array[y0:y1, x0:x1].compute(scheduler=sync_scheduler)), []
    except Exception as err:  # codecs raise many types: find the broken chunks
        first_error = f"{type(err).__name__}: {err}"
    out = np.zeros((y1 - y0, x1 - x0, src.array.shape[2]), src.array.dtype)
    corrupt = []
    for i, j, box in chunks_in(src, region):
        iy0, iy1, ix0, ix1 = max(box[0], y0), min(box[1], y1), max(box[2], x0), min(box[3], x1)
        try:
            out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = \
                src.array[iy0:iy1, ix0:ix1].compute(scheduler=sync_scheduler)
        except Exception:  # this chunk is broken
            name = chunk_name(level0, i, j, box, level)
            if not skip_corrupt:
                raise InputError(f"cannot read {src.path or 'the image'}: {name} is corrupt "
                                 f"({first_error}); repair or re-export it, or pass "
                                 "--skip-corrupt to segment around it") from None
            corrupt.append(name)
    if not corrupt:
        raise InputError(f"cannot read y {y0}:{y1}, x {x0}:{x1} of {src.path or 'the image'} "
                         f"({first_error})")
    return out, corrupt


def prepare(window: np.ndarray, region, appearance: Appearance, scale: float) -> np.ndarray:
    """Raw ``(h, w, C)`` pixels -> the network's input ``(3, h', w')``, resized by ``scale``
    (``region``: where the pixels lie, for messages)."""
    import torch
    import torch.nn.functional as F

    chw = np.moveaxis(window, -1, 0)
    if chw.dtype.kind == "f" and not np.isfinite(chw).all():  # integers cannot be NaN
        y0, y1, x0, x1 = region
        raise InputError(f"the image has NaN or infinite pixels in y {y0}:{y1}, x {x0}:{x1}: "
                         "replace them (e.g. with 0) before segmenting")
    chw = appearance.apply(chw)
    size = (max(1, round(chw.shape[1] * scale)), max(1, round(chw.shape[2] * scale)))
    if scale != 1.0 and size != chw.shape[1:]:
        chw = F.interpolate(torch.from_numpy(chw)[None], size=size, mode="bilinear",
                            antialias=scale < 1, align_corners=False)[0].numpy()
    return chw


def mask_confidence(probs: np.ndarray, thresh: float) -> np.ndarray:
    """Mean probability over the pixels of each box-local mask ``(N, M, M)`` at ``thresh``:
    near 1 where the network is sure of the outline, near ``thresh`` where it is not."""
    if len(probs) == 0:
        return np.zeros(0, np.float32)
    inside = probs >= thresh
    total = (probs * inside).sum(axis=(1, 2))
    count = inside.sum(axis=(1, 2))
    return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def tile_instances(model, src: ImageSource, tiles: list[Tile], appearance: Appearance,
                   scale: float, windows: list[np.ndarray] | None = None,
                   timings: dict[str, float] | None = None,
                   on_network=None, level: int = 0) -> list["Instances"]:
    """The instances each tile owns as the network gives them: boxes in level-0 pixels,
    scores, box-local mask probabilities ``(N, M, M)``; the tiles go through the network in
    one batch. ``windows`` (read if not given) are the pixels of pyramid ``level`` covering
    each tile's window (:func:`read_window`), resized to ``scale`` of level 0. ``timings``,
    if given, accumulates the seconds spent in "prepare" (normalising) and "network";
    ``on_network(start, end)``, if given, receives the network's time interval."""
    from cellmask.model.paint import Instances

    clock = timings if timings is not None else {}
    t0 = time.perf_counter()
    if windows is None:
        windows = [read_window(src, t.window, level=level)[0] for t in tiles]
    fy, fx = level_factor(src, level)  # (1, 1) at level 0
    # the resizing left after reading the level
    inputs = [prepare(w, t.window, appearance, scale * fy) for t, w in zip(tiles, windows)]
    frames = []  # (level-0 origin y, x; level-0 pixels per input pixel y, x) of each input
    cores = []  # each tile's core in its input's pixels
    for t, chw in zip(tiles, inputs):
        ly0, ly1, lx0, lx1 = level_region(src, t.window, level)
        oy, ox, hy, hx = ly0 * fy, lx0 * fx, (ly1 - ly0) * fy, (lx1 - lx0) * fx
        frames.append((oy, ox, hy / chw.shape[1], hx / chw.shape[2]))
        ny, nx = chw.shape[1] / hy, chw.shape[2] / hx
        y0, y1, x0, x1 = t.core
        cores.append(((y0 - oy) * ny, (y1 - oy) * ny, (x0 - ox) * nx, (x1 - ox) * nx))
    t1 = time.perf_counter()
    found = model.detect_batch(inputs, cores)
    t2 = time.perf_counter()
    out = []
    for t, (oy, ox, gy, gx), inst in zip(tiles, frames, found):
        f = np.array([gx, gy, gx, gy], np.float32)
        out.append(Instances(inst.boxes * f, inst.scores, inst.masks).shifted(oy, ox)
                   .owned_by(t))
    if on_network is not None:
        on_network(t1, t2)
    for key, seconds in (("prepare", t1 - t0), ("network", t2 - t1)):
        clock[key] = clock.get(key, 0.0) + seconds
    return out


def detect_tiles(model, src: ImageSource, tiles: list[Tile], appearance: Appearance,
                 scale: float,
                 windows: list[np.ndarray] | None = None,
                 timings: dict[str, float] | None = None,
                 on_network=None, level: int = 0) -> list[InstanceSet]:
    """The instances each tile owns (:func:`tile_instances`) as binary masks over pixel
    windows (level-0 frame). ``timings`` also accumulates "masks" (box-local masks to
    pixels)."""
    from cellmask.model.paint import local_masks, pixel_windows

    clock = timings if timings is not None else {}
    found = tile_instances(model, src, tiles, appearance, scale, windows, clock, on_network,
                           level)
    t2 = time.perf_counter()
    out = []
    for inst in found:
        boxes = pixel_windows(inst.boxes, src.shape)
        out.append(InstanceSet(boxes, inst.scores, local_masks(  # on the GPU when there is one
            inst, boxes, model.config.mask_thresh, device=model.device),
            mask_confidence(inst.masks, model.config.mask_thresh)))
    clock["masks"] = clock.get("masks", 0.0) + time.perf_counter() - t2
    return out


def tile_workers(model, tiles: int, batch_size: int, requested: int | None = None) -> int:
    """Tile batches in the network at once for an image of ``tiles`` tiles: the requested
    number (default :meth:`Model.default_workers`), at most one per batch. It depends on the
    image's whole plan, never on how many tiles are left, because it sets the torch threads
    of each batch, and so the rounding: a resumed run computes what the first one did."""
    batches = -(-tiles // max(1, batch_size))
    return max(1, min(batches, int(requested or model.default_workers())))


def detect_all(model, src: ImageSource, tiles: list[Tile], appearance: Appearance,
               scale: float, batch_size: int = 1, workers: int | None = None,
               step=detect_tiles) -> list:
    """``step`` (:func:`detect_tiles`, or :func:`tile_instances` for the network's own
    output) over every tile, ``batch_size`` tiles per network pass and :func:`tile_workers`
    passes at once (:class:`~cellmask.workers.ModelThreads`); in tile order."""
    batches = [tiles[k:k + batch_size] for k in range(0, len(tiles), max(1, batch_size))]
    workers = tile_workers(model, len(tiles), batch_size, workers)
    if workers <= 1:
        return [inst for b in batches for inst in step(model, src, b, appearance, scale)]
    from cellmask.workers import ModelThreads

    with ModelThreads(model, workers) as pool:
        futures = [pool.submit(lambda m, b: step(m, src, b, appearance, scale), b)
                   for b in batches]
        return [inst for f in futures for inst in f.result()]


def open_array(model, image: np.ndarray, *, scale: float | None = None,
               diameter: float | None = None, pixel_size: float | None = None,
               modality: str = "auto", tile: int = 1024, halo: int | None = None
               ) -> tuple[ImageSource, Appearance, float, list[Tile]]:
    """An in-memory image ``(H, W)`` / ``(H, W, C)`` opened as a run opens a store: its
    source, its appearance (the same strided sample), the run's scale and its tiles (``halo``
    None: :func:`~cellmask.model.context.auto_halo`)."""
    from cellmask.model.segmenter import resolve_scale
    from cellmask.normalize import as_channels_first
    from cellmask.sources import open_image
    from cellmask.survey import survey_image
    from cellmask.tiling import plan_tiles

    chw = as_channels_first(image)  # every check of the input, with its clear message
    src = open_image(np.moveaxis(chw, 0, -1))
    scale = resolve_scale(model, scale, diameter, pixel_size)
    appearance = survey_image(src, model.config.norm_percentiles, modality,
                              second_stain=model.config.second_stain_weight,
                              level=model.config.brightfield_level).appearance
    tile = max(32, int(tile))
    if halo is None:
        from cellmask.model.context import auto_halo

        halo = auto_halo(model, scale, tile)
    if tile < 2 * halo:
        raise InputError(f"tile {tile} is smaller than twice the halo {halo}")
    return src, appearance, scale, plan_tiles(src.shape, tile, halo)


def image_instances(model, image: np.ndarray, *, modality: str = "auto", tile: int = 1024,
                    halo: int | None = None, batch_size: int | None = None,
                    workers: int | None = None) -> "Instances":
    """Every instance the network gives for an in-memory image (boxes in its pixels,
    box-local probabilities), before painting: what a run of the same image detects, for
    choosing thresholds on it."""
    from cellmask.model.paint import Instances

    src, appearance, scale, tiles = open_array(model, image, modality=modality, tile=tile,
                                               halo=halo)
    parts = detect_all(model, src, tiles, appearance, scale,
                       batch_size or model.default_batch_size(), workers, step=tile_instances)
    return Instances.concatenate(parts, 2 * model.config.mask_roi_size)


def segment_array(model, image: np.ndarray, *, scale: float | None = None,
                  diameter: float | None = None, pixel_size: float | None = None,
                  modality: str = "auto", tile: int = 1024, halo: int | None = None,
                  batch_size: int | None = None, workers: int | None = None) -> np.ndarray:
    """Labels ``(H, W)`` int32 of an in-memory image, through the same stages and arithmetic
    as a whole-slide run (:func:`cellmask.pipeline.run`) without its files: the appearance of
    the same strided sample, the same tiles (cores of ``tile``, ``halo`` of context, level-0
    pixels), the same detection and the same resolution and painting. So a ``Model.segment``
    and a ``segment_zarr`` of one image give the same labels."""
    from cellmask.stitch import SpatialIndex, paint_region, resolve

    src, appearance, scale, tiles = open_array(model, image, scale=scale, diameter=diameter,
                                               pixel_size=pixel_size, modality=modality,
                                               tile=tile, halo=halo)
    found = detect_all(model, src, tiles, appearance, scale,
                       batch_size or model.default_batch_size(), workers)
    c = model.config
    kept = resolve(InstanceSet.concatenate(found), min_visible_fraction=c.min_visible_fraction,
                   min_area=c.min_area)
    h, w = src.shape
    return paint_region(kept, SpatialIndex(kept, tile), (0, h, 0, w))


class TileTimer:
    """What the tile workers spent: worker-seconds per step, and the network's intervals."""

    def __init__(self, split: dict[str, float]):
        self.split, self.seconds = split, 0.0
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def detect(self, model, detector, src, tiles, windows, appearance,
               scale, level: int = 0) -> list[InstanceSet]:
        t0 = time.perf_counter()
        own: dict[str, float] = {}
        if detector is not None:
            found = [detector(tl, w) for tl, w in zip(tiles, windows)]
        else:
            found = detect_tiles(model, src, tiles, appearance, scale, windows, own,
                                 lambda a, b: self.spans.append((a, b)), level)
        with self._lock:
            self.seconds += time.perf_counter() - t0
            for key, value in own.items():
                self.split[key] = self.split.get(key, 0.0) + value
        return found

    def network_wall(self) -> float:
        """Seconds during which at least one worker was in the network."""
        total, end = 0.0, -np.inf
        for a, b in sorted(self.spans):
            if b > end:
                total += b - max(a, end)
                end = b
        return total


class WindowReader:
    """Reads tile windows (at pyramid ``level``) in a background thread, ``ahead`` batches in
    front of the consumer; started before the run's setup, so that the network's first inputs
    are ready."""

    def __init__(self, src: ImageSource, skip_corrupt: bool, ahead: int, level: int = 0):
        self.src, self.skip_corrupt, self.ahead, self.level = src, skip_corrupt, ahead, level
        self.pool = ThreadPoolExecutor(1) if ahead else None
        self.queue: deque = deque()
        self.groups: list[list[Tile]] = []
        self.next = 0

    def __enter__(self) -> "WindowReader":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, tiles: list[Tile]):
        return [read_window(self.src, tl.window, self.skip_corrupt, self.level) for tl in tiles]

    def start(self, groups: list[list[Tile]]) -> None:
        self.groups = groups
        while self.pool is not None and self.next < min(len(groups), self.ahead):
            self.queue.append(self.pool.submit(self._read, groups[self.next]))
            self.next += 1

    def take(self):
        """``[(window, corrupt chunks), ...]`` of the next batch, in order."""
        out = self.queue.popleft().result()
        if self.next < len(self.groups):
            self.queue.append(self.pool.submit(self._read, self.groups[self.next]))
            self.next += 1
        return out
