"""End-to-end and model-only throughput on a GPU (or, for a dry run, the CPU).

For each size, a mosaic of real nuclei (tiled from ``benchmarks/mosaic.py``'s 2048 mosaic, so
building a 16k image takes seconds) is written to a Zarr array and segmented with
``segment_zarr`` (Zarr in, NGFF labels out); model-only throughput is the network alone on a
batch of 1024 px tiles. Each precision (fp32, mixed, bf16) is measured in the same run.

    python benchmarks/gpu_bench.py --sizes 8192 16384 --device cuda --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellmask.hardware import describe  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cellmask  # noqa: E402
from benchmarks.mosaic import dense_mosaic  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_only(model, device: str, image: np.ndarray, tile: int, batch: int,
               repeats: int = 5) -> float:
    from cellmask.normalize import normalize

    image = np.tile(image, (2, 2))[:tile, :tile]  # a tile of real nuclei (the mosaic is 2048)
    chw = normalize(image)
    model.detect_batch([chw] * batch)  # warm-up (cudnn autotuning, allocator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.detect_batch([chw] * batch)
    sync(device)
    return repeats * batch * tile * tile / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precisions", nargs="+", default=["fp32", "mixed", "bf16"])
    p.add_argument("--out", default=".")
    p.add_argument("--data", help="annotated images (images/, masks/, splits/) for the mosaic "
                   "(default: the project's DSB2018 folder)")
    p.add_argument("--split", default="fluo_train.txt")
    args = p.parse_args()
    import zarr

    machine = describe()  # CPU model, capability, threads (and the GPU's name when there is one)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else machine
    print(f"device: {name}; {machine}", flush=True)
    base, _ = dense_mosaic(2048, **({"data": Path(args.data)} if args.data else {}),
                           split=args.split)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes:
            src = Path(d) / f"src_{size}.zarr"
            z = zarr.create_array(str(src), shape=(size, size), chunks=(1024, 1024),
                                  dtype=np.uint8)
            for y in range(0, size, 2048):
                for x in range(0, size, 2048):
                    z[y:y + 2048, x:x + 2048] = base[:min(2048, size - y), :min(2048, size - x)]
            for precision in args.precisions:
                model = cellmask.load_model(device=args.device, precision=precision)
                mo = model_only(model, args.device, base, args.tile, args.batch)
                t0 = time.perf_counter()
                r = cellmask.segment_zarr(src, Path(d) / f"out_{size}_{precision}.zarr",
                                          model=model, tile=args.tile, batch_size=args.batch,
                                          progress=False)
                total = time.perf_counter() - t0
                row = {"device": name, "machine": machine, "size": size, "precision": precision,
                       "objects": r.objects, "seconds": round(total, 2),
                       "end_to_end_mpx_s": round(size * size / 1e6 / total, 2),
                       "model_only_mpx_s": round(mo, 2),
                       "timings": {k: round(v, 2) for k, v in r.timings.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out, "gpu_bench.json").write_text(json.dumps(rows, indent=1))
    print("\n| device | image | precision | objects | end-to-end Mpx/s | model-only Mpx/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['size']}^2 | {r['precision']} | {r['objects']} | "
              f"{r['end_to_end_mpx_s']} | {r['model_only_mpx_s']} |")


if __name__ == "__main__":
    main()
