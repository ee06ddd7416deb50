import numpy as np
import pandas as pd
import pytest
from skimage.measure import regionprops_table

from cellmask.measure import measure
from fixtures import load_fixture


def test_equals_regionprops_table():
    image, labels = load_fixture("fluo_29dd28df98ee")
    table = measure(labels, image)
    ref = pd.DataFrame(regionprops_table(labels, image.astype(float),
                                         properties=("label", "area", "centroid", "bbox",
                                                     "intensity_mean", "solidity")))
    assert len(table) == labels.max()
    for col in ref.columns:
        assert np.allclose(table[col], ref[col]), col
    sums = [image[labels == i].sum() for i in table["label"]]
    assert np.allclose(table["intensity_sum"], sums)


def test_rgb_channels_and_shape_only():
    image, labels = load_fixture("histo_0e4c2e2780de")
    table = measure(labels, image)
    assert {"intensity_mean-0", "intensity_mean-2", "intensity_sum-1"} <= set(table.columns)
    shape_only = measure(labels)
    assert "intensity_mean" not in shape_only.columns and len(shape_only) == len(table)


def test_bad_labels():
    with pytest.raises(ValueError, match="integer"):
        measure(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="differ in size"):
        measure(np.zeros((4, 4), np.int32), np.zeros((5, 4)))
