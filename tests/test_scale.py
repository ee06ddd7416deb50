"""Physical scale: pixel sizes read from every format, the run rescaled to the model's."""

import numpy as np
import pytest
import tifffile
import zarr
from fixtures import load_fixture
from skimage.transform import rescale

import cellmask
from cellmask.metrics import iou_matrix, matched_ious
from cellmask.model.segmenter import resolve_scale
from cellmask.normalize import InputError
from cellmask.sources import open_image


def _ngff(path, image, scale, unit, version="0.5"):
    fmt = 3 if version == "0.5" else 2
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    root.create_array("0", data=image, chunks=(64, 64))
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    if unit:
        for a in axes:
            a["unit"] = unit
    ms = [{"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [scale, scale]}]}]}]
    if fmt == 3:
        root.attrs["ome"] = {"version": "0.5", "multiscales": ms}
    else:
        ms[0]["version"] = "0.4"
        root.attrs["multiscales"] = ms
    return path


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("scale, unit, expected", [
    (0.325, "micrometer", 0.325), (250.0, "nanometer", 0.25), (0.0005, "millimeter", 0.5),
    (0.5, None, None)])
def test_ome_zarr_pixel_size_with_units(tmp_path, version, scale, unit, expected):
    image = np.zeros((64, 64), np.uint8)
    src = open_image(_ngff(tmp_path / "a.ome.zarr", image, scale, unit, version))
    if expected is None:  # a scale without a unit is not a physical size
        assert src.pixel_size_um is None
    else:
        assert src.pixel_size_um == pytest.approx((expected, expected))


def test_ome_tiff_physical_size(tmp_path):
    path = tmp_path / "a.ome.tif"
    tifffile.imwrite(path, np.zeros((32, 48), np.uint16), ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.6,
                               "PhysicalSizeXUnit": "\u00b5m", "PhysicalSizeYUnit": "\u00b5m"})
    assert open_image(path).pixel_size_um == pytest.approx((0.6, 0.65))


def test_svs_mpp(tmp_path):
    path = tmp_path / "a.svs"
    desc = ("Aperio Image Library v12.0.15\n64x64 [0,0 64x64] (64x64) JPEG/RGB Q=70"
            "|AppMag = 40|MPP = 0.2527|Filename = a")
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), description=desc, tile=(64, 64))
    assert open_image(path).pixel_size_um == pytest.approx((0.2527, 0.2527))


@pytest.mark.data
def test_shared_svs_mpp():
    from fixtures import SHARED

    path = SHARED / "cmu1_he_region" / "CMU-1-Small-Region.svs"
    assert open_image(path).pixel_size_um == pytest.approx((0.499, 0.499))


@pytest.mark.parametrize("kwargs, expected", [
    ({"resolution": (20000, 20000), "resolutionunit": "CENTIMETER"}, 0.5),
    ({"resolution": (50800, 50800), "resolutionunit": "INCH"}, 0.5),
    ({"resolution": (72, 72), "resolutionunit": "INCH"}, None),  # a program's default
    ({}, None)])
def test_tiff_resolution_tags(tmp_path, kwargs, expected):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), **kwargs)
    px = open_image(path).pixel_size_um
    assert px == (pytest.approx((expected, expected)) if expected else None)


def test_imagej_micron_unit(tmp_path):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), imagej=True,
                     resolution=(1 / 0.325, 1 / 0.325), metadata={"unit": "micron"})
    assert open_image(path).pixel_size_um == pytest.approx((0.325, 0.325))


def test_resolve_scale_rules(shipped_model):
    model = shipped_model.with_config()
    model.meta["pixel_size_um"] = "0.25"
    assert resolve_scale(model, pixel_size=0.5) == pytest.approx(2.0)
    assert resolve_scale(model, pixel_size=0.26) == 1.0  # within 5%: not resampled
    assert resolve_scale(model, scale=0.5, pixel_size=0.5) == 0.5  # scale given wins
    assert resolve_scale(model, diameter=model.trained_diameter * 2) == pytest.approx(0.5)
    assert resolve_scale(shipped_model, pixel_size=0.5) == 1.0  # model without pixel size
    with pytest.raises(InputError, match="rescaling factor"):
        resolve_scale(model, diameter=0.05)
    with pytest.raises(InputError, match="positive"):
        resolve_scale(model, pixel_size=-1)


def test_diameter_and_pixel_size_in_segment_zarr(tmp_path, shipped_model):
    image, _ = load_fixture("fluo_29dd28df98ee")
    with pytest.raises(InputError, match="rescaling factor"):
        cellmask.segment_zarr(image, tmp_path / "x.ome.zarr", model=shipped_model,
                              diameter=0.05, progress=False)
    result = cellmask.segment_zarr(image, tmp_path / "y.ome.zarr", model=shipped_model,
                                   diameter=shipped_model.trained_diameter / 1.5,
                                   pixel_size=0.4, progress=False, measure=False)
    group = zarr.open_group(str(result.path), mode="r")
    assert group.attrs["cellmask"]["scale"] == pytest.approx(1.5)
    ms = group.attrs["ome"]["multiscales"][0]
    assert ms["axes"][0]["unit"] == "micrometer"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.4, 0.4]
    assert result.labels.shape == image.shape  # level-0 resolution of the input


