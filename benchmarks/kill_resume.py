"""SIGKILL-and-resume cycles on a whole image: the resumed output must equal a clean run's.

A 4096x4096 mosaic of real nuclei (Zarr) is segmented once cleanly; then the same command is
started again and again on a second output and killed with SIGKILL after a random delay. When a
restarted run completes before its kill, its labels are compared with the clean run's and a new
series starts from an empty output; this goes on until ``--cycles`` kills. Prints the kills, the
tiles found done at each, and whether every completed series is identical to the clean run.

    python benchmarks/kill_resume.py --size 4096 --cycles 30
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.mosaic import dense_mosaic  # noqa: E402

RUN = ("import sys; sys.path.insert(0, sys.argv[3]); import cellmask; "
       "cellmask.segment_zarr(sys.argv[1], sys.argv[2], tile=int(sys.argv[4]), halo=64, "
       "progress=False)")


STARTUP = "import sys; sys.path.insert(0, sys.argv[1]); import cellmask; cellmask.load_model()"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--cycles", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay", type=float, default=0.3,
                   help="kills come between half the start-up time (interpreter, imports, "
                        "model) and the start-up plus this fraction of a clean run's work")
    args = p.parse_args()
    import pandas as pd
    import zarr

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        image, _ = dense_mosaic(args.size)
        src = d / "src.zarr"
        zarr.create_array(str(src), shape=image.shape, chunks=(1024, 1024),
                          dtype=image.dtype)[:] = image
        cmd = lambda out: [sys.executable, "-c", RUN, str(src), str(out), str(ROOT),  # noqa: E731
                           str(args.tile)]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", STARTUP, str(ROOT)], check=True)
        startup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(cmd(d / "clean.zarr"), check=True)
        clean_s = time.perf_counter() - t0
        work_s = max(clean_s - startup_s, 0.1)
        print(f"clean run: {clean_s:.1f} s, of which start-up {startup_s:.1f} s", flush=True)
        tiles = d / "killed.zarr" / "labels" / "cellmask" / ".run" / "tiles"
        clean = np.asarray(zarr.open_array(str(d / "clean.zarr/labels/cellmask/0")))

        def identical() -> bool:
            b = np.asarray(zarr.open_array(str(d / "killed.zarr/labels/cellmask/0")))
            return bool(np.array_equal(clean, b))

        kills, done_counts, completed = 0, [], []
        while kills < args.cycles:
            proc = subprocess.Popen(cmd(d / "killed.zarr"))
            time.sleep(float(rng.uniform(0.5 * startup_s, startup_s + args.max_delay * work_s)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                done_counts.append(len([f for f in tiles.glob("*_*.npz")
                                        if ".tmp" not in f.name]))
                continue
            # this run finished after earlier kills: check it, then start a new series
            completed.append(identical())
            shutil.rmtree(d / "killed.zarr")
        subprocess.run(cmd(d / "killed.zarr"), check=True)
        completed.append(identical())
        print(f"series completed after kills: {len(completed)}, all identical: {all(completed)}")
        a = clean
        b = np.asarray(zarr.open_array(str(d / "killed.zarr/labels/cellmask/0")))
        ta = pd.read_parquet(d / "clean.zarr/labels/cellmask/measurements.parquet")
        tb = pd.read_parquet(d / "killed.zarr/labels/cellmask/measurements.parquet")
        print(f"{args.size}x{args.size}, tile {args.tile}: {kills} SIGKILLs; tiles done at each "
              f"kill: {done_counts}")
        print(f"labels identical: {np.array_equal(a, b)} ({int(a.max())} objects); "
              f"measurements identical: {ta.equals(tb)}")


if __name__ == "__main__":
    main()
