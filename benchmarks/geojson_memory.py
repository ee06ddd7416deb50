"""Peak memory of the QuPath GeoJSON export as the number of objects grows.

A cellmask output is written directly (NGFF labels with their pyramid and a measurements
table of the same columns a run writes), holding a regular grid of small nuclei (discs of
radius 2.5 px every ``--spacing`` px), for each count in ``--objects``. Each export runs
``cellmask.export_geojson`` in a fresh process, which reports its peak resident memory
(``VmHWM``, Linux); the
baseline is the peak of a fresh process that imports cellmask and opens the same output,
measured in the same run. Bounded memory means the export's peak stays flat while the count
grows by 10x. Printed with the CPU's description.

    python benchmarks/geojson_memory.py [--objects 100000 1000000] [--spacing 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellmask.hardware import describe  # noqa: E402

EXPORT = """
import json, sys, time
t0 = time.perf_counter()
import cellmask
from cellmask.labels_store import labels_level0
labels = labels_level0(sys.argv[1])
if sys.argv[3] == "export":
    cellmask.export_geojson(sys.argv[1], sys.argv[2])
# VmHWM: this process's own peak (ru_maxrss would include the parent's memory at the fork)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mib": int(hwm.split()[1]) / 1024}))
"""

#: The measurement columns of a run's table besides the box (values are synthetic).
COLUMNS = ("area", "centroid-0", "centroid-1", "eccentricity", "solidity", "perimeter",
           "axis_major_length", "axis_minor_length", "orientation", "intensity_mean",
           "intensity_min", "intensity_max", "intensity_sum", "score", "mask_confidence")


def write_output(root: Path, objects: int, spacing: int, chunk: int = 1024) -> tuple[int, int]:
    """A cellmask output at ``root`` with ``objects`` disc nuclei on a grid; returns its shape."""
    import pandas as pd

    from cellmask.labels_store import create_labels, write_pyramid

    per_row = int(np.ceil(np.sqrt(objects)))
    rows = -(-objects // per_row)
    shape = (rows * spacing, per_row * spacing)
    group = create_labels(root, "cellmask", shape, chunk)
    yy, xx = np.mgrid[:spacing, :spacing]
    disc = (yy - spacing / 2 + 0.5) ** 2 + (xx - spacing / 2 + 0.5) ** 2 <= 2.5 ** 2
    level0 = group["0"]
    for y in range(0, shape[0], chunk):
        for x in range(0, shape[1], chunk):
            h, w = min(chunk, shape[0] - y), min(chunk, shape[1] - x)
            gy = (y + np.arange(h)) // spacing
            gx = (x + np.arange(w)) // spacing
            ids = gy[:, None] * per_row + gx[None, :] + 1
            inside = np.tile(disc, (-(-h // spacing) + 1, -(-w // spacing) + 1))
            inside = inside[y % spacing:y % spacing + h, x % spacing:x % spacing + w]
            level0[y:y + h, x:x + w] = np.where(inside & (ids <= objects), ids, 0).astype(
                np.int32)
    write_pyramid(group)
    k = np.arange(objects)
    cy, cx = (k // per_row) * spacing, (k % per_row) * spacing
    ys, xs = np.nonzero(disc)
    table = {"label": k + 1, "bbox-0": cy + ys.min(), "bbox-1": cx + xs.min(),
             "bbox-2": cy + ys.max() + 1, "bbox-3": cx + xs.max() + 1}
    rng = np.random.default_rng(0)
    for name in COLUMNS:
        table[name] = rng.random(objects)
    # row groups as cellmask writes its tables
    pd.DataFrame(table).to_parquet(Path(root) / "labels" / "cellmask" / "measurements.parquet",
                                   index=False, row_group_size=50_000)
    return shape


def child(store: Path, out: Path, what: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", EXPORT, str(store), str(out), what],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--spacing", type=int, default=8)
    args = p.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as d:
        for n in args.objects:
            store = Path(d) / f"grid{n}.ome.zarr"
            t0 = time.perf_counter()
            shape = write_output(store, n, args.spacing)
            made = time.perf_counter() - t0
            out = Path(d) / f"grid{n}.geojson"
            base = child(store, out, "open")
            run = child(store, out, "export")
            with open(out) as fh:  # every object is in the file
                features = sum(1 for line in fh if line.startswith('{"type": "Feature"'))
            size = out.stat().st_size / 2 ** 20
            print(f"{n:,} objects ({shape[0]}x{shape[1]} px, written in {made:.0f} s): export "
                  f"{run['seconds']:.1f} s, peak {run['peak_mib']:.0f} MiB against "
                  f"{base['peak_mib']:.0f} MiB for import + open alone; {features:,} features, "
                  f"{size:.0f} MiB of GeoJSON", flush=True)
            out.unlink()


if __name__ == "__main__":
    main()
