"""Modality, stain separation and tissue detection: decided once per image, recorded."""

import json

import numpy as np
import pytest
import zarr
from fixtures import load_fixture

import cellmask
from cellmask import appearance as appearance_mod
from cellmask.appearance import (RUIFROK_HED, Appearance, decide_modality, estimate,
                                 macenko_stains, optical_density)
from cellmask.normalize import InputError, as_channels_first, sample_pixels
from cellmask.tissue import tissue_mask


def _modality(image):
    return decide_modality(sample_pixels(as_channels_first(image)))[0]


@pytest.mark.parametrize("name, expected", [
    ("fluo_29dd28df98ee", "fluorescence"), ("fluo_e23e11414ee6", "fluorescence"),
    ("histo_0e4c2e2780de", "brightfield"), ("bright_7f3888552158", "brightfield")])
def test_modality_of_real_images(name, expected):
    image, _ = load_fixture(name)
    assert _modality(image) == expected


def test_modality_of_the_shipped_fluorescence_sample():
    from cellmask.samples import load_sample

    image, _ = load_sample()
    assert _modality(image) == "fluorescence"


def test_brightfield_nuclei_become_bright_on_dark():
    """H&E: the hematoxylin channel is high inside the annotated nuclei, low outside; grey
    brightfield is inverted. Fluorescence keeps its polarity."""
    for name in ("histo_0e4c2e2780de", "bright_7f3888552158", "fluo_29dd28df98ee"):
        image, gt = load_fixture(name)
        chw = as_channels_first(image)
        net_input = estimate(sample_pixels(chw)).apply(chw)
        assert net_input.shape == (3,) + gt.shape and net_input.dtype == np.float32
        inside, outside = net_input[0][gt > 0].mean(), net_input[0][gt == 0].mean()
        assert inside > outside + 0.1, name


def test_macenko_recovers_known_stains():
    """A synthetic slide mixed from two known stain vectors gives them back."""
    rng = np.random.default_rng(0)
    h = np.array([0.65, 0.70, 0.29])
    e = np.array([0.07, 0.99, 0.11])
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    conc = rng.uniform(0, 1.2, size=(20000, 2)) * rng.uniform(0, 1, size=(20000, 1))
    od = conc[:, :1] * h + conc[:, 1:] * e
    stains = macenko_stains(od[od.sum(1) > 0.15], alpha=0.1)
    assert stains is not None
    assert np.abs(stains[0] - h).max() < 0.03 and np.abs(stains[1] - e).max() < 0.03
    rgb = 255 * 10 ** (-od)  # Beer-Lambert with 255 glass
    app = estimate(rgb, "brightfield")
    assert app.stain_method == "macenko"
    assert np.abs(np.asarray(app.stains[0]) - h).max() < 0.05


def test_too_little_tissue_falls_back_to_ruifrok():
    glass = np.full((5000, 3), 250.0) + np.random.default_rng(1).normal(0, 0.5, (5000, 3))
    app = estimate(glass, "brightfield")
    assert app.stain_method.startswith("ruifrok")
    expected = np.asarray(RUIFROK_HED[0]) / np.linalg.norm(RUIFROK_HED[0])
    assert np.allclose(app.stains[0], expected, atol=1e-6)


def test_appearance_round_trips_and_refuses_unknown_modality():
    image, _ = load_fixture("histo_0e4c2e2780de")
    app = estimate(sample_pixels(as_channels_first(image)))
    again = Appearance.from_dict(json.loads(json.dumps(app.to_dict())))
    assert again == app
    with pytest.raises(InputError, match="modality"):
        estimate(sample_pixels(as_channels_first(image)), "phase")


def test_second_stain_share_adds_to_hematoxylin_and_is_recorded():
    """With a share w of the second stain the network's signal is h + w * e under the image's
    own stain matrix; w = 0 is hematoxylin alone, and records made without it still match."""
    from cellmask.appearance import concentrations

    image, _ = load_fixture("histo_0e4c2e2780de")
    chw = as_channels_first(image)
    sample = sample_pixels(chw)
    plain, mixed = estimate(sample), estimate(sample, second_stain=0.5)
    assert plain.stains == mixed.stains and mixed.second_stain == 0.5
    conc = concentrations(chw, np.asarray(mixed.stains), np.asarray(mixed.background), n=2)
    signal = conc[0] + 0.5 * conc[1]
    expected = (signal - mixed.lo[0]) / (mixed.hi[0] - mixed.lo[0])
    assert np.allclose(mixed.apply(chw)[0], expected, atol=1e-4)
    assert not np.allclose(plain.apply(chw)[0], mixed.apply(chw)[0], atol=1e-2)
    assert "second_stain" not in plain.to_dict()
    assert Appearance.from_dict(json.loads(json.dumps(mixed.to_dict()))) == mixed
    fluo = estimate(sample_pixels(as_channels_first(load_fixture("fluo_29dd28df98ee")[0])),
                    second_stain=0.5)
    assert fluo.modality == "fluorescence" and "second_stain" not in fluo.to_dict()


