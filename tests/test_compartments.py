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
