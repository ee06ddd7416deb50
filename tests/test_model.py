import pickle
import struct

import numpy as np
import pytest
import torch

from cellmask.config import ModelConfig
from cellmask.model.network import build_network
from cellmask.model.segmenter import Model, load_model
from cellmask.model.weights import WeightsError, load_weights, save_weights
from cellmask.train.data import targets_from_labels


def synthetic_batch(n=2, size=64):
    from skimage.draw import disk

    images, targets = [], []
    for k in range(n):
        labels = np.zeros((size, size), np.int32)
        for i, (cy, cx) in enumerate([(15, 15), (40, 45), (20, 50)], 1):
            labels[disk((cy + k, cx), 6, shape=labels.shape)] = i
        images.append(torch.from_numpy(np.repeat((labels > 0)[None], 3, 0).astype(np.float32)))
        targets.append(targets_from_labels(labels))
    return images, targets


def test_targets_from_labels():
    labels = np.zeros((20, 30), np.int32)
    labels[2:6, 3:10] = 5
    labels[10:12, 0:1] = 7  # 2 px: a sliver, dropped
    t = targets_from_labels(labels)
    assert t["boxes"].tolist() == [[3, 2, 10, 6]]
    assert t["masks"].shape == (1, 20, 30) and t["masks"].sum() == 28
    assert targets_from_labels(np.zeros((5, 5), np.int32))["boxes"].shape == (0, 4)


def test_training_step_reduces_loss(tiny_config):
    torch.manual_seed(0)
    net = build_network(tiny_config).train()
    images, targets = synthetic_batch()
    opt = torch.optim.AdamW(net.parameters(), 3e-3)
    losses = []
    for _ in range(8):
        loss = sum(net(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(net(images, targets)) == {"loss_classifier", "loss_box_reg", "loss_mask",
                                         "loss_objectness", "loss_rpn_box_reg"}
    assert losses[-1] < losses[0]


def test_eval_outputs_are_box_local(tiny_config):
    net = build_network(tiny_config.replace(score_thresh=0.0)).eval()
    with torch.no_grad():
        (out,) = net([torch.rand(3, 96, 80)])
    n = len(out["boxes"])
    assert out["masks"].shape == (n, 1, 2 * tiny_config.mask_roi_size, 2 * tiny_config.mask_roi_size)
    assert (out["boxes"][:, 2] <= 80).all() and (out["boxes"][:, 3] <= 96).all()


def test_default_is_lean():
    n = sum(p.numel() for p in build_network(ModelConfig()).parameters())
    assert n < 6_000_000  # 25 MB budget for the file, with room to spare


def test_weights_round_trip(tmp_path, tiny_config):
    net = build_network(tiny_config)
    path = save_weights(tmp_path / "w.safetensors", net.state_dict(), tiny_config, {"step": "3"})
    state, cfg, meta = load_weights(path)
    assert cfg == tiny_config and meta["step"] == "3"
    model = load_model(path, device="cpu")
    for k, v in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v)


def test_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("evil.pt", "evil.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Payload()))
        with pytest.raises(WeightsError, match="pickle"):
            load_model(path, device="cpu")
    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.safetensors")
    with pytest.raises(WeightsError, match="pickle"):
        load_model(tmp_path / "zip.safetensors", device="cpu")
    assert not marker.exists()


def test_broken_and_mismatched_weights_refused(tmp_path, tiny_config):
    net = build_network(tiny_config)
    good = save_weights(tmp_path / "good.safetensors", net.state_dict(), tiny_config)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "header.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}" + data[18:])
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    for name in ("trunc", "header", "short"):
        with pytest.raises(WeightsError):
            load_model(tmp_path / f"{name}.safetensors", device="cpu")
    state = dict(net.state_dict())
    state.pop(next(iter(state)))
    save_weights(tmp_path / "missing.safetensors", state, tiny_config)
    with pytest.raises(WeightsError, match="missing"):
        load_model(tmp_path / "missing.safetensors", device="cpu")
    extra = {**net.state_dict(), "backdoor.weight": torch.zeros(3)}
    save_weights(tmp_path / "extra.safetensors", extra, tiny_config)
    with pytest.raises(WeightsError, match="1 unexpected"):
        load_model(tmp_path / "extra.safetensors", device="cpu")
    # tensors of the tiny net declared as the default architecture: refused, not half-loaded
    save_weights(tmp_path / "card.safetensors", net.state_dict(), ModelConfig())
    with pytest.raises(WeightsError):
        load_model(tmp_path / "card.safetensors", device="cpu")
    with pytest.raises(FileNotFoundError, match="no model named"):
        load_model(tmp_path / "absent.safetensors")


def test_with_config_shares_weights(tiny_config):
    m = Model(build_network(tiny_config), tiny_config)
    m2 = m.with_config(score_thresh=0.9)
    assert m2.net is m.net and m2.config.score_thresh == 0.9 and m.config.score_thresh == 0.5


def test_header_length_that_looks_like_pickle_magic_still_loads(tmp_path, tiny_config):
    """A safetensors header length whose low byte is 0x80 is not a pickle."""
    net = build_network(tiny_config)
    for k in range(512):
        path = save_weights(tmp_path / "w.safetensors", net.state_dict(), tiny_config,
                            {"pad": "x" * k})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    state, cfg, meta = load_weights(path)
    assert cfg == tiny_config and len(meta["pad"]) == k
