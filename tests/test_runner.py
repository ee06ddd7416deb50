"""The inference network (``Model.runner``) computes what the trained network computes."""

import numpy as np
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from cellmask.metrics import Evaluation
from cellmask.model.network import build_network, fuse_batchnorm
from cellmask.model.pool import GridRoIPool
from cellmask.model.segmenter import Model, _half_dtype
from fixtures import load_fixture


def _trained_like(cfg, seed=0):
    """A network with non-trivial batch-norm statistics, as after training."""
    torch.manual_seed(seed)
    net = build_network(cfg).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def test_grid_pool_equals_torchvision_roi_align():
    g = torch.Generator().manual_seed(0)
    names = ["0", "1", "2", "pool"]
    feats = {n: torch.randn(2, 4, 256 // 2 ** k, 240 // 2 ** k, generator=g)
             for k, n in enumerate(names)}
    ref = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=1)
    ref.scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    ref.map_levels = initLevelMapper(2, 5, canonical_scale=224, canonical_level=4)
    boxes = []
    sizes = torch.tensor([0.5, 6.0, 20.0, 90.0, 150.0, 300.0, 700.0])  # all four levels
    for n in (40, 25):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([900.0, 1000.0])
        wh = sizes[torch.randint(len(sizes), (n, 1), generator=g)] * (
            0.8 + 0.4 * torch.rand(n, 2, generator=g))
        b = torch.cat([xy, xy + wh], 1)
        b[:, 0::2] = b[:, 0::2].clamp(0, 960)  # clipped to the image, as proposals are
        b[:, 1::2] = b[:, 1::2].clamp(0, 1024)
        boxes.append(b)
    shapes = [(1024, 960)] * 2
    expected = ref(feats, boxes, shapes)
    got = GridRoIPool.like(ref)(feats, boxes, shapes)
    assert got.shape == expected.shape == (65, 4, 7, 7)
    assert torch.allclose(got, expected, atol=1e-4)
    assert len(set(ref.map_levels(boxes).tolist())) == 4
    half = GridRoIPool.like(ref, torch.bfloat16)(feats, boxes, shapes)
    assert half.dtype == torch.bfloat16  # read in the type the heads compute in
    assert torch.allclose(half.float(), expected, atol=0.05, rtol=0.02)
    empty = GridRoIPool.like(ref)(feats, [b[:0] for b in boxes], shapes)
    assert empty.shape == (0, 4, 7, 7)


def test_lean_rpn_gives_torchvision_proposals(tiny_config):

    from torchvision.models.detection.image_list import ImageList

    from cellmask.model.network import LeanRPN

    net = _trained_like(tiny_config)
    x = torch.rand(2, 3, 160, 192)
    images = ImageList(x, [(150, 192), (160, 170)])
    lean = LeanRPN.from_trained(net.rpn)
    for pre, post, score in ((300, 200, 0.0), (500, 500, 0.3), (40, 1000, 0.0)):
        for rpn in (net.rpn, lean):
            rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = pre, post
            rpn.score_thresh = score
        with torch.no_grad():
            feats = net.backbone(x)
            want, _ = net.rpn(images, feats)
            got, _ = lean(images, feats)
        assert [len(w) for w in want] == [len(g) for g in got] and len(want[0]) > 20
        for w, g in zip(want, got):
            assert torch.allclose(w, g, atol=1e-4)


def test_channels_last_box_head_equals_torchvision_head():
    from torchvision.models.detection.faster_rcnn import TwoMLPHead

    from cellmask.model.network import NHWCBoxHead

    torch.manual_seed(0)
    head = TwoMLPHead(8 * 7 * 7, 32).eval()
    x = torch.randn(11, 8, 7, 7)
    with torch.no_grad():
        want = head(x)
        got = NHWCBoxHead(head, 8, 7)(x.contiguous(memory_format=torch.channels_last))
        got_nchw = NHWCBoxHead(head, 8, 7)(x)
    assert torch.allclose(want, got, atol=1e-5) and torch.allclose(want, got_nchw, atol=1e-5)


