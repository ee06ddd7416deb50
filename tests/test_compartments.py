"""Cells grown from nuclei, across tiles, and every channel measured per compartment."""

import numpy as np
import pytest
import tifffile
import zarr
from skimage.measure import regionprops_table

import cellmask
from cellmask.compartments import grow_cells
from fixtures import load_fixture
from test_pipeline import _tiny_model, oracle


def _two_channels():
    image, truth = load_fixture("fluo_e23e11414ee6")
    marker = (image[::-1, ::-1].astype(np.uint16) * 3 + 7).astype(np.uint16)
    return np.stack([image.astype(np.uint16), marker]), truth  # (C, Y, X)


def _run(tmp_path, name, tile, **kw):
    image, truth = _two_channels()
    return cellmask.segment_zarr(image, tmp_path / name, axes="CYX", channel=0, tile=tile,
                                 halo=48, detector=oracle(truth), model=_tiny_model(),
                                 progress=False, pixel_size=0.5, **kw)


def test_cells_across_tiles_equal_the_whole_image(tmp_path):
    _run(tmp_path, "tiled.zarr", 128, cell_expansion=3.0)
    whole = _run(tmp_path, "whole.zarr", 1024, cell_expansion=3.0)
    for suffix in ("cells", "cytoplasm"):
        a = zarr.open_array(str(tmp_path / f"tiled.zarr/labels/cellmask_{suffix}/0"))[:]
        b = zarr.open_array(str(tmp_path / f"whole.zarr/labels/cellmask_{suffix}/0"))[:]
        assert np.array_equal(a, b), suffix
    nuclei = np.asarray(whole.labels)
    cells = zarr.open_array(str(tmp_path / "whole.zarr/labels/cellmask_cells/0"))[:]
    assert np.array_equal(cells, grow_cells(nuclei, 6.0))  # 3 um at 0.5 um/px
    assert np.array_equal(cells[nuclei > 0], nuclei[nuclei > 0])  # a nucleus stays its cell's
    assert (cells > 0).sum() > 1.3 * (nuclei > 0).sum()
    names = zarr.open_group(str(tmp_path / "whole.zarr/labels")).attrs["ome"]["labels"]
    assert names == ["cellmask", "cellmask_cells", "cellmask_cytoplasm"]


def test_every_channel_and_compartment_equals_regionprops(tmp_path):
    result = _run(tmp_path, "o.zarr", 128, cell_expansion=3.0)
    table = result.compartments
    image, _ = _two_channels()
    pixels = np.moveaxis(image, 0, -1).astype(np.float64)
    nuclei = np.asarray(result.labels)
    cells = grow_cells(nuclei, 6.0)
    compartments = {"nucleus": nuclei, "cell": cells, "cytoplasm": np.where(nuclei, 0, cells)}
    props = ["label", "area", "perimeter", "eccentricity", "solidity", "axis_major_length",
             "axis_minor_length", "centroid", "intensity_mean", "intensity_min",
             "intensity_max", "intensity_std"]
    assert len(table) == nuclei.max()
    for comp, labels in compartments.items():
        ref = regionprops_table(labels, pixels, properties=props)
        rows = table.set_index("label").loc[ref["label"]]
        for ours, theirs in (("area", "area"), ("perimeter", "perimeter"),
                             ("eccentricity", "eccentricity"), ("solidity", "solidity"),
                             ("axis_major_length", "axis_major_length"),
                             ("centroid_y", "centroid-0"), ("centroid_x", "centroid-1"),
                             ("mean.ch1", "intensity_mean-1"), ("min.ch0", "intensity_min-0"),
                             ("max.ch1", "intensity_max-1"), ("std.ch1", "intensity_std-1")):
            np.testing.assert_allclose(rows[f"{comp}.{ours}"], ref[theirs], rtol=1e-6,
                                       atol=1e-6, err_msg=f"{comp}.{ours}")
        np.testing.assert_allclose(rows[f"{comp}.area_um2"], ref["area"] * 0.25)
        np.testing.assert_allclose(rows[f"{comp}.sum.ch1"], ref["intensity_mean-1"] *
                                   ref["area"], rtol=1e-9)
        for label in ref["label"][:20]:
            want = np.median(pixels[labels == label, 1])
            assert rows.loc[label, f"{comp}.median.ch1"] == want


def test_channel_names_from_ome_metadata_and_chosen_measurements(tmp_path):
    image, truth = _two_channels()
    path = tmp_path / "two.ome.tif"
    tifffile.imwrite(path, image, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD45"]},
                                            "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    result = cellmask.segment_zarr(path, tmp_path / "o.zarr", channel=0, tile=256, halo=48,
                                   detector=oracle(truth), model=_tiny_model(), progress=False,
                                   cell_expansion=2.0, measurements=("area", "mean"))
    cols = set(result.compartments.columns)
    assert {"cell.mean.CD45", "nucleus.mean.DAPI", "cytoplasm.area_um2"} <= cols
    assert not any(".median." in c or "perimeter" in c for c in cols)
    saved = (tmp_path / "o.zarr/labels/cellmask/compartments.parquet")
    assert saved.is_file()


def test_cell_expansion_needs_a_pixel_size(tmp_path):
    image, truth = _two_channels()
    with pytest.raises(cellmask.InputError, match="needs the pixel size.*--pixel-size"):
        cellmask.segment_zarr(image, tmp_path / "o.zarr", axes="CYX", channel=0,
                              detector=oracle(truth), model=_tiny_model(), progress=False,
                              cell_expansion=2.0)


