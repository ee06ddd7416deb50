"""The int8 path: calibration stored in the weights file, same objects as float32, the process's
quantised engine untouched, thread copies identical to the model they copy."""

import numpy as np
import pytest
import torch
from fixtures import load_fixture

import cellmask
from cellmask.errors import WeightsError
from cellmask.metrics import Evaluation
from cellmask.model.quantize import PREFIX, int8_supported
from cellmask.model.segmenter import Model, auto_precision
from cellmask.model.weights import load_weights, save_weights
from cellmask.normalize import InputError
from cellmask.train.calibrate import calibrate_model

pytestmark = pytest.mark.skipif(not int8_supported(), reason="no oneDNN quantised kernels")


@pytest.fixture(scope="module")
def int8_model():
    return cellmask.load_model(device="cpu", precision="int8")


def _agreement(a: np.ndarray, b: np.ndarray, iou: float) -> float:
    ev = Evaluation(thresholds=(iou,))
    ev.add(a, b)
    return float(ev.table()["ap"][0])


def test_shipped_weights_carry_a_calibration_and_auto_uses_it_without_half_precision():
    state, _, meta = load_weights(cellmask.model.registry.resolve("nuclei"))
    assert sum(k.startswith(PREFIX) for k in state) > 100 and "int8_calibration" in meta
    cpu = torch.device("cpu")
    assert auto_precision(cpu, calibrated=False) in ("fp32", "mixed")
    assert auto_precision(cpu, calibrated=True) in ("int8", "mixed")  # mixed: native bf16


def test_int8_finds_the_objects_of_fp32_on_real_nuclei(int8_model):
    fp32 = cellmask.load_model(device="cpu", precision="fp32")
    for name in ("fluo_29dd28df98ee", "fluo_e23e11414ee6"):
        image, truth = load_fixture(name)
        a, b = fp32.segment(image), int8_model.segment(image)
        assert b.max() > 20
        assert _agreement(a, b, 0.5) >= 0.93  # the same nuclei
        acc = [Evaluation(thresholds=(0.5,)) for _ in range(2)]
        acc[0].add(truth, a)
        acc[1].add(truth, b)
        assert acc[1].table()["ap"][0] >= acc[0].table()["ap"][0] - 0.03  # no accuracy lost
    # the calibration changes the arithmetic: the digest that run fingerprints use covers it
    uncalibrated = Model(int8_model.net, int8_model.config, precision="fp32")
    assert uncalibrated.weights_digest != int8_model.weights_digest


def test_loading_int8_leaves_the_quantised_engine_as_it_was():
    before = torch.backends.quantized.engine
    cellmask.load_model(device="cpu", precision="int8")
    assert torch.backends.quantized.engine == before


def test_thread_copies_compute_what_the_model_computes(int8_model):
    from cellmask.workers import pass_threads

    image, _ = load_fixture("fluo_e23e11414ee6")
    total = torch.get_num_threads()
    torch.set_num_threads(pass_threads(2))  # the threads each of two copies gets: int8
    try:                                    # kernels round by thread count on some CPUs
        one = int8_model.segment(image, tile=256, workers=1)
    finally:
        torch.set_num_threads(total)
    two = int8_model.segment(image, tile=256, workers=2)  # two copies, built while others run
    assert one.max() > 20 and np.array_equal(one, two)


@pytest.mark.parametrize("trunk_part", ["trunk", "backbone"])
def test_calibrate_writes_ranges_that_load_and_refuses_test_splits(dataset_dir, tmp_path,
                                                                  trunk_part):
    """Calibrated with the FPN ("backbone") or without it, the file holds the ranges of the
    parts it quantises, and its int8 network finds the nuclei float32 finds."""
    from cellmask.model.quantize import Int8Backbone, Int8Trunk

    out = tmp_path / "calibrated.safetensors"
    with pytest.raises(InputError, match="training split"):
        calibrate_model("nuclei", dataset_dir, "splits/test.txt", out)
    path, record = calibrate_model("nuclei", dataset_dir, "splits/train.txt", out, images=2,
                                   trunk_part=trunk_part)
    assert record["images"] == 2 and record["tensors"] > 100
    state, _, _ = load_weights(path)
    parts = {k[len(PREFIX):].split(".")[0] for k in state if k.startswith(PREFIX)}
    assert parts == {trunk_part, "rpn_head", "mask_head"}
    model = cellmask.load_model(path, device="cpu", precision="int8")
    backbone = model.runner.backbone
    if trunk_part == "backbone":
        assert isinstance(backbone.body, Int8Backbone)
        assert isinstance(backbone.fpn, torch.nn.Identity)
    else:
        assert isinstance(backbone.body, Int8Trunk)
        assert not isinstance(backbone.fpn, torch.nn.Identity)
    image, _ = load_fixture("fluo_29dd28df98ee")
    found = model.segment(image)
    assert found.max() > 20
    fp32 = cellmask.load_model(path, device="cpu", precision="fp32").segment(image)
    assert _agreement(fp32, found, 0.5) >= 0.93


def test_broken_or_missing_calibration_is_refused(tmp_path):
    state, config, meta = load_weights(cellmask.model.registry.resolve("nuclei"))
    net_only = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    model = cellmask.load_model(device="cpu", precision="fp32")
    with pytest.raises(InputError, match="calibrate"):
        Model(model.net, model.config, precision="int8")
    key = next(k for k in state if k.startswith(PREFIX) and k.endswith(".min_val"))
    for bad in ({**net_only, key: state[key]},  # most of the ranges missing
                {**state, key: torch.full_like(state[key], float("nan"))},
                {**state, key: torch.zeros(10)}):
        path = save_weights(tmp_path / "bad.safetensors", bad, config,
                            {k: v for k, v in meta.items() if k not in ("format", "config")})
        with pytest.raises(WeightsError, match="calibration"):
            cellmask.load_model(path, device="cpu", precision="int8")


def test_stored_ranges_give_the_network_the_histograms_give(tmp_path):
    """A calibration stores each observer's searched range (fast to load); one that holds the
    histograms (as files written before) gives the identical int8 network."""
    from cellmask.model.quantize import calibrate

    fp32 = cellmask.load_model(device="cpu", precision="fp32")
    image, _ = load_fixture("fluo_29dd28df98ee")
    found = {}
    for histograms in (False, True):
        tensors = calibrate(fp32.runner, lambda: fp32.segment(image, workers=1), "backbone",
                            histograms=histograms)
        assert any(k.endswith(".histogram") for k in tensors) == histograms
        path = save_weights(tmp_path / f"h{histograms}.safetensors",
                            {**fp32.net.state_dict(), **tensors}, fp32.config, {})
        found[histograms] = cellmask.load_model(path, device="cpu",
                                                precision="int8").segment(image, workers=1)
    assert found[False].max() > 20 and np.array_equal(found[False], found[True])
