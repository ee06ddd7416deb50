"""The output store: an NGFF ``labels/<name>`` image with a pyramid, written chunk by chunk.

Layout (``ROOT`` is the input OME-Zarr, or a new store)::

    ROOT/labels/            group, attribute "labels": [..., NAME]
    ROOT/labels/NAME/       group: multiscales (NGFF 0.5 on zarr v3, 0.4 on zarr v2) + image-label
    ROOT/labels/NAME/0 1 2  int32 arrays (Y, X), nearest downsampling by 2 per level, chunks
                            (chunk, chunk) halved per level: a tile of level 0 downsamples
                            to exactly one chunk of each level, written with it
    ROOT/labels/NAME/.run/  the run's state (lock, fingerprint, per-tile instance records)
    ROOT/labels/NAME/measurements.parquet, measurements.csv
    ROOT/0 1 2              (a new store only) the input image (c, y, x), so that the store
                            opens as image + labels in ome-zarr-py and napari

Only the ``labels`` group is ever written in ``ROOT``: the image arrays are never opened for
writing.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np

DATASETS = ("0", "1", "2")
#: Rows per row group of the Parquet tables cellmask writes: readers (the GeoJSON export) can
#: then hold one group at a time, whatever the number of objects.
ROW_GROUP = 50_000


def create_labels(root: Path, name: str, shape: tuple[int, int], chunk: int,
                  zarr_format: int = 3, pixel_size: tuple[float, float] | None = None,
                  source: str | None = "../../", unit: str | None = None):
    """Create (or reopen, if it exists with the same shape) the label arrays; returns the group."""
    import zarr

    root_group = zarr.open_group(str(root), mode="a", zarr_format=zarr_format)
    labels = root_group.require_group("labels")
    group = labels.require_group(name)
    shapes = [shape]
    for _ in DATASETS[1:]:
        shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
    for level, (path, shp) in enumerate(zip(DATASETS, shapes)):
        if path in group:
            if tuple(group[path].shape) != tuple(shp):
                raise _other_shape(root, name, tuple(group[path].shape))
            continue
        extra = {"dimension_names": ("y", "x")} if zarr_format == 3 else {}
        group.create_array(path, shape=shp, chunks=_level_chunks(chunk, level, shp),
                           dtype="int32", fill_value=0, **extra)
    _write_metadata(root, name, zarr_format, pixel_size, source, unit)
    # opened again: a zarr group object caches its attributes, the writers used their own
    return zarr.open_group(str(Path(root) / "labels" / name), mode="a", zarr_format=zarr_format)


def has_image(root: Path) -> bool:
    """Whether the store ``root`` holds an NGFF image (multiscales) at its root."""
    import zarr

    try:
        attrs = zarr.open_group(str(root), mode="r").attrs.asdict()
    except Exception:  # no store yet
        return False
    return "multiscales" in attrs.get("ome", attrs)


def create_image(root: Path, shape: tuple[int, int], channels: list[str], dtype, chunk: int,
                 pixel_size: tuple[float, float] | None = None, unit: str | None = None):
    """An NGFF multiscale image ``(c, y, x)`` at the root of ``root`` (levels ``0 1 2``,
    downsampled by 2 per level), so that a store made from a TIFF, PNG or array opens in
    ome-zarr-py and napari with its labels; filled by :func:`write_image_levels`."""
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    c = len(channels)
    shapes = [shape]
    for _ in DATASETS[1:]:
        shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
    for level, (path, (h, w)) in enumerate(zip(DATASETS, shapes)):
        if path not in group:
            side = _level_chunks(chunk, level, (h, w))
            group.create_array(path, shape=(c, h, w), chunks=(1, *side), dtype=dtype,
                               fill_value=0, dimension_names=("c", "y", "x"))
    sy, sx = pixel_size or (1.0, 1.0)
    datasets = [{"path": p, "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, sy * 2 ** i, sx * 2 ** i]}]}
        for i, p in enumerate(DATASETS)]
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
            {"name": "x", "type": "space"}]
    if unit and pixel_size:
        for axis in axes[1:]:
            axis["unit"] = _NGFF_UNITS.get(unit, unit)
    write_multiscales_metadata(group, datasets, fmt=FormatV05(), axes=axes, name="image",
                               metadata={"method": "stride"})
    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    ome = dict(group.attrs.asdict()["ome"])
    ome["omero"] = {"channels": [{"label": name, "active": True} for name in channels]}
    group.attrs["ome"] = ome
    return zarr.open_group(str(root), mode="a", zarr_format=3)


def write_image_levels(group, core: tuple[int, int, int, int], pixels: np.ndarray) -> None:
    """Write the ``(h, w, C)`` input ``pixels`` of a tile ``core`` into every level of the
    image ``group`` (every second pixel per level: chunks stay whole when the core starts on
    a multiple of 4)."""
    y0, _, x0, _ = core
    chw = np.moveaxis(pixels, -1, 0)
    for level, path in enumerate(DATASETS):
        f = 2 ** level
        oy, ox = (-y0) % f, (-x0) % f
        piece = chw[:, oy::f, ox::f]
        arr = group[path]
        ty, tx = (y0 + oy) // f, (x0 + ox) // f
        arr[:, ty:ty + piece.shape[1], tx:tx + piece.shape[2]] = piece


def check_shape(root: Path, name: str, shape: tuple[int, int]) -> None:
    """Refuse, before anything is written, labels ``name`` that exist with another shape."""
    path = Path(root) / "labels" / name / DATASETS[0]
    if not path.exists():
        return
    import zarr

    try:
        existing = tuple(zarr.open_array(str(path), mode="r").shape)
    except Exception:  # not a readable array: create_labels will say what is wrong
        return
    if existing != tuple(shape):
        raise _other_shape(root, name, existing)


def _other_shape(root: Path, name: str, existing: tuple[int, ...]) -> FileExistsError:
    return FileExistsError(f"{root}/labels/{name} exists with another shape {existing}: "
                           "delete it or choose another name")


def _level_chunks(chunk: int, level: int, shape: tuple[int, int]) -> tuple[int, int]:
    """Chunks of pyramid ``level``: the level-0 ``chunk`` halved per level, within ``shape``."""
    side = max(1, chunk >> level)
    return min(side, shape[0]), min(side, shape[1])


#: OME-XML unit symbols as NGFF (UDUNITS-2) names.
_NGFF_UNITS = {"\u00b5m": "micrometer", "um": "micrometer", "micron": "micrometer",
               "nm": "nanometer", "mm": "millimeter"}


def _write_metadata(root: Path, name: str, zarr_format: int, pixel_size, source,
                    unit=None) -> None:
    """NGFF multiscales + image-label metadata of ``labels/<name>`` and the ``labels`` list,
    through ome-zarr-py's writers (0.5 on zarr v3, 0.4 on zarr v2)."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    def open_(path: str):
        return zarr.open_group(str(Path(root) / path), mode="a", zarr_format=zarr_format)

    fmt = FormatV05() if zarr_format == 3 else FormatV04()
    sy, sx = pixel_size or (1.0, 1.0)
    datasets = [{"path": p, "coordinateTransformations": [
        {"type": "scale", "scale": [sy * 2 ** i, sx * 2 ** i]}]} for i, p in enumerate(DATASETS)]
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    if unit and pixel_size:
        for axis in axes:
            axis["unit"] = _NGFF_UNITS.get(unit, unit)
    write_multiscales_metadata(open_(f"labels/{name}"), datasets, fmt=fmt, axes=axes,
                               name=name, metadata={"method": "nearest"})
    listed = list(_ome(open_("labels")).get("labels", []))
    extra = {"source": {"image": source}} if source else {}
    write_label_metadata(open_("labels"), name,
                         colors=[{"label-value": 0, "rgba": [0, 0, 0, 0]}], fmt=fmt, **extra)
    # the writer appends the name each time: keep each name once, in its first place
    names = [n for k, n in enumerate(listed + [name]) if n not in (listed + [name])[:k]]
    labels = open_("labels")
    if zarr_format == 3:
        labels.attrs["ome"] = {**_ome(labels), "version": fmt.version, "labels": names}
    else:
        labels.attrs["labels"] = names