@pytest.mark.parametrize("name", ["fluo_e23e11414ee6"])
def test_same_tissue_at_two_pixel_sizes_gives_the_same_nuclei(tmp_path, shipped_model, name):
    """The same image at 0.25 and at 0.5 um/px (antialiased downsampling, the pixel size in the
    OME-TIFF metadata), segmented by a model trained at 0.25 um/px: counts within 3%, and the
    coarse labels, brought back to the fine grid, match the fine ones with mean IoU >= 0.8."""
    model = shipped_model.with_config()
    model.meta["pixel_size_um"] = "0.25"
    image, _ = load_fixture(name)
    rgb = image.ndim == 3
    coarse = rescale(image.astype(np.float32), 0.5, anti_aliasing=True, preserve_range=True,
                     channel_axis=2 if rgb else None).round().astype(image.dtype)
    labels = []
    for px, im in ((0.25, image), (0.5, coarse)):
        path = tmp_path / f"{px}.ome.tif"
        meta = {"axes": "YXS" if rgb else "YX", "PhysicalSizeX": px, "PhysicalSizeY": px}
        tifffile.imwrite(path, im, ome=True, photometric="rgb" if rgb else "minisblack",
                         metadata=meta)
        result = cellmask.segment_zarr(path, tmp_path / f"{px}.ome.zarr", model=model,
                                       progress=False, measure=False)
        attrs = zarr.open_group(str(result.path), mode="r").attrs["cellmask"]
        assert attrs["scale"] == pytest.approx(px / 0.25)
        labels.append(np.asarray(result.labels))
    fine, rough = labels
    assert rough.shape == coarse.shape[:2]
    n_fine, n_rough = len(np.unique(fine)) - 1, len(np.unique(rough)) - 1
    assert abs(n_fine - n_rough) <= 0.03 * n_fine
    back = np.kron(rough, np.ones((2, 2), rough.dtype))[:fine.shape[0], :fine.shape[1]]
    ious = matched_ious(iou_matrix(fine, back), 0.5)
    assert len(ious) >= 0.9 * n_fine
    assert ious.mean() >= 0.8


def _ngff_pyramid(path, levels, pixel):
    """An NGFF 0.5 image whose level k is ``levels[k]`` at ``pixel * 2**k`` um."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = []
    for k, data in enumerate(levels):
        root.create_array(str(k), data=data, chunks=(128, 128))
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [pixel * 2 ** k] * 2}]})
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes,
                                                            "datasets": datasets}]}
    return path


def test_a_close_pyramid_level_is_read_instead_of_resampling_level_0(tmp_path, shipped_model):
    """A slide at 0.25 um/px with a 2x level, segmented by a model trained at 0.5 um/px:
    the network reads level 1 (the slide's own pixels, no resampling) and the labels are
    written at level 0 with the slide's pixel size; they are the nuclei of level 1 alone,
    brought to level 0."""
    model = shipped_model.with_config()
    model.meta["pixel_size_um"] = "0.5"
    image, _ = load_fixture("fluo_e23e11414ee6")  # 520 x 696
    fine = np.kron(image, np.ones((2, 2), image.dtype))
    slide = _ngff_pyramid(tmp_path / "slide.ome.zarr", [fine, image], 0.25)
    result = cellmask.segment_zarr(slide, tmp_path / "out.ome.zarr", model=model, tile=2048,
                                   progress=False, measure=False)
    attrs = zarr.open_group(str(result.path), mode="r").attrs["cellmask"]
    assert attrs["scale"] == pytest.approx(0.5) and attrs["pyramid_level"] == 1
    labels = np.asarray(result.labels)
    assert labels.shape == fine.shape
    alone = _ngff_pyramid(tmp_path / "level1.ome.zarr", [image], 0.5)
    direct = np.asarray(cellmask.segment_zarr(alone, tmp_path / "l1.ome.zarr", model=model,
                                              progress=False, measure=False).labels)
    n, n_direct = len(np.unique(labels)) - 1, len(np.unique(direct)) - 1
    assert n_direct > 50 and abs(n - n_direct) <= 0.01 * n_direct
    ious = matched_ious(iou_matrix(labels, np.kron(direct, np.ones((2, 2), direct.dtype))), 0.5)
    assert len(ious) >= 0.98 * n_direct and ious.mean() >= 0.9


def test_pyramid_level_choice(tmp_path):
    from cellmask.engine import level_region, pyramid_level, read_window

    image, _ = load_fixture("fluo_e23e11414ee6")
    levels = [np.kron(image, np.ones((4, 4), image.dtype)),
              np.kron(image, np.ones((2, 2), image.dtype)), image]
    src = open_image(_ngff_pyramid(tmp_path / "p.ome.zarr", levels, 0.25))
    assert [pyramid_level(src, s) for s in (1.0, 0.9, 0.6, 0.5, 0.48, 0.3, 0.25, 0.1)] == \
        [0, 0, 0, 1, 1, 1, 2, 2]
    # a level-0 region maps onto the level's pixels that cover it, and reads them
    assert level_region(src, (5, 13, 0, 8), 2) == (1, 4, 0, 2)
    pixels, corrupt = read_window(src, (8, 16, 4, 12), level=2)
    assert corrupt == [] and np.array_equal(pixels[..., 0], image[2:4, 1:3])
