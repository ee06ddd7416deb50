import numpy as np
import pytest
import torch

from cellmask.config import TrainConfig
from cellmask.model.weights import load_weights
from cellmask.train.data import CropSampler, load_samples
from cellmask.train.loop import learning_rate, train


def test_batches_are_deterministic_per_step(dataset_dir):
    samples = load_samples(dataset_dir, "splits/train.txt")
    assert samples[0].image.shape[0] == 3 and samples[0].image.dtype == np.float32
    a = CropSampler(samples, 64, (0.8, 1.25), seed=1)
    b = CropSampler(samples, 64, (0.8, 1.25), seed=1)
    (ia, ta), (ib, tb) = a.batch(5, 2), b.batch(5, 2)
    assert all(torch.equal(x, y) for x, y in zip(ia, ib))
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(ta, tb))
    assert ia[0].shape == (3, 64, 64)
    other = a.batch(6, 2)[0]
    assert not all(torch.equal(x, y) for x, y in zip(ia, other))


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1e-3, warmup=10, iterations=110)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 110) == pytest.approx(2e-5)
    assert learning_rate(cfg, 60) < learning_rate(cfg, 20)


def test_resume_equals_uninterrupted_run(dataset_dir, tiny_config, tmp_path):
    common = dict(data=str(dataset_dir), split="splits/train.txt", batch_size=2, crop=64,
                  warmup=10, seed=3, threads=1, device="cpu")
    full = train(TrainConfig(out=str(tmp_path / "full"), iterations=4, **common), tiny_config,
                 progress=False)
    train(TrainConfig(out=str(tmp_path / "part"), iterations=2, **common), tiny_config,
          progress=False)
    _, _, meta = load_weights(tmp_path / "part" / "checkpoint.safetensors")
    assert meta["step"] == "2"
    resumed = train(TrainConfig(out=str(tmp_path / "part"), iterations=4, **common),
                    resume=True, progress=False)
    a, _, _ = load_weights(full)
    b, _, meta = load_weights(resumed)
    assert meta["step"] == "4"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    log = (tmp_path / "part" / "log.csv").read_text().splitlines()
    assert len(log) == 5  # header + 4 steps, none repeated


def test_fine_tune_from_init(dataset_dir, tiny_config, tmp_path):
    common = dict(data=str(dataset_dir), split="splits/train.txt", batch_size=1, crop=64,
                  warmup=2, threads=1, device="cpu")
    first = train(TrainConfig(out=str(tmp_path / "a"), iterations=1, **common), tiny_config,
                  progress=False)
    second = train(TrainConfig(out=str(tmp_path / "b"), iterations=1, **common), init=str(first),
                   progress=False)
    _, cfg, _ = load_weights(second)
    assert cfg == tiny_config


@pytest.mark.parametrize("split, more", [("splits/test.txt", ()),
                                         ("splits/train.txt", (("d", "fluo_test.txt", 0.3),))])
def test_training_refuses_test_splits(dataset_dir, tiny_config, tmp_path, split, more):
    from cellmask.errors import InputError

    cfg = TrainConfig(data=str(dataset_dir), split=split, more_data=more, iterations=1,
                      out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(InputError, match="refusing to train on a test split"):
        train(cfg, tiny_config, progress=False)
    assert not (tmp_path / "run" / "weights.safetensors").exists()


def test_missing_split_is_a_clear_error(dataset_dir):
    with pytest.raises(FileNotFoundError, match="split list"):
        load_samples(dataset_dir, "splits/nope.txt")


def test_worker_processes_give_the_same_batches(dataset_dir):
    from cellmask.train.data import batches

    sampler = CropSampler(load_samples(dataset_dir, "splits/train.txt"), 64, (0.8, 1.25), seed=2)
    inline = list(batches(sampler, 3, 6, 2, workers=0))
    pooled = list(batches(sampler, 3, 6, 2, workers=2))
    assert len(inline) == len(pooled) == 3
    for (ia, ta), (ib, tb) in zip(inline, pooled):
        assert all(torch.equal(x, y) for x, y in zip(ia, ib))
        assert all(torch.equal(x["masks"], y["masks"]) for x, y in zip(ta, tb))


def test_time_budget_stops_with_a_checkpoint(dataset_dir, tiny_config, tmp_path):
    cfg = TrainConfig(data=str(dataset_dir), split="splits/train.txt", out=str(tmp_path / "t"),
                      iterations=10_000, batch_size=1, crop=64, threads=1, device="cpu",
                      max_minutes=0.001)
    path = train(cfg, tiny_config, progress=False)
    _, _, meta = load_weights(tmp_path / "t" / "checkpoint.safetensors")
    assert 1 <= int(meta["step"]) < 10_000 and path.is_file()


def test_train_only_changes_just_those_parameters(dataset_dir, tiny_config, tmp_path):
    common = dict(data=str(dataset_dir), split="splits/train.txt", batch_size=1, crop=64,
                  warmup=1, threads=1, device="cpu", lr=1e-2)
    first = train(TrainConfig(out=str(tmp_path / "a"), iterations=1, **common), tiny_config,
                  progress=False)
    heads = ("roi_heads.mask_head", "roi_heads.mask_predictor")
    second = train(TrainConfig(out=str(tmp_path / "b"), iterations=2, train_only=heads,
                               **common), init=str(first), changes={"mask_roi_size": 10},
                   progress=False)
    a, _, _ = load_weights(first)
    b, cfg, _ = load_weights(second)
    assert cfg.mask_roi_size == 10 and cfg.replace(mask_roi_size=14) == tiny_config
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(heads) for k in changed)
    # frozen batch norms kept their running statistics (they ran as at inference)
    assert torch.equal(a["backbone.body.stem.1.running_mean"],
                       b["backbone.body.stem.1.running_mean"])


