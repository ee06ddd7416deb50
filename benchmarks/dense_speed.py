"""Seconds to segment dense real-nuclei images: cellmask vs stock torchvision Mask R-CNN.

Both run in this process on the same images. The stock model is torchvision's
``maskrcnn_resnet50_fpn`` (random weights: its speed does not depend on them) configured for
1,000 proposals and detections at native size (no upscaling, which would only slow it down);
it returns one full-size mask per detection, as torchvision does. cellmask's time is the whole
``segment`` call: normalisation, network, box-local painting into a label image. A separate
process measures cellmask's peak memory on a 2048x2048 image.

    python benchmarks/dense_speed.py [--no-stock-1024] [--model nuclei]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellmask.hardware import describe  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cellmask  # noqa: E402
from benchmarks.mosaic import dense_mosaic  # noqa: E402
from cellmask.metrics import Evaluation  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def stock_model(size: int):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2,
                                 min_size=size, max_size=size, box_detections_per_img=1000,
                                 box_score_thresh=0.0, box_nms_thresh=0.7,
                                 rpn_pre_nms_top_n_test=2000,
                                 rpn_post_nms_top_n_test=2000).eval()


def peak_memory_2048(model: str) -> float:
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import cellmask\nfrom benchmarks.mosaic import dense_mosaic\n"
        "im, gt = dense_mosaic(2048)\nm = cellmask.load_model(%r, device='cpu')\n"
        "lab = m.segment(im)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(lab.max(), gt.max(), hwm)\n"
    ) % (str(Path(__file__).resolve().parents[1]), model)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found, truth, kb = out.stdout.split()
    print(f"2048x2048 dense mosaic: {found} objects found ({truth} annotated), "
          f"peak resident memory {int(kb) / 1024**2:.2f} GiB (VmHWM of the whole process, "
          "torch included)")
    return int(kb) / 1024**2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nuclei")
    p.add_argument("--no-stock-1024", action="store_true", help="skip the slow stock 1024 run")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    peak = peak_memory_2048(args.model)  # first, in a fresh process
    print(f"machine: {describe()}; device cpu")
    model = cellmask.load_model(args.model, device="cpu")
    model.segment(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8))
    rows = []
    for size in (512, 1024):
        image, truth = dense_mosaic(size)
        secs, labels = timed(lambda: model.segment(image), 3)
        ev = Evaluation(thresholds=(0.5,))
        ev.add(truth, labels)
        row = {"size": size, "annotated": int(truth.max()), "cellmask_s": secs,
               "cellmask_objects": int(labels.max()), "cellmask_ap50": float(ev.table()["ap"][0])}
        if size == 512 or not args.no_stock_1024:
            stock = stock_model(size)
            x = torch.from_numpy(np.repeat(image[None], 3, 0).astype(np.float32) / 255)
            with torch.inference_mode():
                stock([x[:, :64, :64]])
                s_secs, out = timed(lambda: stock([x])[0], 1)
            row.update(stock_s=s_secs, stock_detections=len(out["boxes"]),
                       speedup=s_secs / secs)
        rows.append(row)
        print(json.dumps(row))
    rows.append({"peak_rss_gib_2048": peak})
    print("\n| image | annotated | cellmask s | objects | AP@0.5 | stock s (detections) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows[:-1]:
        stock = f"{r['stock_s']:.2f} ({r['stock_detections']})" if "stock_s" in r else "-"
        speed = f"{r['speedup']:.1f}x" if "speedup" in r else "-"
        print(f"| {r['size']}x{r['size']} | {r['annotated']} | {r['cellmask_s']:.2f} | "
              f"{r['cellmask_objects']} | {r['cellmask_ap50']:.3f} | {stock} | {speed} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
