"""The dense-nuclei Mask R-CNN: torchvision's ``MaskRCNN`` with lean, injected components.

What differs from torchvision's COCO defaults, and why:

* a small ResNet trunk (widths from :class:`ModelConfig`) feeding an FPN whose finest level has
  stride 4: nuclei of 7 px need it;
* anchors of 8 to 128 px instead of 32 to 512 px;
* no resizing: images are processed at their native pixel size (``segment(scale=...)`` resizes
  explicitly), and intensities are normalised before the network, not inside it;
* thousands of proposals and detections per image instead of 100;
* light, batch-normalised box and mask heads;
* masks stay box-local: in evaluation the network returns ``(N, 1, M, M)`` mask probabilities
  in box coordinates, never ``N`` full-size masks (see :mod:`cellmask.model.paint`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import initLevelMapper

from cellmask.config import ModelConfig
from cellmask.model.nms import batched_nms


class _Trunk(nn.Module):
    """A narrow ResNet: a stride-2 stem, then three stages of BasicBlocks at strides 4, 8, 16.

    torchvision's ResNet fixes its widths at 64..512; for 2-core training the trunk must be
    narrower, so it is composed here from torchvision's own ``BasicBlock``.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        stem = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        stages = []
        previous = stem
        for width, count in zip(widths, blocks):
            layers = [BasicBlock(previous, width, stride=2, downsample=nn.Sequential(
                nn.Conv2d(previous, width, 1, stride=2, bias=False), nn.BatchNorm2d(width)))]
            layers += [BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            previous = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[str(i)] = x
        return out


class _Backbone(nn.Module):
    """Trunk + FPN; returns levels '0'..'2' (strides 4, 8, 16) and 'pool' (stride 32)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.body = _Trunk(cfg.in_channels, cfg.stage_widths, cfg.stage_blocks)
        self.fpn = FeaturePyramidNetwork(list(cfg.stage_widths), cfg.fpn_channels,
                                         extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
        self.out_channels = cfg.fpn_channels
        #: NHWC activations: faster convolutions on CPUs (oneDNN), set by ``Model``.
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.fpn(self.body(x))


class _NativeScaleTransform(GeneralizedRCNNTransform):
    """Batches images (padding to a multiple of 32) without resizing or normalising them.

    ``postprocess`` returns detections as they are: boxes already in input pixels, masks
    box-local. torchvision's version would paste every mask into a full-size image.
    """

    def __init__(self) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=[0.0], image_std=[1.0],
                         size_divisible=32)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(self, image, target=None):  # noqa: D102 - identity
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):  # noqa: D102
        return result


#: RoIs per mask-head pass at inference: a dense 1024 tile has thousands of detections, and
#: their 28x28 feature maps at once would cost gigabytes.
MASK_CHUNK = 512


def _chunked(forward, x: torch.Tensor) -> torch.Tensor:
    if len(x) <= MASK_CHUNK:
        return forward(x)
    return torch.cat([forward(part) for part in x.split(MASK_CHUNK)])


class _MaskHeads(MaskRCNNHeads):
    """torchvision's mask head, run over RoIs in chunks at inference (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        return _chunked(super().forward, x)


class _MaskPredictor(MaskRCNNPredictor):
    """torchvision's mask predictor (same parameters), computed at inference as two matmuls.

    The 2x2, stride-2 transposed convolution writes each input pixel to its own 2x2 output
    block, so it is one ``(pixels, C) @ (C, 4 * C_out)`` product; the 1x1 logits layer is another.
    On CPUs this is several times faster than the transposed-convolution kernel (measured on a
    dense 1024 tile: the predictor went from the largest single cost of the network to a small
    one) and needs no 28x28 intermediate in NCHW order.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        return _chunked(self._upsample_logits, x)

    def _upsample_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, S, S)`` mask features -> ``(N, K, 2S, 2S)`` logits (as the layers compute)."""
        n, c, s, _ = x.shape
        up_w = self.conv5_mask.weight  # (C, O, 2, 2)
        o = up_w.shape[1]
        rows = x.permute(0, 2, 3, 1).reshape(n * s * s, c)  # free for channels-last input
        up = torch.addmm(self.conv5_mask.bias.repeat(4), rows,
                         up_w.permute(0, 2, 3, 1).reshape(c, 4 * o))  # (pixels, (a, b, O))
        up.relu_()
        logit_w = self.mask_fcn_logits.weight.flatten(1)  # (K, O)
        k = logit_w.shape[0]
        logits = torch.addmm(self.mask_fcn_logits.bias, up.view(-1, o), logit_w.t())
        # (n, i, j, a, b, K) -> (n, K, 2i + a, 2j + b)
        return logits.view(n, s, s, 2, 2, k).permute(0, 5, 1, 3, 2, 4).reshape(n, k, 2 * s, 2 * s)


class NHWCBoxHead(nn.Module):
    """torchvision's ``TwoMLPHead`` (same numbers) for RoI features in channels-last memory.

    ``TwoMLPHead`` flattens ``(N, C, S, S)`` in ``(C, y, x)`` order, which for channels-last
    pooled features is a full copy (as long as the pooling itself on a dense tile); here the
    first layer's columns are reordered to ``(y, x, C)`` once, so flattening is free.
    """

    def __init__(self, head: TwoMLPHead, channels: int, size: int):
        super().__init__()
        fc6 = head.fc6
        self.fc6 = nn.Linear(fc6.in_features, fc6.out_features)
        with torch.no_grad():
            self.fc6.weight.copy_(fc6.weight.view(-1, channels, size, size)
                                  .permute(0, 2, 3, 1).reshape(fc6.out_features, -1))
            self.fc6.bias.copy_(fc6.bias)
        self.fc7 = head.fc7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1).reshape(len(x), self.fc6.in_features)  # a view if NHWC
        return torch.relu(self.fc7(torch.relu(self.fc6(x))))