def test_train_only_names_unknown_prefix(dataset_dir, tiny_config, tmp_path):
    cfg = TrainConfig(data=str(dataset_dir), split="splits/train.txt", out=str(tmp_path / "x"),
                      iterations=1, batch_size=1, crop=64, threads=1, device="cpu",
                      train_only=("roi_heads.mask_haed",))
    with pytest.raises(ValueError, match="mask_haed"):
        train(cfg, tiny_config, progress=False)


def test_set_parses_typed_model_fields():
    from cellmask.normalize import InputError
    from cellmask.train.export import parse_settings

    assert parse_settings(["mask_roi_size=10"], inference_only=False) == {"mask_roi_size": 10}
    assert parse_settings(["score_thresh=0.6"]) == {"score_thresh": 0.6}
    with pytest.raises(InputError, match="numeric model setting"):
        parse_settings(["mask_roi_size=10"])  # architecture: not an inference setting
    with pytest.raises(InputError, match="whole number"):
        parse_settings(["mask_roi_size=10.5"], inference_only=False)
    assert parse_settings(["mask_head_layers=64,64"], inference_only=False) == {
        "mask_head_layers": (64, 64)}
    with pytest.raises(InputError, match="comma-separated"):
        parse_settings(["mask_head_layers=64,x"], inference_only=False)
    with pytest.raises(InputError, match="numeric model setting"):
        parse_settings(["mask_head_layers=64"])  # architecture


def test_a_smaller_trainable_head_starts_from_what_fits(dataset_dir, tiny_config, tmp_path):
    """Fine-tuning the mask head with fewer layers keeps the trained layers that still fit,
    drops the others, and leaves everything outside the trained parts as it was; a change
    outside them is still refused."""
    from cellmask.errors import WeightsError

    common = dict(data=str(dataset_dir), split="splits/train.txt", batch_size=1, crop=64,
                  warmup=1, threads=1, device="cpu", lr=1e-2)
    layers = (16, 16)
    first = train(TrainConfig(out=str(tmp_path / "a"), iterations=1, **common),
                  tiny_config.replace(mask_head_layers=layers), progress=False)
    heads = ("roi_heads.mask_head", "roi_heads.mask_predictor")
    second = train(TrainConfig(out=str(tmp_path / "b"), iterations=1, train_only=heads,
                               **common), init=str(first),
                   changes={"mask_head_layers": layers[:1]}, progress=False)
    a, _, _ = load_weights(first)
    b, cfg, _ = load_weights(second)
    assert cfg.mask_head_layers == layers[:1]
    assert not any(k.startswith("roi_heads.mask_head.1.") for k in b)
    assert all(torch.equal(a[k], b[k]) for k in b if not k.startswith(heads))
    with pytest.raises(WeightsError, match="box_head"):
        train(TrainConfig(out=str(tmp_path / "c"), iterations=1, train_only=heads, **common),
              init=str(first), changes={"box_head_width": 8}, progress=False)


