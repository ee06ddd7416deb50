"""A batch of small images: one ``cellmask segment FOLDER --out OUT`` against a Python loop.

The first 20 images of DSB2018 ``splits/test.txt`` are written as TIFFs to a temporary folder.
Measured, each in a fresh process: the CLI batch (start-up, model loading, 20 outputs and the
combined table), the same as a Python loop (``import cellmask``, ``load_model`` and
``segment_zarr`` per image), and the loop's segmenting alone (the figure a running notebook
sees). The two are run in alternation ``--rounds`` times (a shared VM's speed drifts by up to
2x between minutes) and the medians are compared. Printed with the CPU's description.

    python benchmarks/batch_speed.py [--images 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellmask.hardware import describe  # noqa: E402

LOOP = """
import sys, time
from pathlib import Path
t0 = time.perf_counter()
import cellmask
model = cellmask.load_model()
t1 = time.perf_counter()
for f in sorted(Path(sys.argv[1]).glob("*.tif")):
    cellmask.segment_zarr(f, Path(sys.argv[2]) / (f.stem + ".ome.zarr"), model=model,
                          progress=False)
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
"""


def main() -> None:
    import numpy as np
    import tifffile

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/dsb2018"))
    args = p.parse_args()
    data = Path(args.data)
    names = (data / "splits" / "test.txt").read_text().split()[:args.images]
    print(describe())
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "images"
        folder.mkdir()
        for name in names:
            tifffile.imwrite(folder / f"{name}.tif", tifffile.imread(data / "images" /
                                                                    f"{name}.tif"))
        clis, loops, setups, segs = [], [], [], []
        for k in range(args.rounds):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cellmask", "--quiet", "segment", str(folder),
                            "--out", str(Path(d) / f"cli{k}")], check=True, capture_output=True)
            clis.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", LOOP, str(folder),
                                  str(Path(d) / f"loop{k}")],
                                 check=True, capture_output=True, text=True)
            loops.append(time.perf_counter() - t0)
            setup, segmenting = (float(v) for v in out.stdout.split())
            setups.append(setup)
            segs.append(segmenting)
            print(f"round {k + 1}: CLI {clis[-1]:.2f} s, loop {loops[-1]:.2f} s (imports + "
                  f"model {setup:.2f} s, segmenting {segmenting:.2f} s)", flush=True)
    cli, loop = float(np.median(clis)), float(np.median(loops))
    setup, segmenting = float(np.median(setups)), float(np.median(segs))
    print(f"{len(names)} DSB2018 test images, medians of {args.rounds} rounds: CLI batch "
          f"{cli:.2f} s; Python loop in a fresh process {loop:.2f} s (imports + model "
          f"{setup:.2f} s, segmenting {segmenting:.2f} s); CLI / loop {cli / loop:.2f}x, "
          f"CLI / segmenting alone {cli / segmenting:.2f}x")


if __name__ == "__main__":
    main()