def test_model_second_stain_weight_reaches_the_run(tmp_path, shipped_model):
    """The model's ``second_stain_weight`` is what a whole-image run maps brightfield with
    (recorded in the output), and ``Model.segment`` maps alike."""
    image, _ = load_fixture("histo_0e4c2e2780de")
    model = shipped_model.with_config(second_stain_weight=0.25)
    result = cellmask.segment_zarr(image, tmp_path / "o.ome.zarr", model=model,
                                   progress=False, measure=False)
    record = zarr.open_group(str(result.path), mode="r").attrs["cellmask"]
    assert record["appearance"]["second_stain"] == 0.25
    assert np.array_equal(np.asarray(result.labels), model.segment(image))
    from cellmask.config import ModelConfig

    assert ModelConfig.from_json(model.config.to_json()).second_stain_weight == 0.25
    with pytest.raises(ValueError, match="second_stain_weight"):
        ModelConfig.from_dict({"second_stain_weight": 3.0})


def test_8bit_lookup_equals_the_computed_stain_separation():
    """8-bit RGB is separated by table lookup; the numbers are those of the same image as
    float32 (logarithms per pixel), black pixels included, so tiles read as 8 bits and an
    in-memory image converted to float32 map alike."""
    from cellmask.appearance import nuclear_signal

    image, _ = load_fixture("histo_0e4c2e2780de")
    chw = np.ascontiguousarray(np.moveaxis(image, -1, 0))
    assert chw.dtype == np.uint8
    chw[:, :3, :5] = 0  # scanner padding: no data, read as glass
    chw[0, 5, :5] = 0  # a zero in one channel only is an ordinary pixel
    look = estimate(sample_pixels(chw))
    stains, background = np.asarray(look.stains), np.asarray(look.background)
    for second in (0.0, 0.5):
        table = nuclear_signal(chw, stains, background, second)
        computed = nuclear_signal(chw.astype(np.float32), stains, background, second)
        assert table.shape == computed.shape == (1, *chw.shape[1:])
        assert np.array_equal(table, computed)
        assert np.all(table[0, :3, :5] == 0) and np.all(table[0, 5, :5] != 0)
    # optical density and the whole estimate are looked up too, to the same numbers
    assert np.array_equal(optical_density(chw, background),
                          optical_density(chw.astype(np.float32), background))
    sample = sample_pixels(chw)
    assert sample.dtype == np.uint8
    assert estimate(sample) == estimate(sample.astype(np.float32)) == look


def test_od_of_glass_is_zero():
    od = optical_density(np.full((3, 4, 4), 240.0, np.float32), np.array([240.0, 240, 240]))
    assert np.all(od == 0)


def _tiled_rgb(tmp_path, image, chunk=128):
    path = tmp_path / "slide.zarr"
    z = zarr.create_array(str(path), shape=image.shape, chunks=(chunk, chunk, 3),
                          dtype=image.dtype)
    z[:] = image
    return path


def test_stains_estimated_once_per_slide(tmp_path, shipped_model, monkeypatch):
    """A tiled brightfield run estimates its appearance once, and every tile's network input
    is the whole image's mapping cut to the tile (no per-tile statistics)."""
    image, _ = load_fixture("histo_0e4c2e2780de")
    image = np.tile(image, (2, 2, 1))  # 512 x 640, several tiles
    calls = []
    real = appearance_mod.estimate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import cellmask.engine as engine
    import cellmask.survey as survey

    monkeypatch.setattr(survey, "estimate", counting)
    seen = []
    prepare = engine.prepare

    def spy(window, region, app, scale):
        out = prepare(window, region, app, scale)
        seen.append((region, app, out))
        return out

    monkeypatch.setattr(engine, "prepare", spy)
    result = cellmask.segment_zarr(_tiled_rgb(tmp_path, image), tmp_path / "out.ome.zarr",
                                   model=shipped_model, tile=256, halo=32, progress=False,
                                   measure=False)
    assert len(calls) == 1
    assert len(seen) >= 4
    whole = seen[0][1].apply(as_channels_first(image))
    for (y0, y1, x0, x1), app, out in seen:
        assert app is seen[0][1]
        np.testing.assert_allclose(out, whole[:, y0:y1, x0:x1], rtol=1e-5, atol=1e-5)
    record = zarr.open_group(str(result.path), mode="r").attrs["cellmask"]
    assert record["modality"] == "brightfield"
    assert record["appearance"]["decided"].startswith("auto")
    assert len(record["appearance"]["stains"]) == 3


