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

import dataclasses
import errno
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cellmask.appearance import Appearance
from cellmask.config import RunConfig
from cellmask.engine import (TileTimer, WindowReader, pyramid_level, read_window,
                             tile_workers)
from cellmask.errors import InputError, OutputConflict, OutputLocked  # noqa: F401
from cellmask.labels_store import (DATASETS, check_shape, create_image, create_labels,
                                   fsync_tree, labels_level0, read_json, save_npz_atomic,
                                   tile_pyramid, write_atomic, write_image_levels,
                                   write_json_atomic, write_levels, write_pyramid,
                                   write_table_atomic)
from cellmask.memory import limit_arenas, trim
from cellmask.run_state import (RunFolder, check_not_foreign, differences, labels_digest,
                                source_identity, tile_key)
from cellmask.sources import ImageSource, open_image
from cellmask.stitch import InstanceSet, SpatialIndex, paint_region, resolve
from cellmask.survey import Survey, corrupt_boxes, find_tissue, survey_image
from cellmask.tiling import Tile, plan_tiles

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
    #: per nucleus, every compartment and channel (:mod:`cellmask.compartments`), when cells
    #: were grown or the input has more channels than the segmented one; else None
    compartments: Any = None


#: Suffixes of image files: an output named so would be a folder that looks like an image.
_IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".png", ".jpg", ".jpeg", ".npy",
                   ".ome.tif", ".ome.tiff", ".czi", ".nd2", ".lif")
#: Suffixes stripped from an input's name to make the default output name.
_INPUT_SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr") + _IMAGE_SUFFIXES


def output_root(src: ImageSource, output) -> Path:
    """The store the labels go to: ``output``, else the input OME-Zarr itself, else the input's
    whole name without its image suffix + ``.cellmask.ome.zarr`` (``plate.A1.tif`` ->
    ``plate.A1.cellmask.ome.zarr``, so that names never collide)."""
    if output is not None:
        out = Path(output)
        if src.path is not None and out.resolve() == Path(src.path).resolve() \
                and src.kind != "ome-zarr":
            raise InputError(f"output {out} is the input file: choose another output path")
        if out.name.lower().endswith((".tif", ".tiff")):  # labels as TIFF: the run's store
            return out.with_name(strip_image_suffix(out.name) + ".ome.zarr")  # is beside it
        if out.name.lower().endswith(_IMAGE_SUFFIXES):
            raise InputError(f"output {out} names an image file, but cellmask writes an "
                             "OME-Zarr folder (or labels as .tif): pass --out NAME.ome.zarr")
        return out
    if src.kind == "ome-zarr" and src.group is not None:
        return Path(src.group)
    if src.path is not None:
        p = Path(src.path)
        return p.with_name(strip_image_suffix(p.name) + ".cellmask.ome.zarr")
    raise InputError("an in-memory image needs output= (a path for the OME-Zarr labels)")


def strip_image_suffix(name: str) -> str:
    """``name`` without its image suffix (``plate.A1.tif`` -> ``plate.A1``)."""
    for suffix in _INPUT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def write_labels_tiff(level0, path: Path, pixel_size_um: float | None = None,
                      tile: int = 512) -> Path:
    """Level-0 labels ``(Y, X)`` (a zarr array) as a tiled, compressed BigTIFF, written tile
    by tile (memory of one row of tiles) under a temporary name, then renamed."""
    import tifffile

    h, w = level0.shape

    def tiles():
        for y in range(0, h, tile):
            row = np.asarray(level0[y:y + tile, :])
            for x in range(0, w, tile):
                block = np.zeros((tile, tile), np.int32)
                part = row[:, x:x + tile]
                block[:part.shape[0], :part.shape[1]] = part
                yield block

    extra = {}
    if pixel_size_um:
        extra = {"resolution": (1e4 / pixel_size_um, 1e4 / pixel_size_um),
                 "resolutionunit": "CENTIMETER"}
    write_atomic(path, lambda fh: tifffile.imwrite(
        fh, tiles(), shape=(h, w), dtype=np.int32, tile=(tile, tile), bigtiff=True,
        compression="zlib", **extra))
    return path


