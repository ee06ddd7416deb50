"""Copy the splits a GPU run needs into a compact folder that can travel with the repository.

    python benchmarks/pack_data.py ../shared/data/dsb2018 .gpu/dsb2018

Images and masks are rewritten as zlib-compressed TIFFs with a horizontal predictor
(pixel-identical, about 20% smaller than the originals); the split lists are
copied unchanged.
"""

import shutil
import sys
from pathlib import Path

import tifffile

#: Training and model selection only: the tree that travels to a GPU machine is limited to
#: 64 MiB, so the test splits are evaluated on the CPU afterwards.
SPLITS = ("train", "val", "fluo_val")


def main(src: str, dst: str) -> None:
    src_p, dst_p = Path(src), Path(dst)
    for sub in ("images", "masks", "splits"):
        (dst_p / sub).mkdir(parents=True, exist_ok=True)
    names = set()
    for split in SPLITS:
        shutil.copy(src_p / "splits" / f"{split}.txt", dst_p / "splits" / f"{split}.txt")
        names |= {n for n in (src_p / "splits" / f"{split}.txt").read_text().split() if n}
    for name in sorted(names):
        for sub in ("images", "masks"):
            out = dst_p / sub / f"{name}.tif"
            if not out.exists():
                tifffile.imwrite(out, tifffile.imread(src_p / sub / f"{name}.tif"),
                                 compression="zlib", compressionargs={"level": 9}, predictor=True)
    print(f"packed {len(names)} images into {dst_p}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