def test_modality_given_is_used_and_recorded(tmp_path, shipped_model):
    image, _ = load_fixture("fluo_29dd28df98ee")
    result = cellmask.segment_zarr(image, tmp_path / "o.ome.zarr", model=shipped_model,
                                   modality="fluorescence", progress=False, measure=False)
    record = zarr.open_group(str(result.path), mode="r").attrs["cellmask"]
    assert record["modality"] == "fluorescence" and record["appearance"]["decided"] == "given"
    with pytest.raises(InputError, match="modality"):
        cellmask.segment_zarr(image, tmp_path / "p.ome.zarr", model=shipped_model,
                              modality="darkfield", progress=False)


def test_segment_in_memory_brightfield_finds_the_nuclei(shipped_model):
    """The stain-separated brightfield input finds the annotated nuclei of a real stained image."""
    from cellmask.metrics import Evaluation

    image, gt = load_fixture("histo_0e4c2e2780de")
    ev = Evaluation()
    ev.add(gt, shipped_model.segment(image))  # auto: brightfield
    assert ev.summary()["ap@0.50"] >= 0.6


def _synthetic_slide(size=1536, background=0.6, seed=0):
    """An RGB 'slide': the real H&E fixture tiled over the left 40% of the width, glass (with
    scanner noise) elsewhere."""
    image, _ = load_fixture("histo_0e4c2e2780de")
    rng = np.random.default_rng(seed)
    slide = np.clip(rng.normal(242, 1.5, (size, size, 3)), 0, 255).astype(np.uint8)
    width = int(round(size * (1 - background)))
    reps = (-(-size // image.shape[0]), -(-width // image.shape[1]), 1)
    slide[:, :width] = np.tile(image, reps)[:size, :width]
    return slide, width


def test_tissue_mask_finds_tissue_not_glass():
    slide, width = _synthetic_slide(768)
    app = estimate(sample_pixels(as_channels_first(slide)))
    mask = tissue_mask(slide[::4, ::4].astype(np.float32), 4, app)
    assert mask.mask[:, : width // 4 - 10].mean() > 0.95
    assert mask.mask[:, width // 4 + 20:].mean() < 0.01
    assert mask.covers((0, 256, 0, 256)) and not mask.covers((0, 256, 600, 768))


def test_tissue_tiles_skipped_same_labels_and_resumable(tmp_path, shipped_model):
    """Tiles without tissue are recorded as empty: same labels as segmenting every tile; a run
    interrupted after some tiles resumes to the same labels; switching the mask off on the
    same output is refused (its records differ)."""
    slide, _ = _synthetic_slide(1024)
    src = _tiled_rgb(tmp_path, slide, chunk=256)
    kw = dict(model=shipped_model, tile=256, halo=32, progress=False, measure=False)
    with_mask = cellmask.segment_zarr(src, tmp_path / "a.ome.zarr", **kw)
    everything = cellmask.segment_zarr(src, tmp_path / "b.ome.zarr", tissue_mask=False, **kw)
    record = zarr.open_group(str(with_mask.path), mode="r").attrs["cellmask"]
    assert record["tissue"]["tiles_without_tissue"] >= 4
    assert with_mask.objects > 50
    np.testing.assert_array_equal(np.asarray(with_mask.labels), np.asarray(everything.labels))
    # interrupted: some records lost, the run state says "tiles"
    run = with_mask.path / ".run"
    records = sorted((run / "tiles").glob("*.npz"))
    for rec in records[::3]:
        rec.unlink()
    again = cellmask.segment_zarr(src, tmp_path / "a.ome.zarr", **kw)
    np.testing.assert_array_equal(np.asarray(again.labels), np.asarray(with_mask.labels))
    with pytest.raises(FileExistsError):
        cellmask.segment_zarr(src, tmp_path / "a.ome.zarr", tissue_mask=False, **kw)



def _view(image):
    from cellmask.normalize import sample_view

    return sample_view(as_channels_first(image))


def test_brightfield_level_caps_how_bright_the_tissue_looks():
    """A brightfield image whose tissue maps above the model's level has its range widened
    until it maps to the level (lo and stains unchanged); a dimmer one, and fluorescence, are
    left as they are; the widening is bounded."""
    from cellmask.appearance import MAX_WIDENING
    from cellmask.survey import cap_brightness, tissue_level

    view, step = _view(load_fixture("histo_0e4c2e2780de")[0])
    plain = estimate(view.reshape(-1, 3))
    seen = tissue_level(plain, view, step)
    assert seen > 0.2
    capped, tissue = cap_brightness(plain, view, step, seen / 2)
    assert capped.lo == plain.lo and capped.stains == plain.stains
    from cellmask.survey import find_tissue

    # the mask the level was read in is the run's tissue mask, before or after the cap
    assert tissue.mask.any() and np.array_equal(tissue.mask,
                                                find_tissue(view, step, capped).mask)
    assert capped.hi[0] - capped.lo[0] == pytest.approx(2 * (plain.hi[0] - plain.lo[0]), rel=1e-5)
    assert tissue_level(capped, view, step) == pytest.approx(seen / 2, rel=1e-3)
    assert cap_brightness(plain, view, step, seen * 1.5)[0] == plain  # below the level
    assert cap_brightness(plain, view, step, 0.0) == (plain, None)  # no level
    bounded, _ = cap_brightness(plain, view, step, seen / 100)
    assert bounded.hi[0] - bounded.lo[0] == pytest.approx(
        MAX_WIDENING * (plain.hi[0] - plain.lo[0]), rel=1e-5)
    fluo, fstep = _view(load_fixture("fluo_29dd28df98ee")[0])
    look = estimate(fluo.reshape(-1, 1))
    assert cap_brightness(look, fluo, fstep, 0.01) == (look, None)


def test_brightfield_level_is_read_on_tissue_not_glass():
    """The same tissue on a slide that is mostly glass reads at (nearly) the level of the
    tissue alone, so whole slides and tissue crops are capped alike."""
    from cellmask.survey import tissue_level

    tissue, _ = load_fixture("histo_0e4c2e2780de")
    slide, width = _synthetic_slide(1536, 0.6)
    crop_view, crop_step = _view(np.tile(tissue, (3, 3, 1)))
    slide_view, slide_step = _view(slide)
    crop_level = tissue_level(estimate(crop_view.reshape(-1, 3)), crop_view, crop_step)
    slide_look = estimate(slide_view.reshape(-1, 3))
    everything = np.percentile(slide_look.apply(
        np.moveaxis(slide_view, -1, 0).astype(np.float32))[0], 75)
    assert everything < 0.5 * crop_level  # glass would have hidden the tissue's brightness
    assert tissue_level(slide_look, slide_view, slide_step) == pytest.approx(crop_level,
                                                                             rel=0.25)


def test_model_brightfield_level_reaches_runs_and_training(tmp_path, shipped_model):
    """The model's ``brightfield_level`` is what whole-image runs, ``Model.segment`` and the
    training samples map brightfield with."""
    from cellmask.config import ModelConfig
    from cellmask.survey import tissue_level
    from cellmask.train.data import prepare_sample

    image, labels = load_fixture("histo_0e4c2e2780de")
    model = shipped_model.with_config(brightfield_level=0.1)
    result = cellmask.segment_zarr(image, tmp_path / "o.ome.zarr", model=model,
                                   progress=False, measure=False)
    record = Appearance.from_dict(
        zarr.open_group(str(result.path), mode="r").attrs["cellmask"]["appearance"])
    view, step = _view(image)
    assert tissue_level(record, view, step) == pytest.approx(0.1, rel=1e-3)
    assert np.array_equal(np.asarray(result.labels), model.segment(image))
    trained = prepare_sample("h", image, labels, level=0.1)
    assert np.allclose(trained.image, record.apply(as_channels_first(image)), atol=1e-6)
    assert ModelConfig.from_json(model.config.to_json()).brightfield_level == 0.1
    with pytest.raises(ValueError, match="brightfield_level"):
        ModelConfig.from_dict({"brightfield_level": 2.0})