def open_source(source, *, axes: str | None = None, channel: int | None = None,
                z: int | None = None, t: int | None = None,
                pixel_size: float | None = None) -> ImageSource:
    """The stage "open": the input, lazily, with the pixel size override applied."""
    src = open_image(source, axes=axes, channel=channel, z=z, t=t)
    if pixel_size is not None:
        if not (np.isfinite(pixel_size) and pixel_size > 0):
            raise InputError(f"pixel size must be a positive number of um, got {pixel_size}")
        src = src.with_pixel_size(pixel_size)
    return src


def check_output(src: ImageSource, output, name: str = "cellmask",
                 overwrite: bool = False) -> Path:
    """Everything about the output that can be refused before the model loads: its name, that
    it is writable, and that ``labels/<name>`` is not another tool's. Returns the store."""
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"labels name {name!r} must be a plain name such as 'cellmask'")
    root = output_root(src, output)
    _check_writable(root)
    check_not_foreign(root, name)
    if output is not None and str(output).lower().endswith((".tif", ".tiff")) \
            and Path(output).exists() and not overwrite \
            and not (root / "labels" / name / ".run").is_dir():  # not from this store's run
        raise OutputConflict(f"{output} exists: pass --overwrite (overwrite=True) to replace "
                             "it with these labels, or another --out")
    return root


def _check_writable(root: Path) -> None:
    """Fail early, with the fix, when the output cannot be written."""
    if root.exists() and not root.is_dir():
        raise InputError(f"output {root} exists and is a file, not an OME-Zarr folder: "
                         "choose another --out")
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise InputError(f"cannot write the output {root}: {probe} is read-only; pass a "
                         "writable --out (output=)")


def run_record(model, appearance: Appearance, scale: float, src: ImageSource,
               corrupt: list[str], level: int = 0) -> dict:
    """What a run decided, stored in the labels' attributes: the model, the modality and its
    stain vectors, the scale used, the pyramid level the network read, the views fused per
    tile and the input's pixel size."""
    record = {"model": model.name or "?", "model_digest": model.weights_digest,
              "test_views": model.config.test_views,
              "modality": appearance.modality, "appearance": appearance.to_dict(),
              "scale": scale, "input_pixel_size_um": list(src.pixel_size_um or []) or None,
              "model_pixel_size_um": model.pixel_size, "pyramid_level": level}
    if corrupt:
        record["corrupt_input_chunks"] = corrupt
    return record


def fingerprint(src: ImageSource, survey: Survey, model, cfg: RunConfig, scale: float,
                batch: int, threads: int, level: int = 0) -> dict:
    """The run's identity: its input, its model and every setting of its arithmetic
    (``threads``: torch threads per network pass, which set the rounding of some kernels, such
    as oneDNN's int8 convolutions on AVX-512)."""
    return {"input": source_identity(src, survey.digest),
            "model": {"digest": model.weights_digest,
                      "config": json.loads(model.config.to_json())},
            "settings": {**cfg.arithmetic(), "scale": scale, "batch": batch,
                         "precision": model.precision, "device": model.device.type,
                         "threads_per_pass": threads, "pyramid_level": level},
            "appearance": survey.appearance.to_dict()}