def test_fused_runner_matches_trained_network(tiny_config):
    cfg = tiny_config.replace(score_thresh=0.05)
    net = _trained_like(cfg)
    x = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        (want,) = net(x)
        model = Model(net, cfg, precision="fp32")
        (got,) = model.runner(x)
    bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.runner.modules())
    assert bn == 0 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) > 0
    assert len(want["boxes"]) == len(got["boxes"]) > 0
    # near-equal scores of a random network may swap places: match each box to its twin
    dist = (want["boxes"][:, None] - got["boxes"][None]).abs().amax(-1)
    twin = dist.argmin(1)
    assert dist.min(1).values.max() < 1e-3 and len(set(twin.tolist())) == len(twin)
    assert torch.allclose(want["scores"], got["scores"][twin], atol=1e-5)
    assert torch.allclose(want["masks"], got["masks"][twin], atol=1e-4)


def test_mask_predictor_matmul_equals_transposed_convolution(tiny_config):
    net = _trained_like(tiny_config)
    pred = net.roi_heads.mask_predictor
    x = torch.randn(37, 16, 14, 14)
    with torch.no_grad():
        want = pred.mask_fcn_logits(torch.relu(pred.conv5_mask(x)))
        got = pred(x)
        got_nhwc = pred(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == (37, 2, 28, 28)
    assert torch.allclose(want, got, atol=1e-5) and torch.allclose(want, got_nhwc, atol=1e-5)


def test_fuse_batchnorm_needs_eval_mode(tiny_config):
    with pytest.raises(ValueError, match="eval"):
        fuse_batchnorm(build_network(tiny_config).train())


def test_mixed_precision_matches_fp32_or_is_refused(shipped_model):
    image, truth = load_fixture("fluo_29dd28df98ee")
    if _half_dtype(torch.device("cpu")) is None:
        with pytest.raises(ValueError, match="mixed"):
            Model(shipped_model.net, shipped_model.config, precision="mixed")
        assert Model(shipped_model.net, shipped_model.config).precision == "fp32"
        return
    fp32 = Model(shipped_model.net, shipped_model.config, meta=shipped_model.meta,
                 precision="fp32")
    mixed = Model(shipped_model.net, shipped_model.config, meta=shipped_model.meta,
                  precision="mixed")
    a, b = fp32.segment(image), mixed.segment(image)
    same = Evaluation(thresholds=(0.9,))
    same.add(a, b)
    assert same.table()["ap"][0] >= 0.95  # the same objects, masks within rounding
    acc = [Evaluation(thresholds=(0.5,)) for _ in range(2)]
    acc[0].add(truth, a)
    acc[1].add(truth, b)
    assert abs(acc[0].table()["ap"][0] - acc[1].table()["ap"][0]) <= 0.02
    assert np.array_equal(np.unique(a), np.arange(a.max() + 1))


def test_in_memory_segment_with_tile_workers_is_identical(shipped_model):
    import threading

    image, _ = load_fixture("fluo_e23e11414ee6")
    one = shipped_model.segment(image, tile=256, workers=1)
    two = shipped_model.segment(image, tile=256, workers=2)
    assert one.max() > 20 and np.array_equal(one, two)
    seen = []  # the caller's thread count is back for threads started later
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [torch.get_num_threads()]


@pytest.mark.gpu
def test_gpu_masks_and_mixed_precision_match_the_cpu(shipped_model):
    from cellmask.model.paint import local_masks, pixel_windows
    from cellmask.normalize import normalize

    image, truth = load_fixture("fluo_29dd28df98ee")
    chw = normalize(image, shipped_model.config.norm_percentiles)
    (inst,) = shipped_model.detect_batch([chw])
    windows = pixel_windows(inst.boxes, image.shape[:2])
    cpu = local_masks(inst, windows, 0.5)
    gpu = local_masks(inst, windows, 0.5, device="cuda")
    differing = sum(int((a != b).sum()) for a, b in zip(cpu, gpu))
    assert differing <= 1e-4 * sum(a.size for a in cpu)  # interpolation rounding only
    on_gpu = Model(shipped_model.net, shipped_model.config, device="cuda")
    assert on_gpu.precision == "mixed" and on_gpu.default_workers() == 2
    ev = Evaluation(thresholds=(0.5,))
    ev.add(truth, on_gpu.segment(image))
    assert ev.table()["ap"][0] >= 0.8
