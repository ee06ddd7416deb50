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
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cellmask.appearance import Appearance
from cellmask.errors import InputError
from cellmask.sources import ImageSource, sync_scheduler
from cellmask.stitch import InstanceSet
from cellmask.tiling import Tile


def chunks_in(src: ImageSource, region):
    """``(i, j, (y0, y1, x0, x1))`` of the source chunks that intersect ``region``."""
    y0, y1, x0, x1 = region
    cy = np.cumsum((0,) + src.array.chunks[0])
    cx = np.cumsum((0,) + src.array.chunks[1])
    for i in range(np.searchsorted(cy, y0, "right") - 1, np.searchsorted(cy, y1, "left")):
        for j in range(np.searchsorted(cx, x0, "right") - 1, np.searchsorted(cx, x1, "left")):
            yield i, j, (int(cy[i]), int(cy[i + 1]), int(cx[j]), int(cx[j + 1]))


def chunk_name(src: ImageSource, i: int, j: int, box) -> str:
    key = {3: f"c/{i}/{j}", 2: f"{i}.{j}"}.get(src.zarr_format) if src.kind in (
        "zarr", "ome-zarr") else None
    where = f"pixels y {box[0]}:{box[1]}, x {box[2]}:{box[3]}"
    return f"chunk ({i}, {j}) ({'key ' + key + ', ' if key else ''}{where})"


def read_window(src: ImageSource, region: tuple[int, int, int, int],
                skip_corrupt: bool = False) -> tuple[np.ndarray, list[str]]:
    """Pixels ``(h, w, C)`` of ``region`` ``(y0, y1, x0, x1)`` and the corrupt chunks met.

    A chunk that cannot be decoded raises :class:`InputError` naming it, or, with
    ``skip_corrupt``, reads as zeros and is reported.
    """
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
            name = chunk_name(src, i, j, box)
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
    """Raw ``(h, w, C)`` pixels -> the network's input (rescaled) ``(3, h', w')``."""
    import torch
    import torch.nn.functional as F

    chw = np.moveaxis(window, -1, 0)
    if chw.dtype.kind == "f" and not np.isfinite(chw).all():  # integers cannot be NaN
        y0, y1, x0, x1 = region
        raise InputError(f"the image has NaN or infinite pixels in y {y0}:{y1}, x {x0}:{x1}: "
                         "replace them (e.g. with 0) before segmenting")
    chw = appearance.apply(chw)
    if scale != 1.0:
        size = (max(1, round(chw.shape[1] * scale)), max(1, round(chw.shape[2] * scale)))
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


def detect_tiles(model, src: ImageSource, tiles: list[Tile], appearance: Appearance,
                 scale: float,
                 windows: list[np.ndarray] | None = None,
                 timings: dict[str, float] | None = None,
                 on_network=None) -> list[InstanceSet]:
    """The instances each tile owns, as binary masks over pixel windows (level-0 frame); the
    tiles go through the network in one batch. ``timings``, if given, accumulates the seconds
    spent in "prepare" (normalising), "network" and "masks" (box-local masks to pixels);
    ``on_network(start, end)``, if given, receives the network's time interval."""
    from cellmask.model.paint import Instances, local_masks, pixel_windows

    clock = timings if timings is not None else {}
    t0 = time.perf_counter()
    if windows is None:
        windows = [read_window(src, t.window)[0] for t in tiles]
    inputs = [prepare(w, t.window, appearance, scale) for t, w in zip(tiles, windows)]
    cores = []
    for t, chw in zip(tiles, inputs):  # each tile's core in its network input's pixels
        y0, y1, x0, x1 = t.window
        fy, fx = chw.shape[1] / (y1 - y0), chw.shape[2] / (x1 - x0)
        cy0, cy1, cx0, cx1 = t.local_core
        cores.append((cy0 * fy, cy1 * fy, cx0 * fx, cx1 * fx))
    t1 = time.perf_counter()
    found = model.detect_batch(inputs, cores)
    t2 = time.perf_counter()
    out = []
    for t, chw, inst in zip(tiles, inputs, found):
        y0, y1, x0, x1 = t.window
        f = np.array([(x1 - x0) / chw.shape[2], (y1 - y0) / chw.shape[1]] * 2, np.float32)
        inst = Instances(inst.boxes * f, inst.scores, inst.masks).shifted(y0, x0).owned_by(t)
        boxes = pixel_windows(inst.boxes, src.shape)
        out.append(InstanceSet(boxes, inst.scores, local_masks(  # on the GPU when there is one
            inst, boxes, model.config.mask_thresh, device=model.device),
            mask_confidence(inst.masks, model.config.mask_thresh)))
    t3 = time.perf_counter()
    if on_network is not None:
        on_network(t1, t2)
    for key, seconds in (("prepare", t1 - t0), ("network", t2 - t1), ("masks", t3 - t2)):
        clock[key] = clock.get(key, 0.0) + seconds
    return out