def _ome(group) -> dict:
    attrs = group.attrs.asdict()
    return dict(attrs.get("ome", attrs))


def tile_pyramid(group, tile: int) -> bool:
    """Whether every level's chunks are the level-0 ``tile`` downsampled (so that a painted
    tile can write its own piece of each level: :func:`write_levels`)."""
    if tile % 2 ** (len(DATASETS) - 1):
        return False
    return all(tuple(group[path].chunks) == _level_chunks(tile, level, group[path].shape)
               for level, path in enumerate(DATASETS))


def write_levels(group, core: tuple[int, int, int, int], labels: np.ndarray) -> None:
    """Write the painted ``labels`` of a tile ``core`` ``(y0, y1, x0, x1)`` into level 0 and
    its nearest-neighbour downsampling into the other levels (whole chunks each, when
    :func:`tile_pyramid` holds: tiles can then be written in parallel)."""
    y0, _, x0, _ = core
    for level, path in enumerate(DATASETS):
        f = 2 ** level
        piece = labels[::f, ::f]
        group[path][y0 // f:y0 // f + piece.shape[0], x0 // f:x0 // f + piece.shape[1]] = piece


def write_pyramid(group, pool=None) -> None:
    """Fill levels 1.. from the level above by nearest-neighbour downsampling (every second
    pixel), one output chunk at a time: memory stays at a few chunks per thread whatever the
    image size. ``pool`` (an executor), if given, writes the chunks of a level in parallel."""
    for prev, path in zip(DATASETS[:-1], DATASETS[1:]):
        src, dst = group[prev], group[path]
        ch, cw = dst.chunks

        def write(corner: tuple[int, int]) -> None:
            y, x = corner
            block = src[2 * y:2 * min(y + ch, dst.shape[0]):2,
                        2 * x:2 * min(x + cw, dst.shape[1]):2]
            dst[y:y + block.shape[0], x:x + block.shape[1]] = block

        corners = [(y, x) for y in range(0, dst.shape[0], ch) for x in range(0, dst.shape[1], cw)]
        list(pool.map(write, corners) if pool is not None else map(write, corners))


def labels_level0(path: str | Path, name: str = "cellmask"):
    """The level-0 labels array (a zarr array) of a cellmask output.

    ``path`` may be the store root, its ``labels`` group, or the ``labels/<name>`` group.
    """
    import zarr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    for candidate in (path, path / name, path / "labels" / name):
        try:
            group = zarr.open_group(str(candidate), mode="r")
        except Exception:  # not a group at this level: try the next
            continue
        attrs = group.attrs.asdict()
        meta = attrs.get("ome", attrs)
        if "multiscales" in meta and "image-label" in meta:
            return group[meta["multiscales"][0]["datasets"][0]["path"]]
    raise FileNotFoundError(f"no cellmask labels image found at {path} (looked for "
                            f"labels/{name} with NGFF image-label metadata)")


def read_json(path: Path, default=None):
    """The JSON value in ``path``; ``default`` when the file is missing (a file cut short by a
    power loss raises ``json.JSONDecodeError``)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the directory entry itself is data)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not on POSIX file systems: the rename is what durability there is
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux), else
    set and restored (not atomic with other threads, hence the first way)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """Permission bits for a new file at ``path``: those of the file it replaces, else the
    mode ``open()`` would give (0666 less the umask)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def write_atomic(path: Path, write) -> None:
    """Write a file that is either whole or absent, whatever stops the process: ``write(fh)``
    fills a unique temporary file beside ``path`` (so two writers never share one), which is
    fsynced and renamed over ``path``; the folder is fsynced so the rename survives a power
    loss."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)  # reopened by name: writers such as tifffile want a named file
    try:
        # mkstemp makes files private (0600); a table or GeoJSON is shared like any file the
        # user writes: the mode of the file replaced, else 0666 less the umask
        os.chmod(tmp, _mode_for(path))
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_table_atomic(stem: Path, table) -> None:
    """A pandas ``table`` as ``stem.parquet`` (row groups of :data:`ROW_GROUP` rows) and
    ``stem.csv``, each written atomically."""
    stem = Path(stem)
    write_atomic(stem.with_suffix(".parquet"),
                 lambda fh: table.to_parquet(fh, index=False, row_group_size=ROW_GROUP))
    write_atomic(stem.with_suffix(".csv"),
                 lambda fh: fh.write(table.to_csv(index=False).encode()))


def write_json_atomic(path: Path, value) -> None:
    text = json.dumps(value, indent=1, sort_keys=True).encode()
    write_atomic(path, lambda fh: fh.write(text))


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_atomic(path, lambda fh: np.savez(fh, **arrays))


def fsync_tree(folder: Path, skip: tuple[str, ...] = (".run",)) -> None:
    """fsync every file and folder under ``folder`` (the chunks zarr wrote), so that a run
    marked done is on disk; folders named in ``skip`` are left out."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
