"""The shipped model on real images: it must find the nuclei, not merely run."""

import numpy as np
import pytest

from cellmask import InputError
from cellmask.metrics import Evaluation
from cellmask.samples import load_sample
from fixtures import FIXTURES, load_fixture

# Lower bounds of AP@0.5 per image, set below what the shipped model measures (model card)
# so that a real regression fails while a change of thread count does not.
MIN_AP50 = {"fluo_29dd28df98ee": 0.80, "fluo_e23e11414ee6": 0.70, "histo_0e4c2e2780de": 0.45}


def ap(gt, pred, t=0.5):
    ev = Evaluation(thresholds=(t,))
    ev.add(gt, pred)
    return ev.table()["ap"][0]


@pytest.mark.parametrize("name", FIXTURES)
def test_finds_the_nuclei_of_real_images(shipped_model, name):
    image, truth = load_fixture(name)
    labels = shipped_model.segment(image)
    assert labels.shape == truth.shape and labels.dtype == np.int32
    assert ap(truth, labels) >= MIN_AP50[name]


def test_stardist_sample(shipped_model):
    image, truth = load_sample()
    labels = shipped_model.segment(image)
    assert ap(truth, labels) >= 0.80
    assert ap(truth, labels, 0.75) >= 0.45
    assert sorted(np.unique(labels))[1:] == list(range(1, labels.max() + 1))  # ids 1..N


def test_scale_brings_large_objects_to_the_trained_size(shipped_model):
    image, truth = load_sample()
    big = np.kron(image, np.ones((2, 2), image.dtype))
    big_truth = np.kron(truth, np.ones((2, 2), truth.dtype))
    labels = shipped_model.segment(big, scale=0.5)
    assert labels.shape == big.shape
    assert ap(big_truth, labels) >= 0.75
    same = shipped_model.segment(big, diameter=2 * shipped_model.trained_diameter)
    assert np.array_equal(labels, same)


def test_tiled_equals_whole_image(shipped_model):
    image, _ = load_fixture("fluo_e23e11414ee6")
    whole = shipped_model.segment(image, tile=2048)
    tiled = shipped_model.segment(image, tile=160, halo=64)
    assert abs(int(whole.max()) - int(tiled.max())) <= 2
    assert ap(whole, tiled, 0.5) >= 0.97


def test_input_forms_and_dtypes(shipped_model):
    image, _ = load_sample()
    ref = shipped_model.segment(image)
    assert np.array_equal(shipped_model.segment(image[..., None]), ref)
    as_float = shipped_model.segment(image.astype(np.float64) / 7.0)
    assert ap(ref, as_float) > 0.95  # percentile normalisation: scale-free
    rgb = np.repeat(image[..., None], 3, axis=-1)
    assert ap(ref, shipped_model.segment(rgb)) > 0.95
    assert shipped_model.segment(image > np.percentile(image, 80)).max() > 20  # bool: 0/1 image
    assert shipped_model.segment(np.full((64, 64), 7, np.uint16)).max() == 0  # constant: nothing
    assert shipped_model.segment(np.zeros((1, 1), np.uint8)).shape == (1, 1)


@pytest.mark.parametrize("bad,message", [
    (np.full((32, 32), np.nan, np.float32), "NaN or infinite"),
    (np.zeros((0, 10)), "empty"),
    (np.zeros((2, 3, 16, 16)), "not \\(H, W\\)"),
    (np.zeros((16, 16, 4), np.uint8), "4 channels"),
    (np.array([["a"]]), "not numeric"),
])
def test_bad_input_is_a_clear_error(shipped_model, bad, message):
    with pytest.raises(InputError, match=message):
        shipped_model.segment(bad)


def test_bad_scale(shipped_model):
    image = np.zeros((16, 16), np.uint8)
    for kwargs in ({"scale": 0}, {"scale": float("nan")}, {"diameter": -3},
                   {"scale": 1.0, "diameter": 20}):
        with pytest.raises(InputError):
            shipped_model.segment(image, **kwargs)


def test_a_tiny_first_image_does_not_break_later_ones():
    """RoI pooling scales are fixed at construction, not inferred from the first image."""
    import cellmask

    model = cellmask.load_model(device="cpu")
    assert model.segment(np.zeros((1, 1), np.uint8)).max() == 0
    image, truth = load_sample()
    assert ap(truth, model.segment(image)) >= 0.8
