"""Opening images lazily: OME-Zarr (NGFF 0.4 / 0.5), plain Zarr, TIFF / SVS, numpy and dask.

Every source becomes an :class:`ImageSource` whose ``array`` is a dask array ``(Y, X, C)`` with
``C`` in {1, 3}, read chunk by chunk on demand; nothing is loaded whole. Axes come from NGFF
metadata, from the TIFF series, from the array's shape (``(Y, X)`` and ``(Y, X, 3)`` only), or
from an explicit ``axes`` string such as ``"CYX"`` or ``"TCZYX"``. Non-spatial axes other than the
channel must be selected (``z=``, ``t=``) when longer than 1; several channels need ``channel=``,
except three RGB samples of a TIFF.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    #: ``(y, x)`` size of a level-0 pixel as the metadata states it, in ``pixel_unit``
    pixel_size: tuple[float, float] | None = None
    #: NGFF name of the unit of ``pixel_size`` ("micrometer", ...), None if the metadata
    #: gives none
    pixel_unit: str | None = None
    description: str = field(default="", compare=False)
    #: Names of the channels of the whole image (OME metadata), before any channel selection
    channel_names: tuple[str, ...] = field(default=(), compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[0]), int(self.array.shape[1])

    @property
    def pixel_size_um(self) -> tuple[float, float] | None:
        """``(y, x)`` pixel size in micrometres, when the metadata states it in a length unit."""
        factor = _UM_PER_UNIT.get((self.pixel_unit or "").lower())
        if self.pixel_size is None or factor is None:
            return None
        return float(self.pixel_size[0] * factor), float(self.pixel_size[1] * factor)

    def with_pixel_size(self, um: float) -> "ImageSource":
        """This source with a pixel size of ``um`` micrometres (overriding the metadata)."""
        return replace(self, pixel_size=(float(um), float(um)), pixel_unit="micrometer")


#: Micrometres per unit, for the length units of NGFF (UDUNITS-2 names) and OME-XML symbols.
_UM_PER_UNIT = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "\u00b5m": 1.0,
                "μm": 1.0, "nanometer": 1e-3, "nm": 1e-3, "millimeter": 1e3, "mm": 1e3,
                "centimeter": 1e4, "cm": 1e4, "meter": 1e6, "m": 1e6, "angstrom": 1e-4,
                "Å": 1e-4, "picometer": 1e-6, "pm": 1e-6}


#: Limits on what an input may claim before anything is allocated for it: metadata is
#: untrusted (a 658-byte Zarr can claim 2^31 x 2^31 pixels), and opening costs memory per chunk.
#: The largest whole-slide images are about 2 x 10^10 pixels in 10^5 to 10^6 chunks.
MAX_PIXELS = 2 ** 38
MAX_CHUNKS = 2 ** 24
MAX_CHUNK_BYTES = 2 ** 31
MAX_DIMS = 6


def check_claimed(shape, chunks, dtype, where: str) -> None:
    """Refuse, before any allocation, an array whose stated size, chunk count or chunk size
    is beyond what any image needs (see :data:`MAX_PIXELS`)."""
    try:
        shape = tuple(int(v) for v in shape)
        chunks = tuple(int(v) for v in chunks)
        itemsize = np.dtype(dtype).itemsize
    except (TypeError, ValueError) as err:
        raise InputError(f"{where} has unreadable array metadata ({err})") from None
    if not 1 <= len(shape) <= MAX_DIMS or len(chunks) != len(shape):
        raise InputError(f"{where} claims {len(shape)} dimensions with {len(chunks)} chunk "
                         f"sides: not an image cellmask can read")
    if min(shape) < 0 or (shape and min(chunks) < 1):
        raise InputError(f"{where} claims shape {shape} with chunks {chunks}: negative sizes "
                         "or empty chunks")
    total = int(np.prod([max(v, 1) for v in shape], dtype=object))
    if total > MAX_PIXELS * 3 * 16:
        raise InputError(f"{where} claims {total:.3g} values (shape {shape}), beyond any image "
                         f"(limit {MAX_PIXELS:.3g} pixels): its metadata is wrong or damaged")
    n_chunks = int(np.prod([-(-max(v, 1) // c) for v, c in zip(shape, chunks)], dtype=object))
    if n_chunks > MAX_CHUNKS:
        raise InputError(f"{where} claims {n_chunks:.3g} chunks (shape {shape}, chunks "
                         f"{chunks}); cellmask reads at most {MAX_CHUNKS:.3g}: re-save it with "
                         "larger chunks (e.g. 1024 x 1024)")
    chunk_bytes = int(np.prod([min(c, max(v, 1)) for v, c in zip(shape, chunks)],
                              dtype=object)) * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise InputError(f"{where} has chunks of {chunk_bytes / 2 ** 30:.1f} GiB (chunks "
                         f"{chunks}): every read would decode one whole; re-save it tiled "
                         "(e.g. 1024 x 1024 chunks)")


def _from_zarr(node, where: str):
    """A dask array over a zarr array, after :func:`check_claimed`."""
    import dask.array as da

    check_claimed(node.shape, node.chunks, node.dtype, where)
    return da.from_zarr(node)


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
    for ax, value in picks.items():
        if value is not None and ax not in axes:
            raise InputError(f"{ax.lower()}={value} was given but the image has no {ax} axis "
                             f"(axes {axes}): leave out --{ax.lower()}")
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
    if channel == "all":  # every channel, for measuring (cellmask.compartments)
        pass
    elif channel is not None:
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


def _ome_levels(group) -> tuple[list, str, tuple[float, float] | None, str | None]:
    """Level arrays, axes, level-0 ``(y, x)`` scale and its unit of an NGFF image group."""
    attrs = group.attrs.asdict()
    meta = attrs.get("ome", attrs)
    ms = meta["multiscales"][0]
    axes_meta = ms.get("axes", [])
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in axes_meta).upper()
    arrays = [group[d["path"]] for d in ms["datasets"]]
    pixel = unit = None
    global_scale = [1.0] * len(axes)
    for tr in ms.get("coordinateTransformations", []) or []:  # multiscale-wide, applied after
        if tr.get("type") == "scale" and len(tr.get("scale", [])) == len(axes):
            global_scale = [float(v) for v in tr["scale"]]
    for tr in ms["datasets"][0].get("coordinateTransformations", []):
        if tr.get("type") == "scale" and axes:
            s = tr["scale"]
            iy, ix = axes.index("Y"), axes.index("X")
            pixel = (float(s[iy]) * global_scale[iy], float(s[ix]) * global_scale[ix])
            units = {a.get("unit") for a in axes_meta if isinstance(a, dict)
                     and a.get("name", "").upper() in "YX"}
            unit = units.pop() if len(units) == 1 else None
    if not axes:  # NGFF 0.3 and older: TCZYX implied by the number of dimensions
        axes = "TCZYX"[-arrays[0].ndim:]
    return arrays, axes, pixel, unit


def tiff_pixel_size(tif) -> tuple[tuple[float, float], str] | None:
    """Level-0 ``((y, x), unit)`` pixel size of an open ``tifffile.TiffFile``: OME-XML
    ``PhysicalSizeY/X`` (with their units), the Aperio SVS ``MPP``, ImageJ's unit with the
    resolution tags, or the resolution tags in inch / centimetre (not the 72 or 96 dpi that
    image programs write by default); None when the file states none."""
    page = tif.pages[0]
    if tif.is_ome and tif.ome_metadata:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            root = None
        pixels = None if root is None else next(
            (el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
        if pixels is not None and pixels.get("PhysicalSizeX"):
            x = float(pixels.get("PhysicalSizeX"))
            y = float(pixels.get("PhysicalSizeY", x))
            unit = pixels.get("PhysicalSizeXUnit", "µm")  # the OME default
            if x > 0 and y > 0:
                return (y, x), unit
    if tif.is_svs:  # Aperio: "... |MPP = 0.4990|..." in the first page's description
        import re

        found = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
        try:
            mpp = float(found.group(1)) if found else 0.0
        except ValueError:
            mpp = 0.0
        if mpp > 0:
            return (mpp, mpp), "micrometer"
    tags = page.tags
    if "XResolution" not in tags:
        return None
    xres, yres = tags["XResolution"].value, tags.get("YResolution", tags["XResolution"]).value
    px = xres[0] / xres[1] if xres[1] else 0.0  # pixels per unit
    py = yres[0] / yres[1] if yres[1] else 0.0
    if px <= 0 or py <= 0:
        return None
    ij = tif.imagej_metadata or {}
    if ij.get("unit") in ("micron", "um", "µm", "\u00B5m"):
        return (1.0 / py, 1.0 / px), "micrometer"
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if unit == 2 and round(px) not in (72, 96, 300):  # inch, not a program's default
        return (25400.0 / py, 25400.0 / px), "micrometer"
    if unit == 3:  # centimetre
        return (10000.0 / py, 10000.0 / px), "micrometer"
    return None


def _ome_channel_names(tif) -> tuple[str, ...]:
    """``Channel Name`` attributes of an OME-TIFF's first image, in order; () if none."""
    if not (tif.is_ome and tif.ome_metadata):
        return ()
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return ()
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return ()
    channels = [el for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel"]
    return tuple(el.get("Name") or f"ch{k}" for k, el in enumerate(channels))


def channel_labels(src: "ImageSource") -> list[str]:
    """A name per channel of ``src``: its OME names, "R", "G", "B" for colour, else ch0, ch1..."""
    n = int(src.array.shape[2])
    if len(src.channel_names) == n:
        return [_safe_name(v) for v in src.channel_names]
    if n == 3 and src.kind in ("tiff", "image", "numpy", "npy", "dask", "array"):
        return ["R", "G", "B"]
    return [f"ch{k}" for k in range(n)]


def _safe_name(name: str) -> str:
    """A channel name usable in a column name (no dots: they separate the parts)."""
    return "".join(ch if ch.isalnum() or ch in "-_+" else "_" for ch in name) or "ch"


def open_image(source: Any, *, axes: str | None = None, channel: int | str | None = None,
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
        red = _reduce_axes(_from_zarr(source, "the zarr array"),
                           axes or _default_axes(source.shape),
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

    try:
        arrays, meta_axes, pixel, unit = _ome_levels(group)
    except (KeyError, IndexError, TypeError) as err:
        raise InputError(f"{path or 'the zarr group'} is a Zarr group without OME-NGFF "
                         f"multiscales metadata ({err}); pass the array inside it instead") \
            from None
    axes = axes or meta_axes
    levels = tuple(_reduce_axes(_from_zarr(a, f"{path or 'the zarr group'}/{a.basename}"), axes,
                                channel=channel, z=z, t=t) for a in arrays)
    fmt = getattr(group.metadata, "zarr_format", 3)
    attrs = group.attrs.asdict()
    omero = attrs.get("ome", attrs).get("omero") or {}
    names = tuple(str(c.get("label", f"ch{k}")) for k, c in enumerate(omero.get("channels", []))
                  if isinstance(c, dict)) if isinstance(omero, dict) else ()
    return ImageSource(levels[0], levels, kind="ome-zarr", path=path, group=path,
                       zarr_format=fmt, pixel_size=pixel, pixel_unit=unit, channel_names=names)


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
                levels.append(_from_zarr(zarr.open(store, mode="r"), f"{path} level {level}"))
            ser_axes = series.axes
            physical = tiff_pixel_size(tif)
        except InputError:
            raise
        except Exception as err:  # a parser meeting a broken file raises many types
            raise InputError(f"cannot read {path} as a TIFF ({type(err).__name__}: {err}); is "
                             "the file complete?") from None
        ax = (axes or ser_axes).upper()
        red = tuple(_reduce_axes(lv, ax, channel=channel, z=z, t=t)
                    for lv in levels)
        pixel, unit = physical if physical else (None, None)
        return ImageSource(red[0], red, kind="tiff", path=path, pixel_size=pixel,
                           pixel_unit=unit, channel_names=_ome_channel_names(tif))
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
            red = _reduce_axes(_from_zarr(node, str(path)), axes or _default_axes(node.shape),
                               channel=channel, z=z, t=t)
            return ImageSource(red, (red,), kind="zarr", path=path)
        return _from_group(node, path, axes, channel, z, t)
    from cellmask.io import read_image

    arr = read_image(path)
    src = open_image(arr, axes=axes, channel=channel, z=z, t=t)
    return ImageSource(src.array, src.levels, kind="image", path=path)