class LeanRPN(RegionProposalNetwork):
    """torchvision's region proposal network (same parameters, same proposals) that, at
    inference, decodes only the anchors it keeps.

    torchvision builds every anchor of every level and decodes all of them (660,000 on a
    1,152 px tile) before choosing the top few thousand per level; here the top anchors are
    chosen on the objectness logits first, and only their boxes are made and decoded; their
    NMS compares each proposal with its neighbours only (:mod:`cellmask.model.nms`).
    """

    @classmethod
    def from_trained(cls, rpn: RegionProposalNetwork, head: nn.Module | None = None
                     ) -> "LeanRPN":
        """A LeanRPN with the settings of a trained ``rpn`` around ``head`` (default: a copy
        of the trained head) and a copy of its anchor generator."""
        import copy

        return cls(copy.deepcopy(rpn.anchor_generator), head or copy.deepcopy(rpn.head),
                   rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold,
                   rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction,
                   dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), rpn.nms_thresh,
                   rpn.score_thresh).eval()

    def forward(self, images, features, targets=None):
        if self.training:
            return super().forward(images, features, targets)
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        padded = images.tensors.shape[-2:]
        pre, post = self.pre_nms_top_n(), self.post_nms_top_n()
        boxes_out, scores_out = [], []
        for b, shape in enumerate(images.image_sizes):
            boxes, logits, levels = [], [], []
            for lvl, (obj, delta) in enumerate(zip(objectness, deltas)):
                a_count, h, w = obj.shape[1:]
                flat = obj[b].permute(1, 2, 0).reshape(-1)  # anchor (y, x, a) order
                top, idx = flat.topk(min(pre, flat.numel()))
                a, cell = idx % a_count, idx // a_count
                y, x = cell // w, cell % w
                d = delta[b].view(a_count, 4, h, w)[a, :, y, x]  # (k, 4)
                stride_y, stride_x = padded[0] // h, padded[1] // w
                base = self.anchor_generator.cell_anchors[lvl].to(d)
                shift = torch.stack((x * stride_x, y * stride_y, x * stride_x, y * stride_y), 1)
                boxes.append(self.box_coder.decode_single(d, shift + base[a]))
                logits.append(top)
                levels.append(torch.full_like(idx, lvl))
            box = box_ops.clip_boxes_to_image(torch.cat(boxes), shape)
            score = torch.sigmoid(torch.cat(logits))
            level = torch.cat(levels)
            keep = box_ops.remove_small_boxes(box, self.min_size)
            box, score, level = box[keep], score[keep], level[keep]
            keep = torch.where(score >= self.score_thresh)[0]
            box, score, level = box[keep], score[keep], level[keep]
            keep = batched_nms(box, score, level, self.nms_thresh)[:post]  # neighbours only
            boxes_out.append(box[keep])
            scores_out.append(score[keep])
        return boxes_out, {}


