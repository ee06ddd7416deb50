"""Time saved by tissue detection on brightfield slides, with the labels compared.

    python benchmarks/tissue_speed.py [--model nuclei] [--size 4096] [--background 0.6]

Two inputs: the CMU-1 H&E region (SVS, OpenSlide test data, 0.499 um/px) and a synthetic slide
of ``size`` px whose right ``background`` fraction is glass (scanner-like noise around the
CMU-1 region's glass brightness) and whose left part is CMU-1 tissue tiled. Each is segmented
twice in the same process, with and without the tissue mask (fresh outputs, one warm-up run
first); printed: seconds, tiles skipped, objects, and whether the labels are identical.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cellmask  # noqa: E402
from benchmarks.mosaic import DEFAULT_DATA  # noqa: E402
from cellmask.hardware import describe  # noqa: E402

CMU1 = DEFAULT_DATA.parent / "cmu1_he_region" / "CMU-1-Small-Region.svs"


def synthetic_slide(size: int, background: float, seed: int = 0) -> np.ndarray:
    """``(size, size, 3)`` uint8: CMU-1 tissue on the left, glass on the right."""
    import tifffile

    tissue = tifffile.imread(CMU1)
    rng = np.random.default_rng(seed)
    slide = np.clip(rng.normal(238, 2.0, (size, size, 3)), 0, 255).astype(np.uint8)
    width = int(round(size * (1 - background)))
    reps = (-(-size // tissue.shape[0]), -(-width // tissue.shape[1]), 1)
    slide[:, :width] = np.tile(tissue, reps)[:size, :width]
    return slide


def _zarr(path: Path, image: np.ndarray, chunk: int = 1024) -> Path:
    import zarr

    z = zarr.create_array(str(path), shape=image.shape, chunks=(chunk, chunk, 3),
                          dtype=image.dtype)
    z[:] = image
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nuclei")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--background", type=float, default=0.6)
    p.add_argument("--tile", type=int, default=1024)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = cellmask.load_model(args.model, device="cpu")
    print(f"# model {args.model}, precision {model.precision}")
    print(f"# {describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = {"CMU-1 region (SVS)": CMU1,
                  f"synthetic {args.size}^2, {args.background:.0%} glass":
                      _zarr(tmp / "slide.zarr", synthetic_slide(args.size, args.background))}
        cellmask.segment_zarr(CMU1, tmp / "warm.ome.zarr", model=model, progress=False,
                              measure=False)
        stages: dict[str, dict] = {}
        print("\n| input | tissue mask | seconds | tiles without tissue | objects | labels |")
        print("|---|---|---|---|---|---|")
        for k, (label, src) in enumerate(inputs.items()):
            out = {}
            for mask in (False, True):
                t0 = time.perf_counter()
                r = cellmask.segment_zarr(src, tmp / f"{k}{mask}.ome.zarr", model=model,
                                          tile=args.tile, progress=False, measure=False,
                                          tissue_mask=mask)
                seconds = time.perf_counter() - t0
                import zarr

                rec = zarr.open_group(str(r.path), mode="r").attrs["cellmask"]
                skipped = rec.get("tissue", {}).get("tiles_without_tissue", 0)
                out[mask] = (seconds, np.asarray(r.labels))
                same = ("" if not mask else
                        "identical" if np.array_equal(out[True][1], out[False][1]) else
                        "DIFFERENT")
                print(f"| {label} | {'on' if mask else 'off'} | {seconds:.1f} | {skipped} | "
                      f"{r.objects} | {same} |")
                stages[f"{label}, mask {'on' if mask else 'off'}"] = r.timings
            print(f"| {label} | speed-up | {out[False][0] / out[True][0]:.2f}x | | | |")
        print("\nWhere the time went (s):")
        for name, timings in stages.items():
            print(f"{name}: {({k: round(v, 2) for k, v in timings.items()})}")


if __name__ == "__main__":
    main()
