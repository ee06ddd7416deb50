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
