"""Tiled vs whole-image agreement on dense real nuclei, for several tiles and halos.

A mosaic of the densest DSB2018 fluorescence training crops (``benchmarks/mosaic.py``, seed 1)
is segmented whole (``Model.segment``, one tile) and tiled (``segment_zarr``); printed per
setting: the share of whole-image objects found identical (IoU >= 0.9) in the tiled labels,
the object counts and AP@0.5 of both against the annotation.

    python benchmarks/seams.py --size 2048 --settings 1024:64 256:64 256:96 256:128
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import agreement  # noqa: E402
from cellmask.hardware import describe  # noqa: E402


def main() -> None:
    import cellmask

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--settings", nargs="+", default=["1024:64", "256:64", "256:96", "256:128"],
                   help="TILE:HALO pairs")
    p.add_argument("--precision", default="auto", help="auto, fp32, mixed, bf16")
    args = p.parse_args()
    print(describe())
    model = cellmask.load_model(device="cpu", precision=args.precision)
    print(f"precision {model.precision}")
    for item in args.settings:
        tile, halo = (int(v) for v in item.split(":"))
        result = agreement(tile, halo, size=args.size, model=model)
        print(f"{args.size} mosaic, tile {tile}, halo {halo}, {model.precision}:",
              json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
