"""Whole-image throughput and memory of ``segment_zarr`` on dense real-nuclei mosaics.

For each size, a mosaic of real DSB2018 fluorescence nuclei (``benchmarks/mosaic.py``) is
written to a Zarr array (chunks 1024) and segmented in a fresh process (Zarr in, NGFF labels
and measurements out); the process's peak resident memory (VmHWM, torch included) and the time
split (network, the rest of the time to labels, measurements) are
printed. Also: tiled (tile 256, halo 64) vs whole-image agreement on a 1024 mosaic.

    python benchmarks/throughput.py --sizes 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellmask.hardware import describe  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.mosaic import dense_mosaic  # noqa: E402

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import cellmask, dask.array, zarr  # library imports happen once per process, before timing
model = cellmask.load_model()
r = cellmask.segment_zarr({src!r}, {out!r}, model=model, tile={tile}, halo=64, progress=False)
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(json.dumps({{"objects": r.objects, "timings": r.timings, "hwm_kib": int(hwm),
                  "workers": model.default_workers(), "precision": model.precision}}))
"""


def run_size(size: int, tile: int, tmp: Path) -> dict:
    import zarr

    image, truth = dense_mosaic(size)
    src = tmp / f"mosaic_{size}.zarr"
    z = zarr.create_array(str(src), shape=image.shape, chunks=(1024, 1024), dtype=image.dtype)
    z[:] = image
    out = tmp / f"out_{size}.zarr"
    code = CHILD.format(root=str(ROOT), src=str(src), out=str(out), tile=tile)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    t = res["timings"]
    to_labels = t["total"] - t["measure"]
    network = t["network_wall"]  # wall time with at least one worker in the network
    row = {"size": size, "annotated": int(truth.max()), "objects": res["objects"],
           "seconds": round(to_labels, 2), "mpx_s": round(size * size / 1e6 / to_labels, 3),
           "network_s": round(network, 2),
           "other_s": round(to_labels - network, 2),
           "other_pct": round(100 * (to_labels - network) / to_labels, 1),
           "measure_s": round(t["measure"], 2),
           "mpx_s_with_table": round(size * size / 1e6 / t["total"], 3),
           "peak_gib": round(res["hwm_kib"] / 1024**2, 2), "workers": res["workers"],
           "precision": res["precision"], "timings": {k: round(v, 2) for k, v in t.items()}}
    if size <= 4096:
        from cellmask.metrics import Evaluation

        ev = Evaluation(thresholds=(0.5,))
        ev.add(truth, np.asarray(zarr.open_array(str(out / "labels" / "cellmask" / "0"))))
        row["ap50"] = round(float(ev.table()["ap"][0]), 3)
    return row


def agreement(tile: int = 256, halo: int = 64, size: int = 1024, model=None) -> dict:
    import cellmask
    from cellmask.metrics import Evaluation, iou_matrix

    image, truth = dense_mosaic(size, seed=1)
    model = model or cellmask.load_model(device="cpu")
    whole = model.segment(image, tile=4096)
    with tempfile.TemporaryDirectory() as d:
        tiled = np.asarray(cellmask.segment_zarr(image, Path(d) / "o.zarr", model=model,
                                                 tile=tile, halo=halo, progress=False).labels)
    iou = iou_matrix(whole, tiled)
    identical = int((iou.max(axis=1) >= 0.9).sum()) if iou.size else 0
    ev_w, ev_t = Evaluation(thresholds=(0.5,)), Evaluation(thresholds=(0.5,))
    ev_w.add(truth, whole)
    ev_t.add(truth, tiled)
    return {"whole_objects": int(whole.max()), "tiled_objects": int(tiled.max()),
            "identical_iou90_pct": round(100 * identical / max(1, whole.max()), 2),
            "ap50_whole": round(float(ev_w.table()["ap"][0]), 4),
            "ap50_tiled": round(float(ev_t.table()["ap"][0]), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--no-agreement", action="store_true")
    args = p.parse_args()

    print(f"machine: {describe()}; device cpu")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes:
            rows.append(run_size(size, args.tile, Path(d)))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| image | objects | s to labels | Mpx/s | network s | reading+stitching+painting "
          "| + measurements s | Mpx/s with table | peak GiB | AP@0.5 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}^2 | {r['objects']} | {r['seconds']} | {r['mpx_s']} | "
              f"{r['network_s']} | {r['other_s']} s ({r['other_pct']}%) | {r['measure_s']} | "
              f"{r['mpx_s_with_table']} | {r['peak_gib']} | {r.get('ap50', '-')} |")
    print("network s = wall time with the network running (in any worker); the rest of the "
          "time to labels (reading, normalising, masks to pixels, records, stitching, painting, "
          "pyramid, setup) is the next column")
    if not args.no_agreement:
        print("tiled (256/64) vs whole on a 1024 mosaic:", json.dumps(agreement()))


if __name__ == "__main__":
    main()
