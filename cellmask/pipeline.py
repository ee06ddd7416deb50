"""Whole-slide segmentation: tiles in, one NGFF labels image and a measurements table out.

``run(...)`` is a generator of :class:`Progress` events (the CLI draws them as a progress bar,
napari as its own, a script ignores them); :func:`segment_zarr` consumes it.

Stages: open the source lazily -> appearance (modality, stains, intensity range) once for the
whole image, and for brightfield slides the tissue (tiles without any are recorded as empty)
-> per tile (core aligned to the output chunks, read window = core + halo): detect, keep the
instances whose centre is in the core, save them as a record (the resume log) -> resolve all
instances (:mod:`cellmask.stitch`) -> paint chunk by chunk -> pyramid -> measurements.

A killed run restarted with the same arguments reuses every finished tile record; a second run
on the same output while one is alive is refused.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cellmask.labels_store import (check_shape, create_labels, labels_level0, read_json,
                                   save_npz_atomic, tile_pyramid, write_json_atomic,
                                   write_levels, write_pyramid)
from cellmask.memory import limit_arenas, trim
from cellmask.model.paint import Instances, local_masks, pixel_windows
from cellmask.appearance import Appearance, estimate
from cellmask.normalize import InputError
from cellmask.sources import ImageSource, open_image, sync_scheduler, threaded_scheduler
from cellmask.stitch import InstanceSet, SpatialIndex, paint_region, resolve
from cellmask.tiling import Tile, plan_tiles
from cellmask.workers import ModelThreads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """One event: ``stage`` in {"tiles", "stitch", "paint", "measure", "done"}."""

    stage: str
    done: int
    total: int
    objects: int = 0
    megapixels: float = 0.0
    seconds: float = 0.0


@dataclass
class SegmentationResult:
    """``labels``: lazily readable ``(Y, X)`` level-0 labels; ``table``: measurements;
    ``path``: the ``labels/<name>`` group that was written."""

    path: Path
    labels: Any
    table: Any
    objects: int
    #: Seconds: "setup" (opening, appearance, output), "tissue" (finding the tissue of a
    #: brightfield slide, within "setup"), "tiles" (wall time of all tiles),
    #: "model" (worker-seconds: "prepare" normalising + "network" + "masks" box-local masks to
    #: pixels), "network_wall" (wall time with at least one worker in the network),
    #: "read_wait", "records", "stitch_paint" (resolution, painting, pyramid), "measure",
    #: "total".
    timings: dict[str, float] = field(default_factory=dict)
    #: input chunks that could not be read and were segmented as zeros (``skip_corrupt``)
    corrupt: list[str] = field(default_factory=list)


class OutputLocked(RuntimeError):
    """Another live run is writing the same output."""


def _output_root(src: ImageSource, output) -> Path:
    if output is not None:
        out = Path(output)
        if src.path is not None and out.resolve() == Path(src.path).resolve() \
                and src.kind != "ome-zarr":
            raise InputError(f"output {out} is the input file: choose another output path")
        return out
    if src.kind == "ome-zarr" and src.group is not None:
        return Path(src.group)
    if src.path is not None:
        p = Path(src.path)
        return p.with_name(p.name.split(".")[0] + ".cellmask.ome.zarr")
    raise InputError("an in-memory image needs output= (a path for the OME-Zarr labels)")


def _lock(run_dir: Path) -> Path:
    lock = run_dir / "lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, me.encode())
            os.close(fd)
            return lock
        except FileExistsError:
            host, _, pid = lock.read_text().partition(" ")
            alive = host == socket.gethostname() and _pid_alive(int(pid or 0))
            if alive or host != socket.gethostname():
                raise OutputLocked(f"another cellmask run ({host} pid {pid}) is writing "
                                   f"{run_dir.parent}: wait for it, or delete {lock} if it "
                                   "is dead") from None
            lock.unlink()  # stale: its process is gone
    raise OutputLocked(f"could not lock {run_dir}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_writable(root: Path) -> None:
    """Fail early, with the fix, when the output cannot be written."""
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise InputError(f"cannot write the output {root}: {probe} is read-only; pass a "
                         "writable --out (output=)")


def estimate_appearance(src: ImageSource, percentiles, modality: str = "auto",
                        max_samples: int = 4_000_000, skip_corrupt: bool = False
                        ) -> tuple[Appearance, np.ndarray | None, int]:
    """Modality, stains and intensity range of the whole image, from a regular strided sample
    (the same sample ``Model.segment`` takes of an in-memory image, so both map alike).

    Returns the appearance, the sample as a low-resolution view ``(h, w, C)`` of the image
    (every ``step``-th pixel; None when corrupt chunks were read around) and ``step``: a
    brightfield slide's tissue is found on that view, without reading the slide again.
    """
    h, w = src.shape
    c = src.array.shape[2]
    step = max(1, int(np.ceil(np.sqrt(h * w / max_samples))))
    view = None
    try:
        # a local threaded read (cellmask.sources.sync_scheduler says why it is a function)
        view = np.asarray(src.array[::step, ::step].compute(scheduler=threaded_scheduler))
        sample = view.reshape(-1, c)
    except Exception:  # a corrupt chunk: sample chunk by chunk (named error, or skipped)
        parts = []
        for i, j, box in _chunks_in(src, (0, h, 0, w)):
            oy, ox = (-box[0]) % step, (-box[2]) % step
            try:
                block = src.array[box[0] + oy:box[1]:step,
                                  box[2] + ox:box[3]:step].compute(scheduler=sync_scheduler)
            except Exception:  # this chunk is broken
                if not skip_corrupt:
                    raise InputError(f"cannot read {src.path or 'the image'}: "
                                     f"{_chunk_name(src, i, j, box)} is corrupt; repair it, or "
                                     "pass --skip-corrupt to segment around it") from None
                continue
            parts.append(np.asarray(block).reshape(-1, c))
        sample = np.concatenate(parts) if parts else np.zeros((1, c))
    sample = sample.astype(np.float32)
    if not np.isfinite(sample).all():
        raise InputError("the image has NaN or infinite pixels: replace them (e.g. with 0) "
                         "before segmenting")
    return estimate(sample, modality, percentiles), view, step


def _fingerprint(src: ImageSource, model, tile, halo, scale, appearance: Appearance) -> dict:
    return {"shape": list(src.shape), "channels": int(src.array.shape[2]),
            "dtype": str(src.array.dtype), "model": model.weights_digest,
            "config": json.loads(model.config.to_json()), "tile": tile, "halo": halo,
            "scale": scale, "appearance": appearance.to_dict()}


def run_record(model, appearance: Appearance, scale: float, src: ImageSource,
               corrupt: list[str]) -> dict:
    """What a run decided, stored in the labels' attributes: the model, the modality and its
    stain vectors, the scale used and the input's pixel size."""
    record = {"model": model.name or "?", "model_digest": model.weights_digest,
              "modality": appearance.modality, "appearance": appearance.to_dict(),
              "scale": scale, "input_pixel_size_um": list(src.pixel_size_um or []) or None,
              "model_pixel_size_um": model.pixel_size}
    if corrupt:
        record["corrupt_input_chunks"] = corrupt
    return record