def build_network(cfg: ModelConfig) -> MaskRCNN:
    """Build the Mask R-CNN variant described by ``cfg`` (randomly initialised).

    In training mode it takes ``list[(C, H, W) float]`` and targets with ``boxes``
    ``(N, 4)`` as ``[x1, y1, x2, y2]`` in pixels, ``labels`` (all 1) and ``masks`` ``(N, H, W)``,
    and returns a dict of losses. In eval mode it returns per image ``boxes`` ``(N, 4)``,
    ``scores`` ``(N,)`` and ``masks`` ``(N, 1, M, M)`` probabilities inside each box.
    """
    if len(cfg.anchor_sizes) != 4:
        raise ValueError("anchor_sizes needs one tuple per FPN level (4 levels: strides 4-32)")
    if len({len(s) for s in cfg.anchor_sizes}) != 1:
        raise ValueError("every FPN level needs the same number of anchor sizes")
    backbone = _Backbone(cfg)
    anchors = AnchorGenerator(sizes=cfg.anchor_sizes,
                              aspect_ratios=(cfg.anchor_ratios,) * len(cfg.anchor_sizes))
    rpn_head = RPNHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0])
    levels = ["0", "1", "2", "pool"]
    box_pool = MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=1)
    mask_pool = MultiScaleRoIAlign(levels, output_size=cfg.mask_roi_size, sampling_ratio=1)
    for pool in (box_pool, mask_pool):
        # torchvision infers the level scales from the first batch it sees and caches them: a
        # first image of a few pixels would fix wrong scales for good. The strides are known.
        pool.scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        pool.map_levels = initLevelMapper(2, 5, canonical_scale=224, canonical_level=4)
    box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_width)
    mask_head = _MaskHeads(cfg.fpn_channels, list(cfg.mask_head_layers), dilation=1,
                              norm_layer=nn.BatchNorm2d)
    net = MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
        rpn_batch_size_per_image=cfg.rpn_batch_per_image,
        rpn_positive_fraction=cfg.rpn_positive_fraction,
        box_roi_pool=box_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(cfg.box_head_width, 2),
        box_score_thresh=cfg.score_thresh,
        box_nms_thresh=cfg.nms_thresh,
        box_detections_per_img=cfg.detections_per_image,
        box_batch_size_per_image=cfg.box_batch_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
        mask_roi_pool=mask_pool,
        mask_head=mask_head,
        mask_predictor=_MaskPredictor(cfg.mask_head_layers[-1], cfg.mask_head_layers[-1], 2),
    )
    net.transform = _NativeScaleTransform()
    return net


def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm that follows a convolution into it, in place (eval mode only).

    Covers the patterns of this network: ``Sequential``/``Conv2dNormActivation`` runs
    (conv, bn, ...) and torchvision ``BasicBlock`` (conv1/bn1, conv2/bn2). Outputs are unchanged
    up to float rounding; each folded norm costs a full pass over its activations otherwise.
    """
    if module.training:
        raise ValueError("fuse_batchnorm needs a module in eval mode")
    _fuse(module)
    return module.eval()


def _fuse(module: nn.Module) -> None:
    if isinstance(module, BasicBlock):
        module.conv1 = fuse_conv_bn_eval(module.conv1, module.bn1)
        module.bn1 = nn.Identity()
        module.conv2 = fuse_conv_bn_eval(module.conv2, module.bn2)
        module.bn2 = nn.Identity()
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
    for child in module.children():
        _fuse(child)


def set_inference_thresholds(net: MaskRCNN, cfg: ModelConfig, pixels: int = 0) -> None:
    """Apply the inference numbers of ``cfg`` to an existing network (no weights change).

    ``pixels``: the area of the (largest) input, for budgets set per megapixel.
    """
    net.roi_heads.score_thresh = cfg.score_thresh
    net.rpn.score_thresh = cfg.rpn_score_thresh
    net.rpn.nms_thresh = cfg.rpn_nms_thresh
    net.roi_heads.nms_thresh = cfg.nms_thresh
    post, pre, dets = cfg.rpn_post_nms_test, cfg.rpn_pre_nms_test, cfg.detections_per_image
    if cfg.proposals_per_mpx > 0 and pixels > 0:
        post = max(500, int(round(cfg.proposals_per_mpx * pixels / 1e6)))
        pre, dets = max(1, int(cfg.rpn_pre_nms_ratio * post)), post
    net.roi_heads.detections_per_img = dets
    net.rpn._pre_nms_top_n["testing"] = pre
    net.rpn._post_nms_top_n["testing"] = post
