"""cellmask vs StarDist vs Cellpose on the same dense real-nuclei images, in one run, on the CPU.

Images: mosaics of 256x256 crops of real DSB2018 fluorescence nuclei from the densest images of
``fluo_test.txt`` (a test split, seen by no model's training or tuning), with exact ground truth
(``benchmarks/mosaic.py``). Each tool runs in a fresh process on the same pixels:

* cellmask: ``segment_zarr`` from a Zarr array (chunks 1024) to NGFF labels (pyramid included),
  default settings; the time without and with the measurements table is reported, and the
  split of the time (model, reading, stitching + painting + pyramid, measuring).
* StarDist (``benchmarks/peer_stardist.py``, optional extra: ``tensorflow-cpu stardist``):
  ``predict_instances_big`` (block 1024, overlap 64, context 64) and, up to 2048 px,
  ``predict_instances``; its fastest mode is the one compared. Trained here from scratch on
  ``fluo_train`` (no pretrained model can be downloaded).
* Cellpose (``benchmarks/peer_cellpose.py``, optional extra ``cellpose<4``): random weights,
  for timing only (no AP is reported for it).

    bash benchmarks/peers_setup.sh       # the peers' environments; StarDist trained (115 min)
    python benchmarks/peers.py --sizes 2048 4096 \\
        --stardist-python /path/to/peers-venv/bin/python --stardist-model runs/peers/stardist \\
        --cellpose-python /path/to/cellpose-venv/bin/python

Every tool first segments a 640x1280 crop of the image untimed in the same process (first-call
costs are paid once per process, not per slide); the warm-up time of cellmask is printed too.
A peer whose interpreter is not given is left out (and said so). Threads: every tool uses the
machine's cores (2 here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellmask.hardware import describe  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.mosaic import DEFAULT_DATA, dense_mosaic  # noqa: E402

CELLMASK_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import cellmask, dask.array, zarr  # library imports happen once per process, before timing
m = cellmask.load_model()  # as the peers load theirs before their timed call
warm = time.perf_counter()
cellmask.segment_zarr({warm_src!r}, {warm_out!r}, model=m, progress=False)  # untimed warm-up
warm = time.perf_counter() - warm
t0 = time.perf_counter()
r = cellmask.segment_zarr({src!r}, {out!r}, model=m, progress=False)
wall = time.perf_counter() - t0
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(json.dumps({{"objects": r.objects, "timings": r.timings, "wall": wall, "warm_up_s": warm,
                  "hwm_kib": int(hwm), "precision": m.precision,
                  "workers": m.default_workers()}}))
"""


def ap50(truth: np.ndarray, labels: np.ndarray) -> float:
    from cellmask.metrics import Evaluation

    ev = Evaluation(thresholds=(0.5,))
    ev.add(truth, labels)
    return float(ev.table()["ap"][0])