def run(source, output=None, *, model=None, device: str = "auto", client=None, detector=None,
        config: RunConfig | None = None, **settings) -> Iterator[Progress | SegmentationResult]:
    """Segment ``source`` into ``output``; yields progress events, then the result.

    Settings are a :class:`~cellmask.config.RunConfig` (``config=``) or its fields as keywords
    (``tile=``, ``halo=``, ``scale=``, ``modality=``, ...). Stages, in order: **open** the input
    lazily and check the output; **survey** the whole image once (modality, stains and
    intensity range from a strided sample, its digest, the tissue of a brightfield slide);
    **plan** the tiles, lock the run folder and compare fingerprints (a run resumes only its own
    records; another input or other settings are refused, naming what differs, unless
    ``overwrite``); **detect** each unfinished tile (core + halo) and save what it owns as a
    record; **resolve** all instances; **paint** them chunk by chunk with the pyramid;
    **measure**. Labels are written at level-0 resolution with the input's pixel size and unit.

    ``detector(tile, window)``, if given, replaces the model's tile detection: it receives a
    :class:`~cellmask.tiling.Tile` and its raw window ``(h, w, C)`` and returns the
    :class:`~cellmask.stitch.InstanceSet` the tile owns (used to test tiling and stitching with
    exact, model-free instances).
    """
    from cellmask.appearance import MODALITIES

    cfg = dataclasses.replace(config or RunConfig(), **settings)
    if cfg.tile <= 0 or (cfg.halo is not None and cfg.halo < 0):
        raise InputError(f"tile must be positive and halo zero or more (got {cfg.tile}, "
                         f"{cfg.halo})")
    if cfg.halo is not None and cfg.tile < 2 * cfg.halo:
        raise InputError(f"tile {cfg.tile} is smaller than twice the halo {cfg.halo}: use "
                         f"--tile {max(256, 4 * cfg.halo)} or a smaller --halo")
    if cfg.modality not in MODALITIES:
        raise InputError(f"modality {cfg.modality!r} is not one of {', '.join(MODALITIES)}")
    stages = _Stages(cfg, client, detector)
    stages.open(source, output, model, device)
    stages.survey()
    stages.plan()
    try:
        yield from stages.detect()
        yield from stages.resolve_and_paint()
        yield from stages.grow_cells()
        stages.measure()
        stages.finish()
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            finished = len(list(stages.folder.tiles_dir.glob("*_*.npz")))
            raise OSError(err.errno, f"the disk holding {stages.root} is full "
                          f"({err.strerror}); {finished} tile results are saved: free some "
                          "space and run the same command again to continue") from None
        raise
    finally:
        if stages.image_copy is not None:  # no writes after the run ends, whatever ended it
            stages.image_copy.stop()
        stages.folder.unlock()
    if output is not None and str(output).lower().endswith((".tif", ".tiff")):
        px = stages.src.pixel_size_um
        write_labels_tiff(stages.group["0"], Path(output), px[1] if px else None)
        log.info("labels written to %s (the run's store: %s)", output, stages.root)
    yield Progress("done", len(stages.tiles), len(stages.tiles), len(stages.kept),
                   seconds=stages.timings["total"])
    yield stages.result()


