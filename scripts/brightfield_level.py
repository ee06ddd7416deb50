"""Where a model's brightfield training images sit: the value to give ``brightfield_level``.

    python scripts/brightfield_level.py --data ../shared/data/dsb2018 --split splits/other_train.txt
        [--percentiles 1 99.8] [--second-stain 0]

For every brightfield image of the split (decided as a run decides it), the 75th percentile of
the network input the appearance mapping makes of its tissue region (without any cap, on the
strided view a run estimates from); printed: their median, which is the level to export the
model with (``cellmask export ... --set brightfield_level=VALUE``), and their spread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellmask.appearance import estimate  # noqa: E402
from cellmask.evaluate import iter_split  # noqa: E402
from cellmask.normalize import as_channels_first, sample_view  # noqa: E402
from cellmask.survey import tissue_level  # noqa: E402
from cellmask.train.data import refuse_test_split  # noqa: E402


def training_levels(data: str, split: str, percentiles=(1.0, 99.8),
                    second_stain: float = 0.0) -> np.ndarray:
    """The input level of each brightfield image of ``split`` (a training split)."""
    refuse_test_split(split, "measure a training level", "the model's training split")
    levels = []
    for _, image, _ in iter_split(data, split):
        view, step = sample_view(as_channels_first(image))
        look = estimate(view.reshape(-1, view.shape[-1]), "auto", tuple(percentiles),
                        second_stain)
        if look.modality == "brightfield":
            levels.append(tissue_level(look, view, step))
    return np.asarray(levels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--percentiles", type=float, nargs=2, default=(1.0, 99.8))
    p.add_argument("--second-stain", type=float, default=0.0)
    args = p.parse_args()
    levels = training_levels(args.data, args.split, args.percentiles, args.second_stain)
    if not len(levels):
        sys.exit("no brightfield image in the split")
    p10, p50, p90 = np.percentile(levels, (10, 50, 90))
    print(f"{len(levels)} brightfield images: level median {p50:.4f} (10th-90th percentile "
          f"{p10:.3f}-{p90:.3f}); export with --set brightfield_level={p50:.3f}")


if __name__ == "__main__":
    main()