def run_cellmask(src: Path, out: Path, warm_src: Path) -> dict:
    code = CELLMASK_CHILD.format(root=str(ROOT), src=str(src), out=str(out),
                                 warm_src=str(warm_src), warm_out=str(out) + ".warm")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"cellmask failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_peer(python: str, script: str, extra: list[str]) -> dict:
    proc = subprocess.run([python, str(ROOT / "benchmarks" / script), *extra],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--split", default="fluo_test.txt")
    p.add_argument("--stardist-python", help="interpreter with tensorflow-cpu and stardist")
    p.add_argument("--stardist-model", default=str(ROOT / "runs" / "peers" / "stardist"))
    p.add_argument("--cellpose-python", help="interpreter with cellpose 3")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {describe()}; images from {args.split}")
    budget = Path(args.stardist_model) / "budget.json"
    if args.stardist_python and budget.is_file():
        print(f"# StarDist model {args.stardist_model}: {budget.read_text().strip()}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        images = {}
        for size in args.sizes:
            import zarr

            image, truth = dense_mosaic(size, data=Path(args.data), split=args.split)
            z = zarr.create_array(str(tmp / f"m{size}.zarr"), shape=image.shape,
                                  chunks=(1024, 1024), dtype=image.dtype)
            z[:] = image
            np.save(tmp / f"m{size}.npy", image)
            images[size] = truth
        # every tool first segments this small image, untimed: first-call costs (thread pools,
        # graph tracing, allocator growth) are paid once per process, not per slide
        warm = image[:640, :1280]  # two tiles of cellmask: both tile workers start
        zarr.create_array(str(tmp / "warm.zarr"), shape=warm.shape, chunks=(512, 512),
                          dtype=warm.dtype)[:] = warm
        np.save(tmp / "warm.npy", warm)
        for size, truth in images.items():
            mpx = size * size / 1e6
            row = {"size": size, "annotated": int(truth.max())}
            cm = run_cellmask(tmp / f"m{size}.zarr", tmp / f"o{size}.zarr", tmp / "warm.zarr")
            t = cm["timings"]
            import zarr

            labels = np.asarray(zarr.open_array(str(tmp / f"o{size}.zarr/labels/cellmask/0")))
            to_labels = t["total"] - t["measure"]
            row["cellmask"] = {
                "seconds_to_labels": round(to_labels, 2),
                "seconds_with_table": round(t["total"], 2),
                "mpx_s": round(mpx / to_labels, 3), "mpx_s_with_table": round(mpx / t["total"], 3),
                "objects": cm["objects"], "ap50": round(ap50(truth, labels), 4),
                "peak_gib": round(cm["hwm_kib"] / 2**20, 2), "precision": cm["precision"],
                "split_s": {k: round(v, 2) for k, v in t.items()},
                "workers": cm["workers"], "warm_up_s": round(cm["warm_up_s"], 2),
                "io_stitch_paint_pct": round(100 * (to_labels - t["network_wall"]) / to_labels, 1)}
            print(json.dumps({"size": size, "cellmask": row["cellmask"]}), flush=True)
            if args.stardist_python:
                sd = run_peer(args.stardist_python, "peer_stardist.py",
                              ["predict", "--model", args.stardist_model,
                               "--images", str(tmp / f"m{size}.npy")])
                modes = {}
                for r in sd["rows"]:
                    lab = np.load(r["labels"])
                    modes[r["mode"]] = {"seconds": round(r["seconds"], 2),
                                        "mpx_s": round(mpx / r["seconds"], 3),
                                        "objects": int(lab.max()),
                                        "ap50": round(ap50(truth, lab), 4)}
                best = min(modes, key=lambda k: modes[k]["seconds"])
                row["stardist"] = {**modes[best], "mode": best, "all_modes": modes,
                                   "peak_gib": round(sd["hwm_kib"] / 2**20, 2)}
                print(json.dumps({"size": size, "stardist": row["stardist"]}), flush=True)
            if args.cellpose_python:
                cp = run_peer(args.cellpose_python, "peer_cellpose.py",
                              ["--warm-up", str(tmp / "warm.npy"),
                               "--images", str(tmp / f"m{size}.npy")])
                r = cp["rows"][0]
                row["cellpose"] = {"seconds": round(r["seconds"], 2),
                                   "mpx_s": round(mpx / r["seconds"], 3),
                                   "objects_random_weights": r["objects"],
                                   "peak_gib": round(cp["hwm_kib"] / 2**20, 2)}
                print(json.dumps({"size": size, "cellpose": row["cellpose"]}), flush=True)
            rows.append(row)
    print()
    print("| image | tool | s | Mpx/s | objects (annotated) | AP@0.5 | peak GiB "
          "| cellmask speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cm = row["cellmask"]
        print(f"| {row['size']}^2 | cellmask (to NGFF labels) | {cm['seconds_to_labels']} | "
              f"{cm['mpx_s']} | {cm['objects']} ({row['annotated']}) | {cm['ap50']:.3f} | "
              f"{cm['peak_gib']} | - |")
        print(f"| | cellmask + measurements table | {cm['seconds_with_table']} | "
              f"{cm['mpx_s_with_table']} | | | | |")
        if "stardist" in row:
            sd = row["stardist"]
            print(f"| | StarDist ({sd['mode']}) | {sd['seconds']} | {sd['mpx_s']} | "
                  f"{sd['objects']} | {sd['ap50']:.3f} | {sd['peak_gib']} | "
                  f"**{sd['seconds'] / cm['seconds_to_labels']:.2f}x** |")
        if "cellpose" in row:
            cp = row["cellpose"]
            print(f"| | Cellpose (random weights) | {cp['seconds']} | {cp['mpx_s']} | "
                  f"({cp['objects_random_weights']}) | - | {cp['peak_gib']} | "
                  f"**{cp['seconds'] / cm['seconds_to_labels']:.1f}x** |")
    for row in rows:
        cm = row["cellmask"]
        print(f"{row['size']}^2 cellmask time split (s; prepare/network/masks are summed over "
              f"{cm['workers']} workers): {cm['split_s']}; network share of the time to labels "
              f"{100 - cm['io_stitch_paint_pct']:.1f}%, everything else (reading, normalising, "
              f"masks to pixels, stitching, painting, pyramid) {cm['io_stitch_paint_pct']}%; "
              f"precision {cm['precision']}")
    if not args.stardist_python:
        print("StarDist left out: pass --stardist-python")
    if not args.cellpose_python:
        print("Cellpose left out: pass --cellpose-python")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
