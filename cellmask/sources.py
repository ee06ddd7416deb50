"""Opening images lazily: OME-Zarr (NGFF 0.4 / 0.5), plain Zarr, TIFF / SVS, numpy and dask.

Every source becomes an :class:`ImageSource` whose ``array`` is a dask array ``(Y, X, C)`` with
``C`` in {1, 3}, read chunk by chunk on demand; nothing is loaded whole. Axes come from NGFF
metadata, from the TIFF series, from the array's shape (``(Y, X)`` and ``(Y, X, 3)`` only), or
from an explicit ``axes`` string such as ``"CYX"`` or ``"TCZYX"``. Non-spatial axes other than the
channel must be selected (``z=``, ``t=``) when longer than 1; several channels need ``channel=``,
except three RGB samples of a TIFF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellmask.normalize import InputError


def sync_scheduler(*args, **kwargs):
    """dask's synchronous scheduler, passed as a function: ``compute(scheduler="synchronous")``
    first imports dask.distributed to look for a client (0.18 s in a fresh process, measured),
    a callable scheduler is used as it is. Reads here are local and small."""
    from dask.local import get_sync

    return get_sync(*args, **kwargs)


def threaded_scheduler(*args, **kwargs):
    """dask's threaded scheduler, passed as a function (see :func:`sync_scheduler`)."""
    from dask.threaded import get

    return get(*args, **kwargs)


@dataclass(frozen=True)
class ImageSource:
    """A lazily readable image. ``array``: dask ``(Y, X, C)``; ``levels``: the same at each
    pyramid level (level 0 first); ``group``: the OME-Zarr image group, if the input is one."""

    array: Any
    levels: tuple = ()
    kind: str = "array"
    path: Path | None = None
    group: Path | None = None
    zarr_format: int = 3
    pixel_size: tuple[float, float] | None = None
    description: str = field(default="", compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[0]), int(self.array.shape[1])


def _reduce_axes(arr, axes: str, *, channel: int | None, z: int | None, t: int | None):
    """Select t/z/channel of a dask array with named ``axes`` and return it as ``(Y, X, C)``."""
    import dask.array as da

    axes = axes.upper()
    if len(axes) != arr.ndim or len(set(axes)) != len(axes):
        raise InputError(f"axes {axes!r} do not describe an array of shape {tuple(arr.shape)}: "
                         "give one distinct letter per dimension, e.g. --axes CYX")
    unknown = set(axes) - set("TCZYXS")
    if unknown or "Y" not in axes or "X" not in axes:
        raise InputError(f"axes {axes!r} must contain Y and X and only T, C, Z, Y, X, S")
    arr = da.asarray(arr)
    picks = {"T": t, "Z": z}
    index: list[Any] = []
    for ax, size in zip(axes, arr.shape):
        if ax in picks:
            value = picks[ax]
            if value is None and size > 1:
                raise InputError(f"the image has {size} planes along {ax}: choose one with "
                                 f"--{ax.lower()} (or {ax.lower()}=) N")
            value = 0 if value is None else value
            if not -size <= value < size:
                raise InputError(f"{ax.lower()}={value} is out of range for {size} planes")
            index.append(value)
        else:
            index.append(slice(None))
    arr = arr[tuple(index)]
    kept = [ax for ax in axes if ax not in picks]
    chan_axes = [ax for ax in kept if ax in "CS"]
    if len(chan_axes) > 1:
        raise InputError(f"axes {axes!r} have both C and S: select the channel first")
    if not chan_axes:
        arr = arr[..., None]
        kept.append("C")
    order = [kept.index("Y"), kept.index("X"), len(kept) - 1 if not chan_axes else
             kept.index(chan_axes[0])]
    arr = arr.transpose(order)
    n = arr.shape[2]
    is_rgb = n == 3 and chan_axes == ["S"]  # TIFF samples / numpy (H, W, 3): colour
    if channel is not None:
        if not -n <= channel < n:
            raise InputError(f"channel {channel} is out of range: the image has {n} channels "
                             f"(0..{n - 1})")
        arr = arr[:, :, channel:channel + 1 if channel != -1 else None]
    elif n not in (1,) and not is_rgb:
        raise InputError(f"the image has {n} channels: choose the nuclear one with --channel N "
                         "(or channel=N)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"the image is empty (shape {tuple(arr.shape[:2])})")
    return arr


def _ome_levels(group) -> tuple[list, str, tuple[float, float] | None]:
    attrs = group.attrs.asdict()
    meta = attrs.get("ome", attrs)
    ms = meta["multiscales"][0]
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])).upper()
    arrays = [group[d["path"]] for d in ms["datasets"]]
    pixel = None
    for tr in ms["datasets"][0].get("coordinateTransformations", []):
        if tr.get("type") == "scale" and axes:
            s = tr["scale"]
            pixel = (float(s[axes.index("Y")]), float(s[axes.index("X")]))
    if not axes:  # NGFF 0.3 and older: TCZYX implied by the number of dimensions
        axes = "TCZYX"[-arrays[0].ndim:]
    return arrays, axes, pixel


