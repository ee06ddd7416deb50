"""Render docs/cmu1_overlay.png: cellmask's nuclei on the CMU-1 H&E region (epidermis, dermis).

    .venv/bin/python scripts/he_overlay.py [--model nuclei] [--out docs/cmu1_overlay.png]

Segments ``../shared/data/cmu1_he_region/CMU-1-Small-Region.svs`` (OpenSlide test data) end to
end (SVS in, OME-Zarr labels out, tissue mask and stain separation as by default), prints the
number of nuclei and the time, and writes a picture: a thumbnail of the region with the two
crops marked, and the crops at full resolution with each nucleus outlined.
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
from cellmask.hardware import describe  # noqa: E402

SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cmu1_he_region" / \
    "CMU-1-Small-Region.svs"
#: (name, y0, x0) of the 512 x 512 crops shown, in level-0 pixels
CROPS = (("epidermis", 1724, 1034), ("dermis", 2144, 524))
SIDE = 512


def outlined(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    out = rgb.copy()
    out[find_boundaries(labels, mode="inner")] = (0, 255, 64)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nuclei")
    p.add_argument("--out", default="docs/cmu1_overlay.png")
    p.add_argument("--augment", type=int, default=1, metavar="VIEWS",
                   help="views per tile whose detections are fused (1, 2, 4 or 8)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import imageio.v3 as iio
    import tifffile

    model = cellmask.load_model(args.model, device="cpu").with_config(test_views=args.augment)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = cellmask.segment_zarr(SVS, Path(tmp) / "cmu1.ome.zarr", model=model,
                                       progress=False)
        seconds = time.perf_counter() - t0
        labels = np.asarray(result.labels)
    image = tifffile.imread(SVS)
    print(f"{result.objects} nuclei in {seconds:.1f} s ({image.shape[0] * image.shape[1] / 1e6:.1f}"
          f" Mpx, model {args.model}, precision {model.precision}, views {args.augment}); "
          f"{describe()}")
    thumb_step = 6
    thumb = image[::thumb_step, ::thumb_step].copy()
    panels = []
    for _, y0, x0 in CROPS:
        ty, tx, ts = y0 // thumb_step, x0 // thumb_step, SIDE // thumb_step
        thumb[ty:ty + ts, tx:tx + 2] = thumb[ty:ty + ts, tx + ts - 2:tx + ts] = (0, 200, 60)
        thumb[ty:ty + 2, tx:tx + ts] = thumb[ty + ts - 2:ty + ts, tx:tx + ts] = (0, 200, 60)
        panels.append(outlined(image[y0:y0 + SIDE, x0:x0 + SIDE],
                               labels[y0:y0 + SIDE, x0:x0 + SIDE]))
    h = max(thumb.shape[0], SIDE)
    canvas = np.full((h, thumb.shape[1] + 2 * SIDE + 20, 3), 255, np.uint8)
    canvas[:thumb.shape[0], :thumb.shape[1]] = thumb
    x = thumb.shape[1] + 10
    for panel in panels:
        canvas[:SIDE, x:x + SIDE] = panel
        x += SIDE + 10
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.out, canvas)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