def find_tissue(view: np.ndarray | None, step: int, appearance: Appearance):
    """The :class:`~cellmask.tissue.TissueMask` of an RGB slide from the low-resolution view
    the appearance was estimated on (coarsened to :data:`~cellmask.tissue.VIEW_SIDE`); None
    without a view (every tile is then segmented)."""
    from cellmask.tissue import tissue_mask, view_step

    if view is None:
        return None
    k = view_step(view.shape[:2])
    return tissue_mask(view[::k, ::k].astype(np.float32), step * k, appearance)


def _corrupt_boxes(names: list[str]) -> list[tuple[int, int, int, int]]:
    """Level-0 ``(y0, y1, x0, x1)`` of corrupt chunks from their names (:func:`_chunk_name`)."""
    import re

    out = []
    for name in names:
        m = re.search(r"pixels y (\d+):(\d+), x (\d+):(\d+)", name)
        if m:
            out.append(tuple(int(v) for v in m.groups()))
    return out


def _chunks_in(src: ImageSource, region):
    """``(i, j, (y0, y1, x0, x1))`` of the source chunks that intersect ``region``."""
    y0, y1, x0, x1 = region
    cy = np.cumsum((0,) + src.array.chunks[0])
    cx = np.cumsum((0,) + src.array.chunks[1])
    for i in range(np.searchsorted(cy, y0, "right") - 1, np.searchsorted(cy, y1, "left")):
        for j in range(np.searchsorted(cx, x0, "right") - 1, np.searchsorted(cx, x1, "left")):
            yield i, j, (int(cy[i]), int(cy[i + 1]), int(cx[j]), int(cx[j + 1]))