def open_image(source: Any, *, axes: str | None = None, channel: int | None = None,
               z: int | None = None, t: int | None = None) -> ImageSource:
    """Open ``source`` lazily (path, zarr array or group, numpy or dask array)."""
    import dask.array as da

    if isinstance(source, ImageSource):
        return source
    if isinstance(source, (str, Path)):
        return _open_path(Path(source), axes=axes, channel=channel, z=z, t=t)
    if isinstance(source, np.ndarray) or isinstance(source, da.Array):
        arr = source
        if axes is None:
            if arr.ndim == 2:
                axes = "YX"
            elif arr.ndim == 3 and arr.shape[-1] in (1, 3):
                axes = "YXS"
            else:
                raise InputError(f"an array of shape {tuple(arr.shape)} needs axes=, e.g. "
                                 "axes='CYX'")
        dtype = np.dtype(arr.dtype)
        if dtype == bool:
            arr = arr.astype(np.uint8)
        elif not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            raise InputError(f"image dtype {dtype} is not numeric")
        kind = "numpy" if isinstance(source, np.ndarray) else "dask"
        if kind == "numpy":
            arr = da.from_array(arr)
        red = _reduce_axes(arr, axes, channel=channel, z=z, t=t)
        return ImageSource(red, (red,), kind=kind)
    import zarr

    if isinstance(source, zarr.Array):
        red = _reduce_axes(da.from_zarr(source), axes or _default_axes(source.shape),
                           channel=channel, z=z, t=t)
        return ImageSource(red, (red,), kind="zarr")
    if isinstance(source, zarr.Group):
        return _from_group(source, None, axes, channel, z, t)
    raise InputError(f"cannot segment a {type(source).__name__}: pass a path, a numpy or dask "
                     "array, or a zarr array or group")


def _default_axes(shape) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and shape[-1] in (1, 3):
        return "YXS"
    raise InputError(f"an array of shape {tuple(shape)} needs --axes (e.g. CYX)")


def _from_group(group, path, axes, channel, z, t) -> ImageSource:
    import dask.array as da

    try:
        arrays, meta_axes, pixel = _ome_levels(group)
    except (KeyError, IndexError, TypeError) as err:
        raise InputError(f"{path or 'the zarr group'} is a Zarr group without OME-NGFF "
                         f"multiscales metadata ({err}); pass the array inside it instead") \
            from None
    axes = axes or meta_axes
    levels = tuple(_reduce_axes(da.from_zarr(a), axes, channel=channel, z=z, t=t)
                   for a in arrays)
    fmt = getattr(group.metadata, "zarr_format", 3)
    return ImageSource(levels[0], levels, kind="ome-zarr", path=path, group=path,
                       zarr_format=fmt, pixel_size=pixel)


def _open_path(path: Path, *, axes, channel, z, t) -> ImageSource:
    import dask.array as da

    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff", ".svs", ".ome.tif", ".btf", ".tf8"):
        import tifffile
        import zarr

        try:
            tif = tifffile.TiffFile(path)
            series = tif.series[0]
            levels = []
            for level in range(len(series.levels)):
                store = series.aszarr(level=level)
                levels.append(da.from_zarr(zarr.open(store, mode="r")))
            ser_axes = series.axes
        except Exception as err:  # a parser meeting a broken file raises many types
            raise InputError(f"cannot read {path} as a TIFF ({type(err).__name__}: {err}); is "
                             "the file complete?") from None
        ax = (axes or ser_axes).upper()
        red = tuple(_reduce_axes(lv, ax, channel=channel, z=z, t=t)
                    for lv in levels)
        return ImageSource(red[0], red, kind="tiff", path=path)
    if suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as err:  # a parser meeting a broken file raises many types
            raise InputError(f"cannot read {path} as a .npy array ({type(err).__name__}: "
                             f"{err})") from None
        src = open_image(da.from_array(arr), axes=axes,
                         channel=channel, z=z, t=t)
        return ImageSource(src.array, src.levels, kind="npy", path=path)
    if path.is_dir():
        import zarr

        try:
            node = zarr.open(str(path), mode="r")
        except Exception as err:  # zarr raises several unrelated types for "not a store"
            raise InputError(f"{path} is a folder but not a Zarr store ({type(err).__name__}: "
                             f"{err})") from None
        if isinstance(node, zarr.Array):
            red = _reduce_axes(da.from_zarr(node), axes or _default_axes(node.shape),
                               channel=channel, z=z, t=t)
            return ImageSource(red, (red,), kind="zarr", path=path)
        return _from_group(node, path, axes, channel, z, t)
    from cellmask.io import read_image

    arr = read_image(path)
    src = open_image(arr, axes=axes, channel=channel, z=z, t=t)
    return ImageSource(src.array, src.levels, kind="image", path=path)
