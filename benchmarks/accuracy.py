"""Evaluation tables of a model on the annotated test splits (pooled over objects).

    python benchmarks/accuracy.py [--model nuclei] [--precision fp32] [--augment 8]
                                  [--sets dsb:test.txt ...]

Sets are ``NAME:SPLIT`` with NAME one of ``dsb`` (DSB2018, CC0) and ``monuseg`` (MoNuSeg 2018
H&E, CC BY-NC-SA 4.0) in the project's data folder. Reported: AP (TP / (TP + FP + FN)) and F1
at IoU 0.5 and 0.75 and mean AP over 0.5:0.95, pooled over the objects of all images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cellmask  # noqa: E402
from benchmarks.mosaic import DEFAULT_DATA  # noqa: E402
from cellmask.evaluate import evaluate_split, format_table  # noqa: E402
from cellmask.hardware import describe  # noqa: E402

DATA = {"dsb": DEFAULT_DATA, "monuseg": DEFAULT_DATA.parent / "NC" / "monuseg2018"}
DEFAULT_SETS = ["dsb:test.txt", "dsb:fluo_test.txt", "dsb:other_test.txt", "monuseg:test.txt"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nuclei")
    p.add_argument("--precision", default="auto", help="auto, fp32, mixed, bf16 or fp16")
    p.add_argument("--modality", default="auto", help="auto, fluorescence or brightfield")
    p.add_argument("--augment", type=int, default=1, metavar="VIEWS",
                   help="views per tile whose detections are fused (1, 2, 4 or 8)")
    p.add_argument("--sets", nargs="+", default=DEFAULT_SETS, metavar="NAME:SPLIT")
    args = p.parse_args()
    model = cellmask.load_model(args.model, device="cpu", precision=args.precision)
    model = model.with_config(test_views=args.augment)
    print(f"# model {args.model}, precision {model.precision}, modality {args.modality}, "
          f"views {args.augment}")
    print(f"# {describe()}")
    for item in args.sets:
        name, _, split = item.partition(":")
        t0 = time.perf_counter()
        ev = evaluate_split(model, DATA[name], f"splits/{split}", modality=args.modality)
        s = ev.summary()
        print(f"\n## {name} {split}: {ev.images} images, {time.perf_counter() - t0:.1f} s on cpu")
        print(format_table(ev))
        print(f"F1@0.5 {s['f1@0.50']:.3f}  AP@0.5 {s['ap@0.50']:.3f}  AP@0.75 "
              f"{s['ap@0.75']:.3f}  mean AP 0.5:0.95 {s['mean_ap']:.3f}")


if __name__ == "__main__":
    main()
