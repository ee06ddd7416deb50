"""The network that runs: assembled from the trained network's components, never patched.

:func:`build_inference_network` copies each trained component (the trained network stays as it
is: weights files, fingerprints and workers use it), folds its batch norms into the
convolutions, and injects it into :class:`InferenceMaskRCNN`, the way torchvision's
``MaskRCNN(...)`` takes ``rpn_head=``, ``box_head=``, ``mask_head=``:

- ``backbone``: the trunk and FPN, channels-last on CPUs (faster with oneDNN, measured), the
  trunk in half precision under ``mixed``;
- ``rpn``: :class:`~cellmask.model.network.LeanRPN` (same proposals, decodes only the anchors
  it keeps) around the trained head and anchor generator;
- ``roi_heads``: :class:`CoreRoIHeads`, torchvision's ``RoIHeads`` with
  :class:`~cellmask.model.pool.GridRoIPool` RoI features, the channels-last
  :class:`~cellmask.model.network.NHWCBoxHead`, and the tile's core as an argument: detections
  outside it are dropped before the mask branch.

Stages of :meth:`InferenceMaskRCNN.forward`, as ``GeneralizedRCNN.forward``: transform (batch,
pad) -> backbone -> rpn -> roi_heads. Same outputs as the trained network up to rounding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.ops import boxes as box_ops

from cellmask.model.network import LeanRPN, NHWCBoxHead, fuse_batchnorm
from cellmask.model.nms import batched_nms
from cellmask.model.pool import GridRoIPool

Core = tuple[float, float, float, float]


class HalfPrecision(nn.Module):
    """Runs ``inner`` under autocast to ``dtype``; tensors come out as float32."""

    def __init__(self, inner: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.inner, self.device_type, self.dtype = inner, device_type, dtype

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.inner(x)
        if isinstance(out, dict):
            return type(out)((k, v.float()) for k, v in out.items())
        return out.float()


def inside_cores(boxes: list[torch.Tensor], scores: list[torch.Tensor],
                 labels: list[torch.Tensor], cores: list[Core | None]):
    """Per image, the detections whose box centre lies within 1 px of its core
    ``(y0, y1, x0, x1)`` (None: all); the caller's own ownership test decides the rest."""
    out_b, out_s, out_l = [], [], []
    for b, s, lab, core in zip(boxes, scores, labels, cores):
        if core is not None:
            y0, y1, x0, x1 = core
            cy, cx = (b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2
            keep = (cy >= y0 - 1) & (cy < y1 + 1) & (cx >= x0 - 1) & (cx < x1 + 1)
            b, s, lab = b[keep], s[keep], lab[keep]
        out_b.append(b)
        out_s.append(s)
        out_l.append(lab)
    return out_b, out_s, out_l


class CoreRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` for inference, told each image's core: the box branch, the
    box NMS (neighbours only), then the mask branch only for the detections the tile may own
    (masks of the others would be thrown away)."""

    @classmethod
    def from_trained(cls, heads: RoIHeads, box_roi_pool, box_head, mask_roi_pool, mask_head,
                     mask_predictor) -> "CoreRoIHeads":
        return cls(box_roi_pool, box_head, copy.deepcopy(heads.box_predictor),
                   heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
                   heads.fg_bg_sampler.batch_size_per_image,
                   heads.fg_bg_sampler.positive_fraction, heads.box_coder.weights,
                   heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                   mask_roi_pool=mask_roi_pool, mask_head=mask_head,
                   mask_predictor=mask_predictor).eval()

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """torchvision's decoding of the box branch (per image: boxes clipped, one detection
        per foreground class above ``score_thresh``, empty boxes dropped, NMS per class, the
        best ``detections_per_img``) with the neighbour NMS of :mod:`cellmask.model.nms`
        (the same detections)."""
        classes = class_logits.shape[-1]
        boxes_all = self.box_coder.decode(box_regression, proposals)
        scores_all = F.softmax(class_logits, -1)
        counts = [len(p) for p in proposals]
        out_b, out_s, out_l = [], [], []
        for boxes, scores, shape in zip(boxes_all.split(counts), scores_all.split(counts),
                                        image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(classes, device=scores.device).view(1, -1)
            labels = labels.expand_as(scores)[:, 1:].reshape(-1)
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
            out_b.append(boxes[keep])
            out_s.append(scores[keep])
            out_l.append(labels[keep])
        return out_b, out_s, out_l

    def forward(self, features, proposals, image_shapes, targets=None,
                cores: list[Core | None] | None = None):
        if self.training:
            raise RuntimeError("CoreRoIHeads is for inference; train the network of "
                               "cellmask.model.network.build_network")
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression,
                                                            proposals, image_shapes)
        if cores is not None:
            boxes, scores, labels = inside_cores(boxes, scores, labels, cores)
        mask_features = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        probs = maskrcnn_inference(self.mask_predictor(mask_features), labels)
        return [{"boxes": b, "labels": lab, "scores": s, "masks": m}
                for b, s, lab, m in zip(boxes, scores, labels, probs)], {}


class InferenceMaskRCNN(nn.Module):
    """The injected components, run in the stages of ``GeneralizedRCNN.forward``."""

    def __init__(self, transform: nn.Module, backbone: nn.Module, rpn: LeanRPN,
                 roi_heads: CoreRoIHeads):
        super().__init__()
        self.transform, self.backbone, self.rpn, self.roi_heads = (transform, backbone, rpn,
                                                                   roi_heads)

    def forward(self, images: list[torch.Tensor], cores: list[Core | None] | None = None):
        """Per image ``(3, h, w)``: ``boxes`` ``(N, 4)``, ``scores``, ``labels`` and box-local
        ``masks`` ``(N, 1, M, M)``; ``cores``: per image, the region outside which detections
        are dropped before the mask branch (None: none dropped)."""
        batch, _ = self.transform(images)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes, cores=cores)
        return detections


def _fused(module: nn.Module) -> nn.Module:
    return fuse_batchnorm(copy.deepcopy(module).eval())


def build_inference_network(net, device: torch.device, half: torch.dtype | None
                            ) -> InferenceMaskRCNN:
    """The inference network of the trained ``net`` (a ``MaskRCNN`` of
    :func:`~cellmask.model.network.build_network`), on ``device``; ``half``: the dtype of the
    half-precision parts under ``mixed`` (None: all float32)."""
    heads = net.roi_heads
    backbone = _fused(net.backbone)
    rpn = LeanRPN.from_trained(net.rpn, _fused(net.rpn.head))
    box_pool = GridRoIPool.like(heads.box_roi_pool, half)  # read in the heads' compute type
    mask_pool = GridRoIPool.like(heads.mask_roi_pool, half)
    box_head: nn.Module = NHWCBoxHead(copy.deepcopy(heads.box_head), net.backbone.out_channels,
                                       box_pool.size)
    mask_head: nn.Module = _fused(heads.mask_head)
    mask_predictor: nn.Module = copy.deepcopy(heads.mask_predictor).eval()
    if device.type == "cpu":
        backbone.channels_last = True
        backbone.to(memory_format=torch.channels_last)
        mask_head.to(memory_format=torch.channels_last)
    if half is not None:
        backbone.body = HalfPrecision(backbone.body, device.type, half)
        rpn.head.conv = HalfPrecision(rpn.head.conv, device.type, half)
        box_head = HalfPrecision(box_head, device.type, half)
        mask_head = HalfPrecision(mask_head, device.type, half)
        mask_predictor = HalfPrecision(mask_predictor, device.type, half)
    roi_heads = CoreRoIHeads.from_trained(heads, box_pool, box_head, mask_pool, mask_head,
                                          mask_predictor)
    runner = InferenceMaskRCNN(copy.deepcopy(net.transform), backbone, rpn, roi_heads)
    return runner.to(device).eval()