class _Stages:
    """The state one run carries from stage to stage (see :func:`run`)."""

    def __init__(self, cfg: RunConfig, client, detector):
        self.cfg, self.client, self.detector = cfg, client, detector
        self.compartment_table = None
        self._every: ImageSource | None = None
        self.t_start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.corrupt: list[str] = []
        self.tissue = None
        self.skipped: list[Tile] = []
        self.table = None
        self.image_copy: _ImageCopy | None = None

    # --- open
    def open(self, source, output, model, device) -> None:
        from cellmask.model.segmenter import load_model, resolve_scale

        cfg = self.cfg
        self.source = source
        self.src = open_source(source, axes=cfg.axes, channel=cfg.channel, z=cfg.z, t=cfg.t,
                               pixel_size=cfg.pixel_size)
        self.root = check_output(self.src, output, cfg.name, cfg.overwrite)
        self.cell_px = 0.0
        if cfg.cell_expansion:
            px_um = self.src.pixel_size_um
            if not (np.isfinite(cfg.cell_expansion) and cfg.cell_expansion > 0):
                raise InputError(f"cell expansion must be a positive number of um, got "
                                 f"{cfg.cell_expansion}")
            if px_um is None:
                raise InputError("growing cells by micrometres needs the pixel size: the "
                                 "input states none; pass --pixel-size UM (pixel_size=)")
            self.cell_px = cfg.cell_expansion / px_um[1]
            for extra in (f"{cfg.name}_cells", f"{cfg.name}_cytoplasm"):
                check_not_foreign(self.root, extra)
        self.boundary_channel = self._boundary_channel()
        self.boundary_range = self._boundary_range()
        self.output_given = output is not None
        if model is None or isinstance(model, (str, Path)):  # after every check of the input
            model = load_model(model or "nuclei", device=device)
        self.model = model
        px_um = self.src.pixel_size_um
        self.scale = resolve_scale(model, cfg.scale, cfg.diameter, px_um[1] if px_um else None)
        if cfg.halo is None:  # from the network's context and the objects' size
            from cellmask.model.context import OBJECT_DIAMETERS, auto_halo

            self.cfg = cfg = dataclasses.replace(cfg, halo=auto_halo(model, self.scale,
                                                                     cfg.tile))
            log.info("halo: %d px (the network's context and objects of %g px at scale %.3g)",
                     cfg.halo, OBJECT_DIAMETERS * model.trained_diameter, self.scale)
        # the network reads the pyramid level nearest its scale (a detector sees level 0)
        self.level = pyramid_level(self.src, self.scale) if self.detector is None else 0
        log.info("scale %.4g (input pixel %s, model trained at %s)%s", self.scale,
                 f"{px_um[1]:g} um" if px_um else "size unknown",
                 f"{model.pixel_size:g} um" if model.pixel_size else "no stated pixel size",
                 f"; reading pyramid level {self.level}" if self.level else "")
        self.group_dir = self.root / "labels" / cfg.name
        self.folder = RunFolder(self.group_dir)
        self.batch = max(1, cfg.batch_size or model.default_batch_size())

    # --- survey
    def survey(self) -> None:
        cfg = self.cfg
        mc = self.model.config
        self.look = survey_image(self.src, mc.norm_percentiles, cfg.modality,
                                 skip_corrupt=cfg.skip_corrupt,
                                 second_stain=mc.second_stain_weight,
                                 level=mc.brightfield_level)
        self.appearance = self.look.appearance
        tt = time.perf_counter()
        if cfg.tissue_mask and self.src.array.shape[2] == 3 \
                and self.appearance.modality == "brightfield":
            self.tissue = self.look.tissue if self.look.tissue is not None else \
                find_tissue(self.look.view, self.look.step, self.appearance)
        self.timings["tissue"] = time.perf_counter() - tt

    # --- plan
    def plan(self) -> None:
        """Tiles, the lock, the fingerprint check, and which tiles are left to detect."""
        cfg = self.cfg
        self.tiles = plan_tiles(self.src.shape, cfg.tile, cfg.halo)
        self.n_workers = tile_workers(self.model, len(self.tiles), self.batch, cfg.workers)
        check_shape(self.root, cfg.name, self.src.shape)
        try:
            self.folder.lock()
        except (PermissionError, FileNotFoundError, NotADirectoryError) as err:
            raise _unwritable(self.root, err) from None
        try:
            self._check_previous()
        except BaseException:
            self.folder.unlock()
            raise
        done = self.folder.finished(self.tiles)
        todo = [tl for tl in self.tiles if tl.index not in done]
        if self.tissue is not None:
            self.skipped = [tl for tl in todo if not self.tissue.covers(tl.window)]
            if self.skipped:
                todo = [tl for tl in todo if self.tissue.covers(tl.window)]
                log.info("tissue: %.0f%% of the slide (optical density > %.3f); %d of %d tiles "
                         "hold none and are recorded as empty", 100 * self.tissue.fraction,
                         self.tissue.threshold, len(self.skipped), len(self.tiles))
        self.todo = todo
        self.corrupt = list(read_json(self.folder.dir / "corrupt.json") or [])

    def _check_previous(self) -> None:
        from cellmask.workers import pass_threads  # torch: loaded with the model by now

        fp = fingerprint(self.src, self.look, self.model, self.cfg, self.scale, self.batch,
                         pass_threads(self.n_workers), self.level)
        self.fp = fp
        previous = self.folder.previous()
        has_records = any(self.folder.tiles_dir.glob("*.npz"))
        if self.cfg.overwrite or (previous is None and has_records):
            self.folder.reset()  # records without a readable fingerprint are not trusted
        elif previous is not None and previous.get("fingerprint") != fp:
            diff = differences(previous.get("fingerprint") or {}, fp)
            what = "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
            raise OutputConflict(
                f"{self.group_dir} holds labels of another run ({what or 'an older cellmask'}): "
                "pass --overwrite (overwrite=True) to replace them, or another --name or --out")
        elif previous is not None and previous.get("state") == "done":
            level0 = self._level0()
            edited = self.folder.edited_tiles(level0, self.tiles) if level0 is not None else []
            if edited:
                y0, y1, x0, x1 = edited[0].core
                raise OutputConflict(
                    f"{len(edited)} tile(s) of {self.group_dir} were edited after cellmask "
                    f"wrote them (first: y {y0}:{y1}, x {x0}:{x1}): pass --overwrite "
                    "(overwrite=True) to replace your edits, or another --name")
        self.folder.save_state(fp, "tiles")

    def _level0(self):
        import zarr

        try:
            return zarr.open_array(str(self.group_dir / DATASETS[0]), mode="r")
        except Exception:  # no labels yet
            return None

    def _create_output(self):
        """The labels group; in a new store (not the input OME-Zarr) also the input image
        at the store's root (with every channel), so that the output opens on its own."""
        src = self.src
        in_place = src.kind == "ome-zarr" and not self.output_given
        self.image_src = self.image_group = None
        try:
            if not in_place and self.cfg.write_image:
                from cellmask.sources import channel_labels

                every = self._all_channels()
                self.image_src = every
                self.image_group = create_image(
                    self.root, src.shape, channel_labels(every), every.array.dtype,
                    self.cfg.tile, pixel_size=src.pixel_size, unit=src.pixel_unit)
            return create_labels(self.root, self.cfg.name, src.shape, self.cfg.tile,
                                 zarr_format=src.zarr_format if in_place else 3,
                                 pixel_size=src.pixel_size, unit=src.pixel_unit,
                                 source="../../" if in_place or self.image_group is not None
                                 else (str(src.path) if src.path else None))
        except (PermissionError, FileNotFoundError, NotADirectoryError) as err:
            raise _unwritable(self.root, err) from None

    # --- detect
    def detect(self) -> Iterator[Progress]:
        cfg, folder = self.cfg, self.folder
        empty = InstanceSet.empty().to_arrays()
        for tl in self.skipped:  # no tissue: an ordinary, empty tile record
            save_npz_atomic(folder.record_path(tl), empty)
        groups = [self.todo[k:k + self.batch] for k in range(0, len(self.todo), self.batch)]
        n_workers = self.n_workers
        limit_arenas(2 + n_workers)  # before threads start: see cellmask.memory
        self.group = self._create_output()
        if self.image_group is not None:
            self.image_copy = _ImageCopy(self.image_src, self.image_group, self.tiles,
                                         cfg.skip_corrupt)
        self.timings["setup"] = time.perf_counter() - self.t_start
        t0 = time.perf_counter()
        done, objects, px = len(self.tiles) - len(self.todo), 0, 0
        split: dict[str, float] = {"prepare": 0.0, "network": 0.0, "masks": 0.0}
        wait_read = t_model = t_record = 0.0

        def progress(tl: Tile, found: int) -> Progress:
            nonlocal done, objects, px
            done += 1
            objects += found
            px += (tl.core[1] - tl.core[0]) * (tl.core[3] - tl.core[2])
            return Progress("tiles", done, len(self.tiles), objects, px / 1e6,
                            time.perf_counter() - t0)

        if self.client is not None and groups:
            from cellmask.distributed import run_tiles

            for n_found, tl, bad in run_tiles(self.client, self.model, self.src, self.todo,
                                              self.appearance, self.scale, folder,
                                              cfg.skip_corrupt, self.level):
                self._note_corrupt(bad)
                yield progress(tl, n_found)
        elif groups:
            from cellmask.workers import ModelThreads

            timer = TileTimer(split)
            with WindowReader(self.src, cfg.skip_corrupt, n_workers + 2,
                              self.level) as reader, ModelThreads(self.model, n_workers) as pool:
                reader.start(groups)
                # reading runs ahead of the network; up to ``n_workers`` batches are in the
                # network at once (tiles are independent; records are per tile)
                running: deque = deque()
                finished = 0
                for k, batch_tiles in enumerate(groups):
                    tw = time.perf_counter()
                    read_out = reader.take()
                    wait_read += time.perf_counter() - tw
                    for _, bad in read_out:
                        self._note_corrupt(bad)
                    running.append((batch_tiles, pool.submit(
                        timer.detect, self.detector, self.src, batch_tiles,
                        [w for w, _ in read_out], self.appearance, self.scale, self.level)))
                    del read_out
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
                            save_npz_atomic(folder.record_path(tl), inst.to_arrays())
                            t_record += time.perf_counter() - t_w
                            yield progress(tl, len(inst))
            t_model = timer.seconds
            split["network_wall"] = timer.network_wall()
        self.timings.update({"tiles": time.perf_counter() - t0, "model": t_model, **split,
                             "read_wait": wait_read, "records": t_record})

    def _note_corrupt(self, names: list[str]) -> None:
        for name in names:
            if name not in self.corrupt:
                self.corrupt.append(name)
                log.warning("skipping corrupt %s: its pixels read as 0", name)
                write_json_atomic(self.folder.dir / "corrupt.json", self.corrupt)

    # --- resolve and paint
    def resolve_and_paint(self) -> Iterator[Progress]:
        t1 = time.perf_counter()
        folder, group, tile = self.folder, self.group, self.cfg.tile
        self.folder.save_state(self.fp, "paint")
        parts = [InstanceSet.from_arrays(np.load(folder.record_path(tl))) for tl in self.tiles]
        c = self.model.config
        kept = resolve(InstanceSet.concatenate(parts),
                       min_visible_fraction=c.min_visible_fraction, min_area=c.min_area)
        self.kept = kept
        _check_halo(kept, self.cfg.halo, len(self.tiles))
        index = SpatialIndex(kept, tile)
        level0 = group["0"]
        whole_chunks = tile_pyramid(group, tile)  # outputs of older versions: not
        holes = corrupt_boxes(self.corrupt)
        digests: dict[str, str] = {}

        def paint(tl: Tile) -> None:  # a tile's core is whole output chunks: no two share one
            labels = paint_region(kept, index, tl.core)
            y0, y1, x0, x1 = tl.core
            for hy0, hy1, hx0, hx1 in holes:  # unreadable input stays empty in the labels
                labels[max(hy0, y0) - y0:max(0, min(hy1, y1) - y0),
                       max(hx0, x0) - x0:max(0, min(hx1, x1) - x0)] = 0
            digests[tile_key(tl)] = labels_digest(labels)
            if whole_chunks:
                write_levels(group, tl.core, labels)
            else:
                level0[y0:y1, x0:x1] = labels

        if self.image_copy is not None:  # the input beside its labels, copied meanwhile
            tw = time.perf_counter()
            self.image_copy.join()
            self.timings["image_wait"] = time.perf_counter() - tw
        # the cores are otherwise idle here; encoding chunks releases the GIL
        with ThreadPoolExecutor(_output_threads()) as painters:
            for k, _ in enumerate(painters.map(paint, self.tiles)):
                yield Progress("paint", k + 1, len(self.tiles), len(kept))
            if not whole_chunks:
                write_pyramid(group, painters)
        folder.save_painted(digests)
        self.timings["stitch_paint"] = time.perf_counter() - t1

    # --- grow cells
    def grow_cells(self) -> Iterator[Progress]:
        """Cells and cytoplasm from the painted nuclei, tile by tile (see
        :mod:`cellmask.compartments`); nothing without ``cell_expansion``."""
        self.compartments = {"nucleus": self.group["0"]}
        if not self.cell_px:
            return
        from cellmask.compartments import cells_of_region

        t0 = time.perf_counter()
        cfg, src = self.cfg, self.src
        groups = {}
        for suffix in ("cells", "cytoplasm"):
            groups[suffix] = create_labels(
                self.root, f"{cfg.name}_{suffix}", src.shape, cfg.tile,
                zarr_format=self.group.metadata.zarr_format, pixel_size=src.pixel_size,
                unit=src.pixel_unit, source="../../" if src.kind == "ome-zarr"
                and not self.output_given else (str(src.path) if src.path else None))
        nuclei = self.group["0"]
        whole = all(tile_pyramid(g, cfg.tile) for g in groups.values())
        boundary = None
        if self.boundary_channel is not None:
            every, stain, skip = self._all_channels(), self.boundary_channel, cfg.skip_corrupt

            def boundary(window: tuple[int, int, int, int]) -> np.ndarray:
                return read_window(every, window, skip)[0][..., stain]

        def paint(tl: Tile) -> None:
            _, cell, cyto = cells_of_region(nuclei, tl.core, self.cell_px, src.shape,
                                            boundary, cfg.cell_boundary_kind,
                                            self.boundary_range)
            for g, labels in ((groups["cells"], cell), (groups["cytoplasm"], cyto)):
                if whole:
                    write_levels(g, tl.core, labels.astype(np.int32))
                else:
                    y0, y1, x0, x1 = tl.core
                    g["0"][y0:y1, x0:x1] = labels
            # every tile's cells are complete once its own and its neighbours' nuclei are:
            # they were all painted before this stage

        with ThreadPoolExecutor(_output_threads()) as painters:
            for k, _ in enumerate(painters.map(paint, self.tiles)):
                yield Progress("cells", k + 1, len(self.tiles), len(self.kept))
            if not whole:
                for g in groups.values():
                    write_pyramid(g, painters)
        self.compartments.update({"cell": groups["cells"]["0"],
                                  "cytoplasm": groups["cytoplasm"]["0"]})
        self.timings["cells"] = time.perf_counter() - t0

    # --- measure
    def measure(self) -> None:
        t2 = time.perf_counter()
        if self.cfg.measure:
            from cellmask.measure import measure_instances

            src, skip = self.src, self.cfg.skip_corrupt
            from cellmask.qc import object_signals, run_summary

            table = measure_instances(self.kept, src, self.cfg.tile,
                                      read=lambda r: read_window(src, r, skip)[0],
                                      threads=_output_threads())
            table = object_signals(table, self.kept.scores, self.kept.mask_confidence,
                                   src.shape, self.cfg.tile)
            write_table_atomic(self.group_dir / "measurements", table)
            self.qc = run_summary(table, src.shape, self.cfg.tile, self.cfg.halo)
            write_json_atomic(self.group_dir / "qc.json", self.qc)
            log.info("quality: %d objects, %d low-confidence, %d size outliers, %d larger "
                     "than the halo, %d crossing seams (see %s)", self.qc["objects"],
                     self.qc.get("low_confidence", 0), self.qc.get("size_outliers", 0),
                     self.qc.get("larger_than_halo", 0), self.qc.get("crossing_seams", 0),
                     self.group_dir / "qc.json")
            self.table = table
            self._measure_compartments(table)
        self.timings["measure"] = time.perf_counter() - t2

    def _boundary_channel(self) -> int | None:
        """Index (in every channel of the input) of the stain bounding the cells, or None."""
        from cellmask.compartments import BOUNDARY_KINDS
        from cellmask.sources import channel_labels

        cfg = self.cfg
        if cfg.cell_boundary is None:
            return None
        if not self.cell_px:
            raise InputError("a cell boundary channel bounds grown cells: pass "
                             "--cell-expansion UM (cell_expansion=) too")
        if cfg.cell_boundary_kind not in BOUNDARY_KINDS:
            raise InputError(f"cell boundary kind must be one of {', '.join(BOUNDARY_KINDS)}, "
                             f"got {cfg.cell_boundary_kind!r}")
        names = channel_labels(self._all_channels())
        choice = cfg.cell_boundary
        if isinstance(choice, str) and choice.lstrip("-").isdigit():
            choice = int(choice)
        if isinstance(choice, int) and not isinstance(choice, bool):
            if 0 <= choice < len(names):
                return choice
        elif isinstance(choice, str) and choice in names:
            return names.index(choice)
        raise InputError(f"cell boundary channel {cfg.cell_boundary!r} is not a channel of "
                         f"the input (channels {', '.join(names)}; give an index or a name)")

    def _boundary_range(self) -> tuple[float, float] | None:
        """The bounding stain's range over the whole image, from a strided sample of at most
        about 4 Mpx (once per image, never per tile)."""
        from cellmask.compartments import stain_range
        from cellmask.sources import threaded_scheduler
        from cellmask.normalize import sample_step

        if self.boundary_channel is None:
            return None
        every = self._all_channels()
        step = sample_step(every.shape)
        try:
            sample = every.array[::step, ::step, self.boundary_channel].compute(
                scheduler=threaded_scheduler)
        except Exception as err:  # a corrupt chunk: name it rather than guess a range
            where = every.path or "the image"
            raise InputError(f"cannot sample the cell boundary channel of {where} "
                             f"({type(err).__name__}: {err})") from None
        return stain_range(np.asarray(sample))

    def _all_channels(self) -> ImageSource:
        """The input with every channel (the segmented one is one of them), opened once."""
        if self._every is None:
            self._every = self._open_all_channels()
        return self._every

    def _open_all_channels(self) -> ImageSource:
        cfg, source = self.cfg, self.source
        if isinstance(source, ImageSource):
            if source.path is None:
                return source
            source = source.path
        try:
            src = open_image(source, axes=cfg.axes, channel="all", z=cfg.z, t=cfg.t)
        except InputError:
            return self.src
        if self.src.pixel_size is not None:
            src = dataclasses.replace(src, pixel_size=self.src.pixel_size,
                                      pixel_unit=self.src.pixel_unit)
        return src

    def _measure_compartments(self, nuclei_table) -> None:
        """The per-compartment, every-channel table, when cells were grown or the input has
        channels besides the segmented one."""
        from cellmask.compartments import measure_compartments
        from cellmask.sources import channel_labels

        every = self._all_channels()
        if not self.cell_px and every.array.shape[2] <= self.src.array.shape[2]:
            return
        skip = self.cfg.skip_corrupt
        px_um = self.src.pixel_size_um
        table = measure_compartments(
            self.compartments, lambda r: read_window(every, r, skip)[0], channel_labels(every),
            nuclei_table, self.cfg.tile, self.cell_px, px_um[1] if px_um else None,
            self.cfg.measurements)
        write_table_atomic(self.group_dir / "compartments", table)
        self.compartment_table = table

    def finish(self) -> None:
        """Record how the labels were made, make every written chunk durable, mark done."""
        write_json_atomic(self.folder.dir / "corrupt.json", self.corrupt)
        record = run_record(self.model, self.appearance, self.scale, self.src, self.corrupt,
                            self.level)
        if self.cell_px:
            record["cell_expansion_um"] = self.cfg.cell_expansion
            record["cell_expansion_px"] = self.cell_px
            if self.boundary_channel is not None:
                from cellmask.sources import channel_labels

                record["cell_boundary"] = {
                    "channel": self.boundary_channel, "kind": self.cfg.cell_boundary_kind,
                    "name": channel_labels(self._all_channels())[self.boundary_channel],
                    "range": list(self.boundary_range)}
        if self.tissue is not None:
            record["tissue"] = {"fraction": round(self.tissue.fraction, 4),
                                "od_threshold": self.tissue.threshold,
                                "tiles_without_tissue": len(self.skipped)}
        self.group.attrs["cellmask"] = record
        fsync_tree(self.group_dir)
        self.folder.save_state(self.fp, "done", objects=len(self.kept))
        self.timings["total"] = time.perf_counter() - self.t_start

    def result(self) -> SegmentationResult:
        import dask.array as da

        return SegmentationResult(self.group_dir, da.from_zarr(labels_level0(self.group_dir)),
                                  self.table, len(self.kept), dict(self.timings), self.corrupt,
                                  self.compartment_table)