def _chunk_name(src: ImageSource, i: int, j: int, box) -> str:
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
    for i, j, box in _chunks_in(src, region):
        iy0, iy1, ix0, ix1 = max(box[0], y0), min(box[1], y1), max(box[2], x0), min(box[3], x1)
        try:
            out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = \
                src.array[iy0:iy1, ix0:ix1].compute(scheduler=sync_scheduler)
        except Exception:  # this chunk is broken
            name = _chunk_name(src, i, j, box)
            if not skip_corrupt:
                raise InputError(f"cannot read {src.path or 'the image'}: {name} is corrupt "
                                 f"({first_error}); repair or re-export it, or pass "
                                 "--skip-corrupt to segment around it") from None
            corrupt.append(name)
    if not corrupt:
        raise InputError(f"cannot read y {y0}:{y1}, x {x0}:{x1} of {src.path or 'the image'} "
                         f"({first_error})")
    return out, corrupt


def _prepare(window: np.ndarray, region, appearance: Appearance, scale: float) -> np.ndarray:
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


def detect_tiles(model, src: ImageSource, tiles: list[Tile], appearance: Appearance,
                 scale: float,
                 windows: list[np.ndarray] | None = None,
                 timings: dict[str, float] | None = None,
                 on_network=None) -> list[InstanceSet]:
    """The instances each tile owns, as binary masks over pixel windows (level-0 frame); the
    tiles go through the network in one batch. ``timings``, if given, accumulates the seconds
    spent in "prepare" (normalising), "network" and "masks" (box-local masks to pixels);
    ``on_network(start, end)``, if given, receives the network's time interval."""
    clock = timings if timings is not None else {}
    t0 = time.perf_counter()
    if windows is None:
        windows = [read_window(src, t.window)[0] for t in tiles]
    inputs = [_prepare(w, t.window, appearance, scale) for t, w in zip(tiles, windows)]
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
            inst, boxes, model.config.mask_thresh, device=model.device)))
    t3 = time.perf_counter()
    if on_network is not None:
        on_network(t1, t2)
    for key, seconds in (("prepare", t1 - t0), ("network", t2 - t1), ("masks", t3 - t2)):
        clock[key] = clock.get(key, 0.0) + seconds
    return out


class _TileTimer:
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


def _record_path(run_dir: Path, tile: Tile) -> Path:
    return run_dir / "tiles" / f"{tile.index[0]}_{tile.index[1]}.npz"


