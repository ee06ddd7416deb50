"""Many images in one run: a folder, a glob, a list of files or arrays.

The model loads once; each image is segmented by :func:`cellmask.segment_zarr` into its own
OME-Zarr in ``out_dir`` (named after the image's whole name, made unique when two inputs share
one), resumable per image like any run; one combined table with an ``image`` column is written
to ``out_dir/measurements.parquet`` and ``.csv``. An image that cannot be segmented is reported
and the others go on.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellmask.errors import CellmaskError, InputError

log = logging.getLogger(__name__)

#: File suffixes a folder is searched for (lower case).
IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".png", ".jpg", ".jpeg", ".npy", ".btf")


@dataclass
class BatchResult:
    """``results``: per input, its :class:`~cellmask.pipeline.SegmentationResult`;
    ``failed``: per input that could not be segmented, the reason; ``table``: all
    measurements with an ``image`` column; ``table_path``: where that table was written."""

    results: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    table: Any = None
    table_path: Path | None = None


def expand_inputs(items) -> list[Any]:
    """Folders -> their image files and Zarr stores (sorted), globs -> their matches, files and
    arrays as they are; refuses an empty result and missing paths."""
    out: list[Any] = []
    for item in items:
        if not isinstance(item, (str, Path)):
            out.append(item)  # an in-memory array
            continue
        path = Path(item)
        if path.is_dir() and not _is_store(path):
            found = sorted(p for p in path.iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES or _is_store(p))
            if not found:
                raise InputError(f"folder {path} is not a Zarr store and holds no images "
                                 f"({', '.join(IMAGE_SUFFIXES)} or Zarr stores)")
            out.extend(found)
        elif any(ch in str(item) for ch in "*?[") and not path.exists():
            found = sorted(Path(p) for p in glob.glob(str(item)))
            if not found:
                raise InputError(f"no file matches {item}")
            out.extend(found)
        elif not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        else:
            out.append(path)
    if not out:
        raise InputError("no input images given")
    return out


def _is_store(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in ("zarr.json", ".zgroup",
                                                                 ".zarray"))


def output_names(inputs: list[Any], out_dir: Path) -> list[Path]:
    """One output per input in ``out_dir``: the input's whole name without its suffix +
    ``.cellmask.ome.zarr``; inputs sharing a name get their folder's name in front, then a
    number (names never collide)."""
    from cellmask.pipeline import strip_image_suffix

    stems = []
    for k, item in enumerate(inputs):
        if isinstance(item, (str, Path)):
            stems.append(strip_image_suffix(Path(item).name))
        else:
            stems.append(f"image{k:04d}")
    names = []
    for k, (item, stem) in enumerate(zip(inputs, stems)):
        if stems.count(stem) > 1 and isinstance(item, (str, Path)):
            stem = f"{Path(item).resolve().parent.name}_{stem}"
        name = stem
        n = 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return [out_dir / f"{name}.cellmask.ome.zarr" for name in names]


def segment_batch(sources, out_dir: str | Path, *, model=None, device: str = "auto",
                  progress: bool = True, **settings) -> BatchResult:
    """Segment every image of ``sources`` (paths, folders, globs or arrays) into ``out_dir``;
    ``settings`` as for :func:`cellmask.segment_zarr`. Returns a :class:`BatchResult`."""
    import pandas as pd

    from cellmask.labels_store import write_table_atomic
    from cellmask.model.segmenter import load_model
    from cellmask.pipeline import check_output, segment_zarr

    inputs = expand_inputs(list(sources) if isinstance(sources, (list, tuple)) else [sources])
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"batch output {out_dir} is a file: pass a folder")
    outputs = output_names(inputs, out_dir)
    for item, out in zip(inputs, outputs):  # every output is checked before the model loads
        if isinstance(item, (str, Path)):
            from cellmask.sources import ImageSource

            check_output(ImageSource(None, kind="file", path=Path(item)), out,
                         settings.get("name", "cellmask"), settings.get("overwrite", False))
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None or isinstance(model, (str, Path)):
        model = load_model(model or "nuclei", device=device)
    batch = BatchResult()
    frames = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(inputs), unit="image", dynamic_ncols=True)
    for item, out in zip(inputs, outputs):
        key = str(item) if isinstance(item, (str, Path)) else out.name
        try:
            result = segment_zarr(item, out, model=model, progress=False, **settings)
        except (CellmaskError, OSError) as err:
            batch.failed[key] = " ".join(str(err).split())
            log.error("%s: %s", key, batch.failed[key])
        else:
            batch.results[key] = result
            if result.table is not None:
                frames.append(result.table.assign(image=key).set_index("image").reset_index())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if frames:
        table = pd.concat(frames, ignore_index=True)
        batch.table = table
        batch.table_path = out_dir / "measurements.parquet"
        write_table_atomic(out_dir / "measurements", table)
    return batch
