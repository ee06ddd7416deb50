import numpy as np
import pandas as pd
import pytest
from skimage.measure import regionprops_table

from cellmask.measure import INTENSITY_PROPERTIES, SHAPE_PROPERTIES, measure
from fixtures import load_fixture


def _assert_equals_regionprops(labels, image=None):
    table = measure(labels, image)
    props = SHAPE_PROPERTIES + (INTENSITY_PROPERTIES if image is not None else ())
    ref = pd.DataFrame(regionprops_table(labels, None if image is None else image.astype(float),
                                         properties=props))
    assert len(table) == len(ref) and set(ref.columns) <= set(table.columns)
    # orientation is +-pi/2 alike for axis-aligned objects (the sign is rounding noise)
    turn = np.isclose(np.abs(table["orientation"] - ref["orientation"]), np.pi)
    table.loc[turn, "orientation"] = ref["orientation"][turn]
    for col in ref.columns:
        assert np.allclose(table[col], ref[col], rtol=1e-6, atol=1e-6), col
    return table


def test_equals_regionprops_table():
    image, labels = load_fixture("fluo_29dd28df98ee")
    table = _assert_equals_regionprops(labels, image)
    assert len(table) == labels.max()
    sums = [image[labels == i].sum() for i in table["label"]]
    assert np.allclose(table["intensity_sum"], sums)


def test_equals_regionprops_on_awkward_shapes():
    from skimage.draw import ellipse, polygon

    rng = np.random.default_rng(0)
    _assert_equals_regionprops(rng.integers(0, 5, (40, 50)))  # fragmented, multi-part labels
    lines = np.zeros((30, 30), np.int32)
    lines[:, 0] = 2  # a column on the image edge
    lines[5, 5:25] = 7  # a row
    lines[10:12, 10] = 9
    lines[20, 20] = 11  # one pixel
    _assert_equals_regionprops(lines, rng.random((30, 30, 2)))
    shapes = np.zeros((300, 300), np.int32)
    for i in range(40):  # random, overlapping, concave and convex polygons
        rr, cc = polygon(rng.uniform(0, 300, 5), rng.uniform(0, 300, 5), shapes.shape)
        shapes[rr, cc] = i + 1
    rr, cc = ellipse(150, 150, 140, 6, shapes.shape, rotation=0.3)  # 280 rows, thin, tilted
    shapes[rr, cc] = 41
    rr, cc = np.nonzero(rng.random((17, 13)) < 0.3)  # speckles: one label, many parts
    shapes[rr + 5, cc + 250] = 42
    _assert_equals_regionprops(shapes)


def test_rgb_channels_and_shape_only():
    image, labels = load_fixture("histo_0e4c2e2780de")
    table = _assert_equals_regionprops(labels, image)
    assert {"intensity_mean-0", "intensity_mean-2", "intensity_sum-1"} <= set(table.columns)
    shape_only = measure(labels)
    assert "intensity_mean" not in shape_only.columns and len(shape_only) == len(table)


def test_bad_labels():
    with pytest.raises(ValueError, match="integer"):
        measure(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="differ in size"):
        measure(np.zeros((4, 4), np.int32), np.zeros((5, 4)))


def test_lockstep_convex_areas_equal_skimage_hulls():
    from skimage.draw import ellipse, polygon
    from skimage.morphology import convex_hull_image

    from cellmask.measure import _convex_areas

    rng = np.random.default_rng(3)
    labels = np.zeros((400, 400), np.int32)
    for i in range(120):  # polygons, ellipses and speckles from 1 to 200 rows tall
        kind = i % 3
        if kind == 0:
            rr, cc = polygon(rng.uniform(0, 400, 6), rng.uniform(0, 400, 6), labels.shape)
        elif kind == 1:
            rr, cc = ellipse(rng.uniform(0, 400), rng.uniform(0, 400), rng.uniform(0.5, 100),
                             rng.uniform(0.5, 30), labels.shape, rotation=rng.uniform(0, 3))
        else:
            rr, cc = np.nonzero(rng.random((rng.integers(1, 25), rng.integers(1, 25))) < 0.3)
            rr, cc = rr + rng.integers(0, 370), cc + rng.integers(0, 370)
        labels[rr, cc] = i + 1
    ids = np.unique(labels)[1:]
    order = np.argsort(labels.ravel(), kind="stable")
    order = order[labels.ravel()[order] > 0]
    group = np.searchsorted(ids, labels.ravel()[order])
    rows, cols = order // labels.shape[1], order % labels.shape[1]
    bbox = tuple(np.array(v) for v in zip(*[(rows[group == k].min(), cols[group == k].min(),
                                              rows[group == k].max() + 1,
                                              cols[group == k].max() + 1)
                                             for k in range(len(ids))]))
    want = [np.count_nonzero(convex_hull_image(labels[r0:r1, c0:c1] == v))
            for v, r0, c0, r1, c1 in zip(ids, *bbox)]
    for lockstep_min in (0, 10**9):  # every class in lockstep; every object by skimage
        got = _convex_areas(group, rows, cols, len(ids), bbox, lockstep_min=lockstep_min)
        assert got.tolist() == want


def test_out_of_core_measurements_in_bounded_hull_passes(tmp_path, monkeypatch):
    """Whole-image measurements read region by region, in parallel threads and with the
    convex hulls found in several bounded passes, equal the in-memory table of the labels."""
    import importlib

    import cellmask
    from test_pipeline import _tiny_model, oracle

    measure_mod = importlib.import_module("cellmask.measure")  # the package's name is a function

    calls = []
    real = measure_mod._all_convex_areas
    monkeypatch.setattr(measure_mod, "HULL_PASS_PIXELS", 3000)
    monkeypatch.setattr(measure_mod, "_all_convex_areas",
                        lambda hulls: calls.append(len(hulls)) or real(hulls))
    image, truth = load_fixture("fluo_e23e11414ee6")
    result = cellmask.segment_zarr(image, tmp_path / "o.ome.zarr", tile=128, halo=48,
                                   detector=oracle(truth), model=_tiny_model(), progress=False)
    assert len(calls) > 2  # several passes, each over one or more regions
    ref = measure(np.asarray(result.labels), image)
    for col in ("label", "area", "solidity", "perimeter", "eccentricity", "intensity_mean"):
        assert np.allclose(result.table[col], ref[col], atol=1e-9), col