def run(source, output=None, *, model=None, tile: int = 1024, halo: int = 64,
        device: str = "auto", batch_size: int | None = None, client=None, name: str = "cellmask",
        axes: str | None = None, channel: int | None = None, z: int | None = None,
        t: int | None = None, scale: float | None = None, diameter: float | None = None,
        pixel_size: float | None = None, modality: str = "auto", tissue_mask: bool = True,
        measure: bool = True,
        skip_corrupt: bool = False, detector=None,
        workers: int | None = None) -> Iterator[Progress | SegmentationResult]:
    """Segment ``source`` into ``output``; yields progress events, then the result.

    ``modality``: "auto" (decided once from a strided sample of the image and logged),
    "fluorescence" or "brightfield" (stains separated once for the whole image). The objects
    meet the network at the model's training scale: ``scale`` as given, or from ``diameter``
    (typical object diameter, px), or from the pixel size (``pixel_size`` um, else the
    input's metadata) when the model knows its own; labels are written at level-0 resolution
    with the input's pixel size and unit. ``tissue_mask`` (brightfield RGB only): tiles whose
    read window holds no tissue on a low-resolution view are recorded as empty, not segmented.

    ``workers``: tile batches in the network at once (default :meth:`Model.default_workers`:
    2 on a CPU with 2 or more cores, 1 on a GPU); the torch threads are shared among them.

    ``detector(tile, window)``, if given, replaces the model's :func:`detect_tiles`: it receives
    a :class:`~cellmask.tiling.Tile` and its raw window ``(h, w, C)`` and returns the
    :class:`~cellmask.stitch.InstanceSet` the tile owns (used to test tiling and stitching with
    exact, model-free instances).
    """
    from cellmask.appearance import MODALITIES
    from cellmask.model.segmenter import load_model, resolve_scale

    if tile <= 0 or halo < 0:
        raise InputError(f"tile must be positive and halo zero or more (got {tile}, {halo})")
    if tile < 2 * halo:
        raise InputError(f"tile {tile} is smaller than twice the halo {halo}: use --tile "
                         f"{max(256, 4 * halo)} or a smaller --halo")
    t_start = time.perf_counter()
    if modality not in MODALITIES:
        raise InputError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    src = open_image(source, axes=axes, channel=channel, z=z, t=t)
    if pixel_size is not None:
        if not (np.isfinite(pixel_size) and pixel_size > 0):
            raise InputError(f"pixel size must be a positive number of um, got {pixel_size}")
        src = src.with_pixel_size(pixel_size)
    if model is None or isinstance(model, (str, Path)):
        model = load_model(model or "nuclei", device=device)
    px_um = src.pixel_size_um
    scale = resolve_scale(model, scale, diameter, px_um[1] if px_um else None)
    log.info("scale %.4g (input pixel %s, model trained at %s)", scale,
             f"{px_um[1]:g} um" if px_um else "size unknown",
             f"{model.pixel_size:g} um" if model.pixel_size else "no stated pixel size")
    root = _output_root(src, output)
    fmt = src.zarr_format if src.kind == "ome-zarr" and output is None else 3
    _check_writable(root)
    group_dir = root / "labels" / name
    run_dir = group_dir / ".run"
    tiles = plan_tiles(src.shape, tile, halo)
    todo = [tl for tl in tiles if not _record_path(run_dir, tl).is_file()]
    appearance = tissue = None
    t_tissue = 0.0
    if tissue_mask and src.array.shape[2] == 3 and todo:  # a slide: find its tissue first
        appearance, view, step = estimate_appearance(src, model.config.norm_percentiles,
                                                     modality, skip_corrupt=skip_corrupt)
        if appearance.modality == "brightfield":
            tt = time.perf_counter()
            tissue = find_tissue(view, step, appearance)
            t_tissue = time.perf_counter() - tt
    skipped = [tl for tl in todo if tissue is not None and not tissue.covers(tl.window)]
    if skipped:
        todo = [tl for tl in todo if tissue.covers(tl.window)]
        log.info("tissue: %.0f%% of the slide (optical density > %.3f); %d of %d tiles hold "
                 "none and are recorded as empty", 100 * tissue.fraction, tissue.threshold,
                 len(skipped), len(tiles))
    batch = max(1, batch_size or model.default_batch_size())
    groups = [todo[k:k + batch] for k in range(0, len(todo), batch)]
    n_workers = max(1, int(workers or model.default_workers()))
    limit_arenas(2 + n_workers)  # before threads start: see cellmask.memory
    def create_output():
        try:
            return create_labels(root, name, src.shape, tile, zarr_format=fmt,
                                 pixel_size=src.pixel_size, unit=src.pixel_unit,
                                 source="../../" if (src.kind == "ome-zarr" and output is None)
                                 else (str(src.path) if src.path else None))
        except (PermissionError, FileNotFoundError, NotADirectoryError) as err:
            raise _unwritable(root, err) from None

    local = client is None and bool(groups)
    with _Reader(src, skip_corrupt, ahead=n_workers + 2 if local else 0) as reader, \
            (ModelThreads(model, n_workers) if local else nullcontext()) as pool:
        # the first windows are read, and the tile workers' network copies made, while the
        # intensity range is taken
        reader.start(groups)
        if pool is not None:
            pool.start()
        if appearance is None:
            appearance = estimate_appearance(src, model.config.norm_percentiles, modality,
                                             skip_corrupt=skip_corrupt)[0]
        check_shape(root, name, src.shape)
        try:
            (run_dir / "tiles").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _unwritable(root, err) from None
        lock = _lock(run_dir)
        group = None  # the label arrays are created while the first tiles are in the network
        try:
            fp = _fingerprint(src, model, tile, halo, scale, appearance)
            fp["tissue_mask"] = bool(tissue_mask)
            previous = read_json(run_dir / "run.json")
            if previous is not None and previous.get("fingerprint") != fp:
                raise FileExistsError(f"{group_dir} holds labels of a different run (other model, "
                                      "image or settings): delete it or pass another name/output")
            write_json_atomic(run_dir / "run.json", {"fingerprint": fp, "state": "tiles"})
            empty = InstanceSet.empty().to_arrays()
            for tl in skipped:  # no tissue: an ordinary, empty tile record
                save_npz_atomic(_record_path(run_dir, tl), empty)
            done = len(tiles) - len(todo)
            objects = 0
            t0 = time.perf_counter()
            px = 0
            wait_read = t_model = t_record = 0.0
            split: dict[str, float] = {"prepare": 0.0, "network": 0.0, "masks": 0.0}
            corrupt: list[str] = list((read_json(run_dir / "corrupt.json") or []))
            if client is not None:
                from cellmask.distributed import run_tiles

                group = create_output()
                for n_found, tl in run_tiles(client, model, src, todo, appearance, scale,
                                                 run_dir):
                    done += 1
                    objects += n_found
                    px += (tl.core[1] - tl.core[0]) * (tl.core[3] - tl.core[2])
                    yield Progress("tiles", done, len(tiles), objects, px / 1e6,
                                   time.perf_counter() - t0)
            else:
                timer = _TileTimer(split)
                # reading runs ahead of the network; up to ``n_workers`` batches are in the
                # network at once (tiles are independent; records are per tile)
                running: deque = deque()
                finished = 0
                for k, batch_tiles in enumerate(groups):
                    tw = time.perf_counter()
                    read_out = reader.take()
                    wait_read += time.perf_counter() - tw
                    for _, bad in read_out:
                        for name_ in bad:
                            if name_ not in corrupt:
                                corrupt.append(name_)
                                log.warning("skipping corrupt %s: its pixels read as 0", name_)
                                write_json_atomic(run_dir / "corrupt.json", corrupt)
                    running.append((batch_tiles, pool.submit(
                        timer.detect, detector, src, batch_tiles, [w for w, _ in read_out],
                        appearance, scale)))
                    del read_out
                    if group is None and (k + 1 == n_workers or k == len(groups) - 1):
                        group = create_output()  # this thread is idle until a tile is done
                    # one batch more than workers in flight: a worker that finishes finds
                    # its next batch queued while this thread saves the finished one
                    while running and (len(running) > n_workers or k == len(groups) - 1):
                        tiles_done, future = running.popleft()
                        found = future.result()
                        finished += 1
                        if finished % 4 == 0 and finished < len(groups):
                            trim()  # returning freed heap costs ~40 ms a call
                        for tl, inst in zip(tiles_done, found):
                            t_w = time.perf_counter()
                            save_npz_atomic(_record_path(run_dir, tl), inst.to_arrays())
                            t_record += time.perf_counter() - t_w
                            done += 1
                            objects += len(inst)
                            px += (tl.core[1] - tl.core[0]) * (tl.core[3] - tl.core[2])
                            yield Progress("tiles", done, len(tiles), objects, px / 1e6,
                                           time.perf_counter() - t0)
                t_model = timer.seconds
                split["network_wall"] = timer.network_wall()
            if group is None:  # nothing was left to detect
                group = create_output()
            t_tiles = time.perf_counter() - t0
            t1 = time.perf_counter()
            parts = [InstanceSet.from_arrays(np.load(_record_path(run_dir, tl))) for tl in tiles]
            c = model.config
            kept = resolve(InstanceSet.concatenate(parts),
                           min_visible_fraction=c.min_visible_fraction, min_area=c.min_area)
            _check_halo(kept, halo, scale)
            index = SpatialIndex(kept, tile)
            level0 = group["0"]
            whole_chunks = tile_pyramid(group, tile)  # outputs of older versions: not

            holes = _corrupt_boxes(corrupt)

            def paint(tl: Tile) -> None:  # a tile's core is whole output chunks: no two share one
                labels = paint_region(kept, index, tl.core)
                for hy0, hy1, hx0, hx1 in holes:  # unreadable input stays empty in the labels
                    y0, y1, x0, x1 = tl.core
                    labels[max(hy0, y0) - y0:max(0, min(hy1, y1) - y0),
                           max(hx0, x0) - x0:max(0, min(hx1, x1) - x0)] = 0
                if whole_chunks:
                    write_levels(group, tl.core, labels)
                else:
                    y0, y1, x0, x1 = tl.core
                    level0[y0:y1, x0:x1] = labels

            # the cores are otherwise idle here; encoding chunks releases the GIL
            with ThreadPoolExecutor(_output_threads()) as painters:
                for k, _ in enumerate(painters.map(paint, tiles)):
                    yield Progress("paint", k + 1, len(tiles), len(kept))
                if not whole_chunks:
                    write_pyramid(group, painters)
            t_paint = time.perf_counter() - t1
            t2 = time.perf_counter()
            table = None
            if measure:
                from cellmask.measure import measure_instances

                table = measure_instances(kept, src, tile,
                                          read=lambda r: read_window(src, r, skip_corrupt)[0])
                table.to_parquet(group_dir / "measurements.parquet", index=False)
                table.to_csv(group_dir / "measurements.csv", index=False)
            t_measure = time.perf_counter() - t2
            write_json_atomic(run_dir / "corrupt.json", corrupt)
            # how the labels were made, where every reader of them sees it
            record = run_record(model, appearance, scale, src, corrupt)
            if tissue is not None:
                record["tissue"] = {"fraction": round(tissue.fraction, 4),
                                    "od_threshold": tissue.threshold,
                                    "tiles_without_tissue": len(skipped)}
            group.attrs["cellmask"] = record
            write_json_atomic(run_dir / "run.json", {"fingerprint": fp, "state": "done",
                                                     "objects": len(kept)})
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                finished = len(list((run_dir / "tiles").glob("*_*.npz")))
                raise OSError(err.errno, f"the disk holding {root} is full ({err.strerror}); "
                              f"{finished} tile results are saved: free some space and run the "
                              "same command again to continue") from None
            raise
        finally:
            lock.unlink(missing_ok=True)
        import dask.array as da

        timings = {"setup": t0 - t_start, "tissue": t_tissue, "tiles": t_tiles,
                   "model": t_model, **split,
                   "read_wait": wait_read, "records": t_record, "stitch_paint": t_paint,
                   "measure": t_measure, "total": time.perf_counter() - t_start}
        yield Progress("done", len(tiles), len(tiles), len(kept), seconds=timings["total"])
        yield SegmentationResult(group_dir, da.from_zarr(labels_level0(group_dir)), table,
                                 len(kept), timings, corrupt)


