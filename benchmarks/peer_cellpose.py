"""Cellpose as a peer of cellmask, for timing: its network with random weights.

Runs in an environment with the optional benchmark extra ``cellpose`` (3.x, whose CPnet is the
network behind its cyto3 and nuclei models), never in cellmask's own; ``benchmarks/peers.py``
calls it as a child process. Pretrained Cellpose weights cannot be downloaded here, so the
network is built with random weights (seeded): its network time is what the real models cost,
but its masks are meaningless and the time of its flow-following post-processing, which
depends on the predicted flows, is only indicative. The nuclei setting (mean diameter 17 px,
``diameter=17``) avoids any resampling of the image.

    python benchmarks/peer_cellpose.py --images a.npy b.npy
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warm-up", help="an image (.npy) segmented untimed before the others")
    args = p.parse_args()
    import torch
    from cellpose import models

    torch.manual_seed(args.seed)
    model = models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=17.0)
    if args.warm_up:  # untimed: first-call costs are paid once per process
        model.eval(np.load(args.warm_up), channels=[0, 0], diameter=17.0,
                   batch_size=args.batch_size)
    rows = []
    for image_path in args.images:
        image = np.load(image_path)
        t0 = time.perf_counter()
        masks, _, _ = model.eval(image, channels=[0, 0], diameter=17.0,
                                 batch_size=args.batch_size)
        seconds = time.perf_counter() - t0
        out = Path(image_path).with_suffix(".cellpose.npy")
        np.save(out, np.asarray(masks, np.int32))
        rows.append({"image": image_path, "seconds": seconds, "labels": str(out),
                     "objects": int(np.asarray(masks).max())})
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
    print(json.dumps({"rows": rows, "hwm_kib": int(hwm[0].split()[1]),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
