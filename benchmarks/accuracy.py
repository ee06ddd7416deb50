"""Evaluation tables of a model on the DSB2018 test splits (pooled over objects).

    python benchmarks/accuracy.py [--model nuclei] [--precision fp32] [--splits test.txt ...]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nuclei")
    p.add_argument("--precision", default="auto", help="auto, fp32, mixed, bf16 or fp16")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--splits", nargs="+", default=["test.txt", "fluo_test.txt", "other_test.txt"])
    args = p.parse_args()
    model = cellmask.load_model(args.model, device="cpu", precision=args.precision)
    print(f"# model {args.model}, precision {model.precision}")
    for split in args.splits:
        t0 = time.perf_counter()
        ev = evaluate_split(model, args.data, f"splits/{split}")
        s = ev.summary()
        print(f"\n## {split}: {ev.images} images, {time.perf_counter() - t0:.1f} s on cpu")
        print(format_table(ev))
        print(f"AP@0.5 {s['ap@0.50']:.3f}  AP@0.75 {s['ap@0.75']:.3f}  "
              f"mean AP 0.5:0.95 {s['mean_ap']:.3f}")


if __name__ == "__main__":
    main()