def test_training_restores_the_process_torch_settings(dataset_dir, tiny_config, tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    cfg = TrainConfig(data=str(dataset_dir), split="splits/train.txt", out=str(tmp_path / "t"),
                      iterations=2, batch_size=1, crop=64, threads=before + 1, device="cpu")
    train(cfg, tiny_config, progress=False)
    assert torch.get_num_threads() == before
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched


@pytest.mark.parametrize("name", ["histo_0e4c2e2780de", "fluo_29dd28df98ee"])
def test_threshold_tuning_scores_what_a_run_paints(shipped_model, name):
    """Tuning re-paints the detections of a run (same appearance, tiles, scale): painted
    with the model's own thresholds they are the labels a run gives."""
    from fixtures import load_fixture

    from cellmask.engine import image_instances
    from cellmask.train.tune import GRID, _apply, _Raw

    image, gt = load_fixture(name)
    c = shipped_model.config
    assert c.nms_thresh == max(GRID["nms_thresh"]) and c.score_thresh >= min(GRID["score_thresh"])
    permissive = shipped_model.with_config(score_thresh=min(GRID["score_thresh"]),
                                           nms_thresh=max(GRID["nms_thresh"]))
    raw = _Raw(gt, image_instances(permissive, image))
    assert (raw.inst.scores < c.score_thresh).any()  # permissive: more than the run keeps
    params = {k: getattr(c, k) for k in GRID}
    np.testing.assert_array_equal(_apply(raw, params, c.min_area), shipped_model.segment(image))


def test_threshold_tuning_refuses_test_splits_and_improves_its_objective(shipped_model,
                                                                          dataset_dir):
    from cellmask.errors import InputError
    from cellmask.train.tune import tune_thresholds

    with pytest.raises(InputError, match="test split"):
        tune_thresholds(shipped_model, dataset_dir, "splits/fluo_test.txt")
    from cellmask.evaluate import evaluate_split
    from cellmask.train.tune import objective

    # the search starts from the model's thresholds, scored as the accuracy benchmark scores
    start = objective(evaluate_split(shipped_model, dataset_dir, "splits/val.txt"))
    best, value = tune_thresholds(shipped_model, dataset_dir, "splits/val.txt", rounds=1)
    assert set(best) == {"score_thresh", "nms_thresh", "mask_thresh", "min_visible_fraction"}
    assert start - 1e-9 <= value <= 2
    tuned = shipped_model.with_config(**best)
    assert objective(evaluate_split(tuned, dataset_dir, "splits/val.txt")) \
        == pytest.approx(value, abs=1e-9)


def _disc_labels(size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for i, (cy, cx) in enumerate([(24, 24), (24, 64), (66, 44)]):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 8 ** 2] = i + 1
    return labels


def test_synthetic_tissue_draws_cells_around_the_nuclei():
    from skimage.segmentation import expand_labels

    from cellmask.train.synthetic_tissue import add_tissue

    labels = _disc_labels()
    signal = np.where(labels > 0, 0.6, 0.0).astype(np.float32)
    out = add_tissue(signal, labels, np.random.default_rng(0))
    again = add_tissue(signal, labels, np.random.default_rng(0))
    assert out.shape == signal.shape and out.dtype == np.float32 and (out >= 0).all()
    assert np.array_equal(out, again)  # every draw from the generator
    assert signal.max() == 0.6  # the input is not changed in place
    nuclei = labels > 0
    ring = (expand_labels(labels, 3) > 0) & ~nuclei
    # cytoplasm gains signal but stays below the nuclei, which keep theirs on average
    ratios = []
    for seed in range(20):
        drawn = add_tissue(signal, labels, np.random.default_rng(seed))
        assert 0.02 < drawn[ring].mean() < drawn[nuclei].mean()
        assert 0.3 < drawn[nuclei].mean() < 0.75
        ratios.append(drawn[ring].mean() / drawn[nuclei].mean())
    assert 0.15 < np.mean(ratios) < 0.6  # H&E: about 0.45 (see the module's docstring)
    # another seed draws other tissue
    assert not np.array_equal(out, add_tissue(signal, labels, np.random.default_rng(1)))


def test_synthetic_tissue_changes_only_fluorescence_crops(dataset_dir):
    samples = load_samples(dataset_dir, "splits/train.txt")
    modalities = {s.name: s.modality for s in samples}
    assert modalities["histo_0e4c2e2780de"] == "brightfield"
    assert modalities["fluo_29dd28df98ee"] == "fluorescence"
    plain = CropSampler(samples, 64, (0.8, 1.25), seed=1)
    tissue = CropSampler(samples, 64, (0.8, 1.25), seed=1, tissue=1.0)
    for index, sample in enumerate(samples):
        only = [sample]
        a = CropSampler(only, 64, (0.8, 1.25), seed=1).batch(2, 2)
        b = CropSampler(only, 64, (0.8, 1.25), seed=1, tissue=1.0).batch(2, 2)
        same_targets = all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a[1], b[1]))
        assert same_targets  # the annotations are the targets either way
        same_images = all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
        assert same_images == (sample.modality != "fluorescence"), sample.name
        assert all(x.shape == (3, 64, 64) and torch.equal(x[0], x[2]) for x in b[0])
    # with probability 0 the batches are those of a sampler without the option
    assert all(torch.equal(x, y) for x, y in zip(plain.batch(4, 3)[0],
                                                 CropSampler(samples, 64, (0.8, 1.25), seed=1,
                                                             tissue=0.0).batch(4, 3)[0]))
    assert tissue.batch(4, 3)[0][0].shape == (3, 64, 64)
    with pytest.raises(Exception, match="probability"):
        CropSampler(samples, 64, (0.8, 1.25), seed=1, tissue=1.5)