class _ImageCopy:
    """The input copied into the output's NGFF image, tile core by tile core (every pyramid
    level), in a thread of its own that starts with detection: it uses the time the network
    leaves the cores (the reader waiting, a tile worker between passes), and painting only
    waits for what is left. One window ``(h, w, C)`` is held at a time. Cores are whole
    chunks of every level when the tile is a multiple of 4, and one thread writes them all,
    so no two writes share a chunk either way.
    """

    def __init__(self, src: ImageSource, group, tiles: list[Tile], skip_corrupt: bool):
        self._src, self._group, self._tiles, self._skip = src, group, tiles, skip_corrupt
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        # not a daemon: a run abandoned mid-way (a generator never finished) lets the copy end
        # before the interpreter does, rather than killing it inside a chunk write
        self._thread = threading.Thread(target=self._copy, name="cellmask-image-copy")
        self._thread.start()

    def _copy(self) -> None:
        try:
            for tl in self._tiles:
                if self._stopped.is_set():
                    return
                pixels = read_window(self._src, tl.core, self._skip)[0]
                write_image_levels(self._group, tl.core, pixels)
        except BaseException as err:  # raised in the run's thread by join()
            self._error = err

    def join(self) -> None:
        """Wait for the copy to finish; raise what stopped it."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop after the core being copied (a run that failed or ended); errors are the
        run's to report, not the copy's."""
        self._stopped.set()
        self._thread.join()


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


def _check_halo(kept: InstanceSet, halo: int, tiles: int) -> None:
    """Warn when objects are wider than the halo of a run of several ``tiles`` (an image of
    one tile has no seams to cut them)."""
    if not len(kept) or tiles <= 1:
        return
    w = kept.windows
    largest = int(max((w[:, 2] - w[:, 0]).max(), (w[:, 3] - w[:, 1]).max()))
    if largest > halo:
        log.warning("objects up to %d px were found but the halo is %d px: objects larger than "
                    "the halo can be cut at tile seams; pass --halo %d or more", largest, halo,
                    int(np.ceil(largest / 32) * 32))


def segment_zarr(source, output=None, *, model=None, tile: int = 1024, halo: int | None = None,
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
