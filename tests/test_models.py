"""Shipped models, their descriptions and licences; training on several data sets."""

import dataclasses
import logging
import subprocess
import sys

import numpy as np
import pytest

import cellmask
from cellmask.config import TrainConfig
from cellmask.model.registry import MODELS, is_non_commercial, list_models
from cellmask.model.weights import load_weights, read_header, save_weights
from cellmask.train.data import CropSampler, load_samples
from cellmask.train.export import check_card
from cellmask.train.loop import training_samples


def test_every_listed_model_states_what_it_is():
    infos = list_models()
    assert "nuclei" in [i.name for i in infos]
    for info in infos:
        assert info.name in MODELS
        for field in ("modality", "training_data", "licence", "accuracy"):
            assert getattr(info, field) != "not stated", (info.name, field)
    default = next(i for i in infos if i.name == "nuclei")
    assert not default.non_commercial  # the permissive default never carries NC data


def test_non_commercial_models_ship_as_their_own_file():
    for info in list_models():
        if info.non_commercial:
            assert info.name != "nuclei" and info.path.name != MODELS["nuclei"]
            meta = read_header(info.path)["__metadata__"]
            assert is_non_commercial(meta["licence"])


def test_models_command_lists_modality_and_licence():
    r = subprocess.run([sys.executable, "-m", "cellmask", "models"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "nuclei:" in r.stdout and "licence:" in r.stdout and "modality:" in r.stdout


def test_loading_a_non_commercial_model_says_so(tmp_path, caplog):
    state, config, meta = load_weights(cellmask.model.registry.resolve("nuclei"))
    path = save_weights(tmp_path / "nc.safetensors", state, config,
                        {**{k: v for k, v in meta.items() if k not in ("format", "config")},
                         "licence": "CC BY-NC-SA 4.0", "pixel_size_um": "0.2527"})
    with caplog.at_level(logging.WARNING, logger="cellmask"):
        model = cellmask.load_model(path, device="cpu")
    lines = [r.getMessage() for r in caplog.records if "non-commercial" in r.getMessage()]
    assert len(lines) == 1 and "CC BY-NC-SA 4.0" in lines[0]
    assert model.pixel_size == pytest.approx(0.2527)


def test_card_keys_are_checked():
    assert check_card({"pixel_size_um": "0.25", "licence": "CC0"})["pixel_size_um"] == "0.25"
    with pytest.raises(ValueError, match="keys"):
        check_card({"colour": "blue"})
    with pytest.raises(ValueError, match="number"):
        check_card({"pixel_size_um": "fine"})


def test_extra_data_sets_get_their_share_of_the_crops(dataset_dir):
    cfg = TrainConfig(data=str(dataset_dir), split="splits/val.txt",
                      more_data=((str(dataset_dir), "splits/train.txt", 0.75),))
    samples, weights = training_samples(cfg, (1.0, 99.8))
    n_main = len(load_samples(dataset_dir, "splits/val.txt"))
    assert len(samples) == n_main + 3
    assert sum(weights[:n_main]) == pytest.approx(0.25)
    assert sum(weights[n_main:]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shares"):
        training_samples(TrainConfig(data=str(dataset_dir), split="splits/val.txt",
                                     more_data=((str(dataset_dir), "splits/train.txt", 1.0),)),
                         (1.0, 99.8))


def test_brightfield_samples_are_stain_separated_and_jittered(dataset_dir):
    """Training sees what inference sees: the H&E fixture as its nuclear-stain channel, with
    the second stain kept for jitter; batches stay deterministic per step."""
    samples = load_samples(dataset_dir, "splits/train.txt")
    histo = next(s for s in samples if s.name.startswith("histo"))
    fluo = next(s for s in samples if s.name.startswith("fluo"))
    assert histo.stain is not None and histo.stain.shape == histo.labels.shape
    assert fluo.stain is None
    assert np.array_equal(histo.image[0], histo.image[1])  # one signal, replicated
    sampler = CropSampler([histo], 128, (1.0, 1.0), seed=0)
    a, _ = sampler.batch(3, 2)
    b, _ = sampler.batch(3, 2)
    assert all(x.shape == (3, 128, 128) and (x == y).all() for x, y in zip(a, b))


def test_fine_tuned_weights_keep_what_the_model_is(dataset_dir, tmp_path):
    """Fine-tuning (and resuming) carries the initial model's licence and pixel size into the
    new file: weights fine-tuned from a non-commercial model stay marked as such."""
    from cellmask.train.loop import train

    state, config, meta = load_weights(cellmask.model.registry.resolve("nuclei"))
    init = save_weights(tmp_path / "nc.safetensors", state, config,
                        {"licence": "CC BY-NC-SA 4.0", "pixel_size_um": "0.2527"})
    cfg = TrainConfig(data=str(dataset_dir), split="splits/train.txt", out=str(tmp_path / "ft"),
                      iterations=1, batch_size=1, crop=64, warmup=1)
    out = train(cfg, init=str(init), progress=False)
    tuned = read_header(out)["__metadata__"]
    assert tuned["licence"] == "CC BY-NC-SA 4.0" and tuned["pixel_size_um"] == "0.2527"
    resumed = train(dataclasses.replace(cfg, iterations=2), resume=True, progress=False)
    assert read_header(resumed)["__metadata__"]["licence"] == "CC BY-NC-SA 4.0"
