"""The README's worked example: quantify a 2-channel image from segmentation to a per-cell table
and a QuPath import, and render the histogram of the marker per cell into docs/.

The image: channel 0 ("DAPI") is the real nuclei image shipped with cellmask (the StarDist
sample, BSD-3-Clause); channel 1 ("CD45") is a **synthetic** membrane-like marker made here
from that sample's annotation: a third of the cells (a fixed random choice) express it in a
ring around the nucleus, the rest do not, plus camera-like noise. It is written as an OME-TIFF
with channel names and a 0.5 um pixel size, then processed exactly as a user would:

    cellmask segment two_channel.ome.tif --channel 0 --cell-expansion 3 --out quant.ome.zarr
    cellmask export-geojson quant.ome.zarr

    python scripts/quantify_example.py [--out runs/quantify]   (needs matplotlib for the plot)
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("quantify_example")


def make_image(path: Path, seed: int = 0) -> tuple[np.ndarray, set[int]]:
    """Write the 2-channel OME-TIFF; returns it ``(2, Y, X)`` and the expressing cell ids."""
    import tifffile
    from skimage.segmentation import expand_labels

    from cellmask.samples import load_sample

    dapi, truth = load_sample()
    rng = np.random.default_rng(seed)
    ids = np.unique(truth)[1:]
    positive = set(rng.choice(ids, size=len(ids) // 3, replace=False).tolist())
    cells = expand_labels(truth, 6)  # 3 um at 0.5 um/px
    ring = (cells > 0) & (truth == 0)
    marker = np.zeros(truth.shape, np.float64)
    expressing = np.isin(cells, list(positive)) & ring
    marker[expressing] = 900.0
    marker += rng.normal(120, 25, marker.shape)
    marker = np.clip(marker, 0, 65535).astype(np.uint16)
    image = np.stack([dapi.astype(np.uint16), marker])
    tifffile.imwrite(path, image, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD45"]},
                                            "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    return image, positive


def main() -> None:
    import pandas as pd

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/quantify")
    p.add_argument("--plot", default=str(ROOT / "docs" / "cd45_per_cell.png"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, positive = make_image(out / "two_channel.ome.tif")
    store = out / "quant.ome.zarr"
    cli = [sys.executable, "-m", "cellmask", "--quiet"]
    subprocess.run(cli + ["segment", str(out / "two_channel.ome.tif"), "--channel", "0",
                          "--cell-expansion", "3", "--out", str(store), "--overwrite"],
                   check=True)
    subprocess.run(cli + ["export-geojson", str(store), "--overwrite"], check=True)
    table = pd.read_parquet(store / "labels/cellmask/compartments.parquet")
    cd45 = table["cell.mean.CD45"]
    threshold = 400.0
    found = table["label"][cd45 > threshold]
    log.info("%d cells; %d CD45+ (cell mean > %g); %d cells expressed the marker in the "
             "synthetic image", len(table), len(found), threshold, len(positive))
    log.info("columns such as %s", ", ".join(["cell.mean.CD45", "cytoplasm.mean.CD45",
                                              "nucleus.mean.DAPI", "nucleus.area_um2"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.hist(cd45, bins=40, color="#3b7dd8")
    ax.axvline(threshold, color="#d8703b", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("CD45 (synthetic), mean per cell")
    ax.set_ylabel("cells")
    ax.set_title(f"{len(table)} cells, {len(found)} CD45+ (cellmask, 3 um expansion)")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(args.plot)
    log.info("histogram written to %s; QuPath objects %s", args.plot,
             store.with_name("quant.geojson"))


if __name__ == "__main__":
    main()