class _Reader:
    """Reads tile windows in a background thread, ``ahead`` batches in front of the consumer;
    started before the run's setup, so that the network's first inputs are ready."""

    def __init__(self, src: ImageSource, skip_corrupt: bool, ahead: int):
        self.src, self.skip_corrupt, self.ahead = src, skip_corrupt, ahead
        self.pool = ThreadPoolExecutor(1) if ahead else None
        self.queue: deque = deque()
        self.groups: list[list[Tile]] = []
        self.next = 0

    def __enter__(self) -> "_Reader":
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


def _unwritable(root: Path, err: OSError) -> InputError:
    return InputError(f"cannot write the output {root} ({type(err).__name__}: {err}); pass a "
                      "writable --out (output=)")


def _output_threads() -> int:
    """Threads painting and writing output chunks: the cores this process may use, up to 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _check_halo(kept: InstanceSet, halo: int, scale: float) -> None:
    if not len(kept):
        return
    w = kept.windows
    largest = int(max((w[:, 2] - w[:, 0]).max(), (w[:, 3] - w[:, 1]).max()))
    if largest > halo:
        log.warning("objects up to %d px were found but the halo is %d px: objects larger than "
                    "the halo can be cut at tile seams; pass --halo %d or more", largest, halo,
                    int(np.ceil(largest / 32) * 32))


def segment_zarr(source, output=None, *, model=None, tile: int = 1024, halo: int = 64,
                 device: str = "auto", batch_size: int | None = None, client=None,
                 progress: bool = True, **kwargs) -> SegmentationResult:
    """Segment a whole image (OME-Zarr, Zarr, TIFF/SVS, numpy, dask) tile by tile.

    Labels go to ``labels/cellmask`` inside an input OME-Zarr (the NGFF convention) or to a new
    OME-Zarr at ``output``. Returns a :class:`SegmentationResult`.
    """
    bar = None
    result = None
    for event in run(source, output, model=model, tile=tile, halo=halo, device=device,
                     batch_size=batch_size, client=client, **kwargs):
        if isinstance(event, SegmentationResult):
            result = event
        elif progress and event.stage == "tiles":
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=event.total, unit="tile", dynamic_ncols=True)
            bar.n = event.done
            rate = event.megapixels / event.seconds if event.seconds else 0.0
            bar.set_postfix(objects=event.objects, mpx_s=f"{rate:.2f}")
    if bar is not None:
        bar.close()
    return result


def open_labels(path: str | Path, name: str = "cellmask"):
    """The level-0 labels (a lazily read dask array) of a cellmask output."""
    import dask.array as da

    return da.from_zarr(labels_level0(path, name))
