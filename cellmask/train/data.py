"""Training data: folders of image and instance-mask TIFFs, random crops, MONAI augmentation.

Layout (that of the DSB2018 folder shipped with the project's data)::

    DATA/images/<id>.tif    (H, W) or (H, W, 3) image, any dtype
    DATA/masks/<id>.tif     (H, W) instance labels, 0 = background
    DATA/splits/<name>.txt  one <id> per line

Every random choice of a batch is drawn from a generator seeded by ``(seed, step)``, so a run is
deterministic and a resumed run draws exactly the batches the uninterrupted run would have.

Each image goes through :mod:`cellmask.appearance` exactly as at inference (modality decided
once per image, brightfield stain-separated into its hematoxylin channel, plus the model's
share of the second stain), so the network is trained on what it will see. Brightfield colour
images also keep their second stain, so that stain jitter can leak a random fraction of it
into the hematoxylin channel, as a mis-estimated stain matrix would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage

from cellmask.appearance import concentrations, estimate
from cellmask.errors import InputError
from cellmask.normalize import as_channels_first, sample_view
from cellmask.train.synthetic_tissue import add_tissue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One annotated image: ``image`` float32 ``(3, H, W)`` as the network sees it, ``labels``
    int32 ``(H, W)``; ``stain``: for brightfield colour images, the second stain's concentration
    ``(H, W)`` on the scale of the network's channel (None otherwise); ``modality``: as
    :mod:`cellmask.appearance` decided it."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    stain: np.ndarray | None = None
    modality: str = "fluorescence"


def prepare_sample(name: str, image: np.ndarray, labels: np.ndarray,
                   percentiles: tuple[float, float] = (1.0, 99.8),
                   modality: str = "auto", second_stain: float = 0.0,
                   level: float = 0.0) -> Sample:
    """A :class:`Sample` of one raw image, through the same appearance mapping as inference
    (``second_stain`` and ``level``: the model's ``second_stain_weight`` and
    ``brightfield_level``)."""
    from cellmask.survey import cap_brightness

    chw = as_channels_first(image)
    view, step = sample_view(chw)  # the strided view runs estimate on
    app, _ = cap_brightness(estimate(view.reshape(-1, len(chw)), modality, percentiles,
                                     second_stain), view, step, level)
    stain = None
    if app.modality == "brightfield" and chw.shape[0] == 3:
        conc = concentrations(chw, np.asarray(app.stains), np.asarray(app.background))
        stain = conc[1] / max(app.hi[0] - app.lo[0], 1e-6)
    return Sample(name, app.apply(chw), labels, stain, app.modality)


def refuse_test_split(split: str | Path, purpose: str, instead: str) -> None:
    """Raise :class:`InputError` if ``split`` is a test split (its file name says "test"):
    training, threshold tuning and calibration never see the images accuracy is measured on."""
    if "test" in Path(str(split)).name:
        raise InputError(f"refusing to {purpose} on a test split ({split}): use {instead}")


def read_split(data_dir: str | Path, split: str | Path) -> list[str]:
    """Image ids listed in ``split`` (a path, or a path relative to ``data_dir``)."""
    path = Path(split)
    if not path.is_file():
        path = Path(data_dir) / split
    if not path.is_file():
        raise FileNotFoundError(f"split list {split} not found (looked in {data_dir} too)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_samples(data_dir: str | Path, split: str | Path,
                 percentiles: tuple[float, float] = (1.0, 99.8),
                 modality: str = "auto", second_stain: float = 0.0,
                 level: float = 0.0) -> list[Sample]:
    """Read every image of a split into memory, as the network sees it."""
    data_dir = Path(data_dir)
    samples = []
    for name in read_split(data_dir, split):
        image = tifffile.imread(data_dir / "images" / f"{name}.tif")
        labels = tifffile.imread(data_dir / "masks" / f"{name}.tif").astype(np.int32)
        if image.shape[:2] != labels.shape:
            raise InputError(f"{name}: image {image.shape} and mask {labels.shape} differ in size")
        samples.append(prepare_sample(name, image, labels, percentiles, modality,
                                      second_stain, level))
    log.info("loaded %d images from %s", len(samples), split)
    return samples


def targets_from_labels(labels: np.ndarray, min_area: int = 4) -> dict[str, torch.Tensor]:
    """Mask R-CNN targets from an instance label image ``(H, W)``.

    Returns ``boxes`` ``(N, 4)`` float32 ``[x1, y1, x2, y2]`` (x2, y2 exclusive pixel edges),
    ``labels`` ``(N,)`` int64 (all 1) and ``masks`` ``(N, H, W)`` uint8. Objects of fewer than
    ``min_area`` pixels (slivers left by a crop) are dropped.
    """
    h, w = labels.shape
    boxes, masks = [], []
    for index, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None:
            continue
        local = labels[sl] == index + 1
        if local.sum() < min_area:
            continue
        full = np.zeros((h, w), dtype=np.uint8)
        full[sl][local] = 1
        masks.append(full)
        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
    n = len(boxes)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        "labels": torch.ones(n, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)) if n else torch.zeros((0, h, w), dtype=torch.uint8),
    }


def build_augment(crop: int, zoom: tuple[float, float]):
    """MONAI dictionary transforms on ``{"image": (3, H, W), "label": (1, H, W)}``."""
    from monai.data import set_track_meta
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
        RandZoomd,
        SpatialPadd,
    )

    set_track_meta(False)  # plain tensors: faster, and nothing downstream reads the metadata
    keys = ("image", "label")
    return Compose([
        SpatialPadd(keys, spatial_size=(crop, crop), mode="constant"),
        RandSpatialCropd(keys, roi_size=(crop, crop), random_size=False),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.5, max_k=3),
        RandZoomd(keys, prob=0.5, min_zoom=zoom[0], max_zoom=zoom[1],
                  mode=("bilinear", "nearest"), padding_mode="constant", keep_size=True),
        RandScaleIntensityd("image", factors=0.3, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        RandGaussianNoised("image", std=0.03, prob=0.2),
        RandGaussianSmoothd("image", sigma_x=(0.25, 1.2), sigma_y=(0.25, 1.2), prob=0.2),
    ])


#: Largest fraction of the second stain leaked into (or taken out of) the hematoxylin channel
#: by stain jitter.
STAIN_LEAK = 0.15


class CropSampler:
    """Draws augmented training batches from in-memory samples.

    ``weights``: the probability of drawing each sample (default: uniform), so that several
    data sets can each have a share of the crops. ``tissue``: the probability that a
    fluorescence crop is given H&E-like chromatin, cytoplasm and stroma
    (:func:`~cellmask.train.synthetic_tissue.add_tissue`).
    """

    def __init__(self, samples: list[Sample], crop: int, zoom: tuple[float, float], seed: int,
                 weights: list[float] | None = None, tissue: float = 0.0):
        if not samples:
            raise InputError("no training images: check the split list")
        if not 0.0 <= tissue <= 1.0:
            raise InputError(f"the synthetic tissue probability must lie in [0, 1], not {tissue}")
        self.samples = samples
        self.crop = crop
        self.seed = seed
        self.tissue = tissue
        self.augment = build_augment(crop, zoom)
        if weights is not None:
            w = np.asarray(weights, np.float64)
            if w.shape != (len(samples),) or (w < 0).any() or w.sum() <= 0:
                raise InputError("sample weights must be one non-negative number per sample")
            self.weights = w / w.sum()
        else:
            self.weights = None

    def batch(self, step: int, size: int) -> tuple[list[torch.Tensor], list[dict]]:
        """The batch of iteration ``step``: ``size`` images ``(3, crop, crop)`` and targets."""
        rng = np.random.default_rng([self.seed, step])
        self.augment.set_random_state(seed=int(rng.integers(2**31)))
        images, targets = [], []
        if self.weights is None:
            picks = rng.integers(len(self.samples), size=size)
        else:
            picks = rng.choice(len(self.samples), size=size, p=self.weights)
        for index in picks:
            sample = self.samples[index]
            leak = rng.uniform(-STAIN_LEAK, STAIN_LEAK) if rng.random() < 0.5 else 0.0
            image = sample.image
            if sample.stain is not None:  # augment signal and second stain together
                image = np.concatenate([image[:1], sample.stain[None]])
            out = self.augment({"image": image, "label": sample.labels[None]})
            image = torch.as_tensor(out["image"], dtype=torch.float32)
            if sample.stain is not None:
                image = (image[:1] + leak * image[1:2]).expand(3, -1, -1)
            labels = np.asarray(out["label"])[0].astype(np.int32)
            if self.tissue and sample.modality == "fluorescence" and rng.random() < self.tissue:
                signal = add_tissue(image[0].numpy(), labels, rng)
                image = torch.from_numpy(signal)[None].expand(3, -1, -1)
            image = image.contiguous()
            images.append(image)
            targets.append(targets_from_labels(labels))
        return images, targets


def _as_is(batch):
    return batch


class _Steps(torch.utils.data.Dataset):
    """Batch ``i`` is the batch of step ``start + i``: workers keep the run deterministic."""

    def __init__(self, sampler: CropSampler, start: int, end: int, size: int):
        self.sampler, self.start, self.end, self.size = sampler, start, end, size

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __getitem__(self, i: int):
        return self.sampler.batch(self.start + i, self.size)


def batches(sampler: CropSampler, start: int, end: int, size: int, workers: int = 0):
    """Iterate the batches of steps ``start..end-1``, in order, on ``workers`` processes."""
    if workers <= 0:
        return (_one_thread(sampler.batch, step, size) for step in range(start, end))
    return iter(torch.utils.data.DataLoader(_Steps(sampler, start, end, size), batch_size=None,
                                            shuffle=False, num_workers=workers,
                                            collate_fn=_as_is, persistent_workers=False,
                                            prefetch_factor=4))


def _one_thread(fn, *args):
    """``fn(*args)`` with one torch thread, as in a DataLoader worker process: augmentation
    (MONAI's resampling) then rounds alike with and without workers. The caller's thread count
    is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)