def _membrane_image():
    """Real nuclei (channel 0) and a membrane stain (channel 1) drawn on the borders of cells
    grown 8 px from the true nuclei, away from the midlines a plain expansion would draw."""
    from skimage.segmentation import expand_labels, find_boundaries

    image, truth = load_fixture("fluo_e23e11414ee6")
    cells = expand_labels(truth, 8)
    rng = np.random.default_rng(0)
    membrane = 2000 * find_boundaries(cells, mode="inner") + rng.integers(0, 200, truth.shape)
    return np.stack([image.astype(np.uint16), membrane.astype(np.uint16)]), truth


def test_cells_bounded_by_a_membrane_follow_it():
    # two nuclei, the membrane between them far from the midline: a plain expansion splits at
    # the midline, the bounded one on the membrane
    nuclei = np.zeros((40, 60), np.int32)
    nuclei[15:25, 5:15] = 1
    nuclei[15:25, 45:55] = 2
    membrane = np.zeros(nuclei.shape)
    membrane[:, 22] = 100.0  # 7 px right of nucleus 1, 22 px left of nucleus 2 (reach 20)
    plain = grow_cells(nuclei, 20)
    bounded = grow_cells(nuclei, 20, membrane, "membrane")
    assert plain[20, 29] == 1 and plain[20, 31] == 2  # midline at x = 30
    assert (bounded[20, :22] <= 1).all() and (bounded[20, 26:45] == 2).all()
    # a cytoplasm stain: bright inside cells, the dark gap between them is the border
    cytoplasm = np.full(nuclei.shape, 100.0)
    cytoplasm[:, 21:24] = 0.0
    by_cytoplasm = grow_cells(nuclei, 20, cytoplasm, "cytoplasm")
    assert (by_cytoplasm[20, 26:45] == 2).all() and (by_cytoplasm[20, 5:21] == 1).all()
    # never further than the distance from the own nucleus, never over another nucleus
    from scipy import ndimage as ndi

    for cells in (bounded, by_cytoplasm):
        assert np.array_equal(cells[nuclei > 0], nuclei[nuclei > 0])
        for k in (1, 2):
            assert ndi.distance_transform_edt(nuclei != k)[cells == k].max() <= 20


def test_bounded_cells_across_tiles_equal_the_whole_image(tmp_path):
    image, truth = _membrane_image()

    def run(name, tile):
        return cellmask.segment_zarr(image, tmp_path / name, axes="CYX", channel=0, tile=tile,
                                     halo=48, detector=oracle(truth), model=_tiny_model(),
                                     progress=False, pixel_size=0.5, cell_expansion=6.0,
                                     cell_boundary=1)

    run("tiled.zarr", 128)
    whole = run("whole.zarr", 1024)
    cells = {}
    for name in ("tiled.zarr", "whole.zarr"):
        cells[name] = zarr.open_array(str(tmp_path / f"{name}/labels/cellmask_cells/0"))[:]
    assert np.array_equal(cells["tiled.zarr"], cells["whole.zarr"])
    nuclei = np.asarray(whole.labels)
    bounded, plain = cells["whole.zarr"], grow_cells(nuclei, 12.0)
    assert np.array_equal(bounded, grow_cells(nuclei, 12.0, image[1], "membrane"))
    assert (bounded > 0).sum() <= (plain > 0).sum()  # never further than the expansion
    # the membrane, not the distance, decides where neighbours meet: cell borders lie on it
    from skimage.segmentation import find_boundaries

    on_membrane = image[1] >= 2000
    for cells_, share in ((bounded, 0.6), (plain, None)):
        touching = find_boundaries(cells_, mode="inner") & (cells_ > 0) & \
            find_boundaries(np.where(cells_ > 0, cells_, -1), mode="inner")
        inner = touching & ~find_boundaries(cells_ > 0)  # borders between two cells
        if share is not None:
            bounded_share = on_membrane[inner].mean()
        else:
            plain_share = on_membrane[inner].mean()
    assert bounded_share > 0.6 and bounded_share > plain_share + 0.2
    record = zarr.open_group(str(tmp_path / "whole.zarr/labels/cellmask")).attrs["cellmask"]
    boundary = record["cell_boundary"]
    assert (boundary["channel"], boundary["kind"], boundary["name"]) == (1, "membrane", "ch1")
    assert boundary["range"][1] >= 2000  # the whole image's range, not a tile's


def test_cell_boundary_refused_without_expansion_or_with_an_unknown_channel(tmp_path):
    image, truth = _membrane_image()
    kw = dict(axes="CYX", channel=0, detector=oracle(truth), model=_tiny_model(),
              progress=False, pixel_size=0.5)
    with pytest.raises(cellmask.InputError, match="--cell-expansion"):
        cellmask.segment_zarr(image, tmp_path / "a.zarr", cell_boundary=1, **kw)
    with pytest.raises(cellmask.InputError, match="not a channel of the input.*ch0, ch1"):
        cellmask.segment_zarr(image, tmp_path / "b.zarr", cell_expansion=3.0,
                              cell_boundary="CD45", **kw)
    with pytest.raises(cellmask.InputError, match="membrane, cytoplasm"):
        cellmask.segment_zarr(image, tmp_path / "c.zarr", cell_expansion=3.0, cell_boundary=1,
                              cell_boundary_kind="wall", **kw)
