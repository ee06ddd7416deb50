"""RoI pooling for inference: torchvision's multi-scale RoIAlign computed with ``grid_sample``.

With one sample per bin (``sampling_ratio=1``, as this network is trained), RoIAlign reads each
output bin as one bilinear sample at the bin centre; ``grid_sample`` with border clamping
computes the same numbers for boxes inside the image (proposals are clipped to it). On the CPU
torchvision's RoIAlign kernel runs on one thread over NCHW features, while ``grid_sample``
is vectorised, multi-threaded and reads channels-last features directly: about 2.5x faster
for the thousands of RoIs of a dense tile (measured on 2 cores), and its channels-last
output feeds the mask head's NHWC convolutions without a copy. Training keeps torchvision's
``MultiScaleRoIAlign`` (same parameters, same level assignment).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper


class GridRoIPool(nn.Module):
    """Drop-in for an inference ``MultiScaleRoIAlign`` with fixed scales and one sample per bin.

    ``forward(features, boxes, image_shapes)``: ``features`` maps level names to ``(B, C, h, w)``
    maps; ``boxes`` holds one ``(N_b, 4)`` tensor ``[x1, y1, x2, y2]`` (input pixels) per image.
    Returns ``(sum N_b, C, S, S)`` in the order of the boxes (channels-last memory).
    """

    def __init__(self, names: list[str], size: int, scales: list[float], mapper: LevelMapper):
        super().__init__()
        self.names, self.size, self.scales, self.mapper = list(names), size, list(scales), mapper

    @staticmethod
    def like(pool: MultiScaleRoIAlign) -> "GridRoIPool":
        if pool.sampling_ratio != 1 or pool.scales is None or pool.map_levels is None:
            raise ValueError("GridRoIPool reproduces RoIAlign with sampling_ratio=1 and fixed "
                             "scales only")
        size = pool.output_size[0]
        if pool.output_size[1] != size:
            raise ValueError("GridRoIPool needs square outputs")
        return GridRoIPool(pool.featmap_names, size, pool.scales, pool.map_levels)

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        maps = [features[n] for n in self.names]
        s = self.size
        total = sum(len(b) for b in boxes)
        if total == 0:
            return maps[0].new_empty((0, s, s, maps[0].shape[1])).permute(0, 3, 1, 2)
        levels = self.mapper(boxes)
        if len(boxes) == 1 and bool((levels == levels[0]).all()):
            # one image, one level (the rule for nuclei: boxes under 112 px map to stride 4)
            level = int(levels[0])
            return _sample(maps[level][:1], boxes[0], self.scales[level], s).permute(0, 3, 1, 2)
        out = maps[0].new_empty((total, s, s, maps[0].shape[1]))
        start = 0
        for b, image_boxes in enumerate(boxes):
            n = len(image_boxes)
            image_levels = levels[start:start + n]
            for level, (fmap, scale) in enumerate(zip(maps, self.scales)):
                idx = torch.nonzero(image_levels == level).flatten()
                if len(idx) == 0:
                    continue
                sampled = _sample(fmap[b:b + 1], image_boxes[idx], scale, s)
                if len(idx) == n:
                    out[start:start + n] = sampled
                else:
                    out[start + idx] = sampled
            start += n
        return out.permute(0, 3, 1, 2)


def _sample(fmap: torch.Tensor, boxes: torch.Tensor, scale: float, size: int) -> torch.Tensor:
    """``(n, S, S, C)`` bilinear samples at the bin centres of ``boxes`` on ``fmap`` (1, C, h, w).

    Bin geometry as torchvision's RoIAlign with ``aligned=False``: a box spans
    ``[x1 * scale, x1 * scale + max((x2 - x1) * scale, 1))``; sample coordinates are clamped
    to the map as RoIAlign clamps them.
    """
    h, w = fmap.shape[-2:]
    box = boxes.to(torch.float32) * scale
    x1, y1 = box[:, 0], box[:, 1]
    bw = (box[:, 2] - x1).clamp(min=1.0)
    bh = (box[:, 3] - y1).clamp(min=1.0)
    steps = (torch.arange(size, device=box.device, dtype=box.dtype) + 0.5) / size
    xs = x1[:, None] + steps * bw[:, None]  # (n, S) in map pixels (pixel centres at integers)
    ys = y1[:, None] + steps * bh[:, None]
    # grid_sample (align_corners=False) reads pixel i at normalised (2i + 1) / size - 1
    gx = (2 * xs + 1) / w - 1
    gy = (2 * ys + 1) / h - 1
    n = len(box)
    grid = torch.stack((gx[:, None, :].expand(n, size, size),
                        gy[:, :, None].expand(n, size, size)), -1).reshape(1, n * size, size, 2)
    sampled = F.grid_sample(fmap, grid.to(fmap.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)  # (1, C, n * S, S)
    return sampled[0].permute(1, 2, 0).reshape(n, size, size, -1)