def tile_workers(model, tiles: int, batch_size: int, requested: int | None = None) -> int:
    """Tile batches in the network at once for an image of ``tiles`` tiles: the requested
    number (default :meth:`Model.default_workers`), at most one per batch. It depends on the
    image's whole plan, never on how many tiles are left, because it sets the torch threads
    of each batch, and so the rounding: a resumed run computes what the first one did."""
    batches = -(-tiles // max(1, batch_size))
    return max(1, min(batches, int(requested or model.default_workers())))


def detect_all(model, src: ImageSource, tiles: list[Tile], appearance: Appearance,
               scale: float, batch_size: int = 1, workers: int | None = None
               ) -> list[InstanceSet]:
    """:func:`detect_tiles` over every tile, ``batch_size`` tiles per network pass and
    :func:`tile_workers` passes at once (:class:`~cellmask.workers.ModelThreads`); in tile
    order."""
    batches = [tiles[k:k + batch_size] for k in range(0, len(tiles), max(1, batch_size))]
    workers = tile_workers(model, len(tiles), batch_size, workers)
    if workers <= 1:
        return [inst for b in batches for inst in detect_tiles(model, src, b, appearance, scale)]
    from cellmask.workers import ModelThreads

    with ModelThreads(model, workers) as pool:
        futures = [pool.submit(lambda m, b: detect_tiles(m, src, b, appearance, scale), b)
                   for b in batches]
        return [inst for f in futures for inst in f.result()]


def segment_array(model, image: np.ndarray, *, scale: float | None = None,
                  diameter: float | None = None, pixel_size: float | None = None,
                  modality: str = "auto", tile: int = 1024, halo: int = 64,
                  batch_size: int | None = None, workers: int | None = None) -> np.ndarray:
    """Labels ``(H, W)`` int32 of an in-memory image, through the same stages and arithmetic
    as a whole-slide run (:func:`cellmask.pipeline.run`) without its files: the appearance of
    the same strided sample, the same tiles (cores of ``tile``, ``halo`` of context, level-0
    pixels), the same detection and the same resolution and painting. So a ``Model.segment``
    and a ``segment_zarr`` of one image give the same labels."""
    from cellmask.model.segmenter import resolve_scale
    from cellmask.normalize import as_channels_first
    from cellmask.sources import open_image
    from cellmask.stitch import SpatialIndex, paint_region, resolve
    from cellmask.survey import survey_image
    from cellmask.tiling import plan_tiles

    chw = as_channels_first(image)  # every check of the input, with its clear message
    src = open_image(np.moveaxis(chw, 0, -1))
    scale = resolve_scale(model, scale, diameter, pixel_size)
    appearance = survey_image(src, model.config.norm_percentiles, modality).appearance
    tile = max(32, int(tile))
    if tile < 2 * halo:
        raise InputError(f"tile {tile} is smaller than twice the halo {halo}")
    tiles = plan_tiles(src.shape, tile, halo)
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
               scale) -> list[InstanceSet]:
        t0 = time.perf_counter()
        own: dict[str, float] = {}
        if detector is not None:
            found = [detector(tl, w) for tl, w in zip(tiles, windows)]
        else:
            found = detect_tiles(model, src, tiles, appearance, scale, windows, own,
                                 lambda a, b: self.spans.append((a, b)))
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
    """Reads tile windows in a background thread, ``ahead`` batches in front of the consumer;
    started before the run's setup, so that the network's first inputs are ready."""

    def __init__(self, src: ImageSource, skip_corrupt: bool, ahead: int):
        self.src, self.skip_corrupt, self.ahead = src, skip_corrupt, ahead
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
        return [read_window(self.src, tl.window, self.skip_corrupt) for tl in tiles]

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
