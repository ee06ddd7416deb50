"""StarDist as a peer of cellmask: train on DSB2018 ``fluo_train`` for a time budget, then predict.

Runs in an environment with the optional benchmark extras (``pip install tensorflow-cpu
stardist``), never in cellmask's own: ``benchmarks/peers.py`` calls it as a child process.
Pretrained StarDist models cannot be downloaded here, so the model is trained from scratch
with StarDist's 2D defaults (32 rays, grid 2, 256x256 patches) and the flip/rotation/intensity
augmentation of its example notebook, and thresholds optimised on ``fluo_val``; training
stops when the budget is spent.

    python benchmarks/peer_stardist.py train --minutes 115 --out runs/peers/stardist
    python benchmarks/peer_stardist.py predict --model runs/peers/stardist --images a.npy b.npy
    python benchmarks/peer_stardist.py timing --images a.npy --truth a_truth.npy

``timing`` is for a machine without a trained StarDist: StarDist's network with random weights
(its 2D defaults, so exactly the computation of a trained one) run by ``predict_instances_big``
with a probability threshold no pixel reaches (the network and the blocking, no NMS), plus
StarDist's own NMS and polygon rendering on probability and ray-distance maps derived from the
ground truth (``edt_prob``, ``star_dist`` at grid 2: the candidates a perfect model would give).
The reported time is the sum; labelled as such wherever it is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018"


def _load(split: str, data: Path):
    import tifffile
    from csbdeep.utils import normalize
    from stardist import fill_label_holes

    names = [s for s in (data / "splits" / split).read_text().split() if s]
    xs, ys = [], []
    for n in names:
        im = tifffile.imread(data / "images" / f"{n}.tif").astype(np.float32)
        if im.ndim == 3:
            im = im[..., :3].mean(-1)
        xs.append(normalize(im, 1, 99.8, axis=(0, 1)))
        ys.append(fill_label_holes(tifffile.imread(data / "masks" / f"{n}.tif")))
    return xs, ys


def _augment(x: np.ndarray, y: np.ndarray):
    """StarDist's example-notebook augmentation: flips, 90-degree rotations, intensity change."""
    k = np.random.randint(4)
    x, y = np.rot90(x, k), np.rot90(y, k)
    if np.random.rand() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    x = x * np.random.uniform(0.6, 2.0) + np.random.uniform(-0.2, 0.2)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train(args: argparse.Namespace) -> None:
    import tensorflow as tf
    from stardist.models import Config2D, StarDist2D

    tf.random.set_seed(args.seed)
    np.random.seed(args.seed)
    x_tr, y_tr = _load("fluo_train.txt", Path(args.data))
    x_va, y_va = _load("fluo_val.txt", Path(args.data))
    # DSB2018 images are at least 256 px on each side: StarDist's 256 patches fit every image.
    conf = Config2D(n_rays=32, grid=(2, 2), n_channel_in=1, train_patch_size=(256, 256),
                    train_batch_size=4, train_tensorboard=False)
    out = Path(args.out)
    model = StarDist2D(conf, name=out.name, basedir=str(out.parent))
    budget = args.minutes * 60.0
    start = time.perf_counter()

    class TimeBudget(tf.keras.callbacks.Callback):
        """Stops training once the wall-clock budget is spent (checked after every step)."""

        steps = 0

        def on_train_batch_end(self, batch, logs=None):
            TimeBudget.steps += 1
            if time.perf_counter() - start > budget:
                self.model.stop_training = True

    model.prepare_for_training()
    model.callbacks.append(TimeBudget())
    epochs = max(1, int(args.max_epochs))
    model.train(x_tr, y_tr, validation_data=(x_va, y_va), epochs=epochs,
                steps_per_epoch=args.steps_per_epoch, augmenter=_augment)
    trained = time.perf_counter() - start
    model.optimize_thresholds(x_va, y_va)
    record = {"wall_minutes_training": round(trained / 60, 2), "steps": TimeBudget.steps,
              "cpu_minutes_process": round(_cpu_seconds() / 60, 2),
              "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "thresholds": model.thresholds._asdict(), "train_split": "fluo_train.txt",
              "threshold_split": "fluo_val.txt"}
    (out / "budget.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def predict(args: argparse.Namespace) -> None:
    """Times ``predict_instances_big`` (blocks of ``--block``, overlap and context 64, as
    StarDist's documentation sets them for large images) and, for images up to
    ``--whole-max`` px, ``predict_instances`` on the whole image; normalisation included."""
    from csbdeep.utils import normalize
    from stardist.models import StarDist2D

    path = Path(args.model)
    model = StarDist2D(None, name=path.name, basedir=str(path.parent))
    if args.warm_up:  # untimed: first-call costs (graph tracing) are paid once per process
        warm = normalize(np.load(args.warm_up).astype(np.float32), 1, 99.8, axis=(0, 1))
        model.predict_instances(warm)
        model.predict_instances_big(warm, axes="YX", block_size=256, min_overlap=64,
                                    context=64, show_progress=False)
    rows = []
    for image_path in args.images:
        image = np.load(image_path)
        modes = args.modes or (["big"] + (["whole"] if max(image.shape) <= args.whole_max
                                          else []))
        for mode in modes:
            t0 = time.perf_counter()
            x = normalize(image.astype(np.float32), 1, 99.8, axis=(0, 1))
            if mode == "big":
                labels, _ = model.predict_instances_big(
                    x, axes="YX", block_size=args.block, min_overlap=64, context=64,
                    show_progress=False)
            else:
                labels, _ = model.predict_instances(x)
            seconds = time.perf_counter() - t0
            out = Path(image_path).with_suffix(f".stardist_{mode}.npy")
            np.save(out, labels.astype(np.int32))
            rows.append({"image": image_path, "mode": mode, "seconds": seconds,
                         "labels": str(out)})
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
    print(json.dumps({"rows": rows, "hwm_kib": int(hwm[0].split()[1])}))


def timing(args: argparse.Namespace) -> None:
    """Network (random weights, no candidates) + NMS on truth-derived maps; see the docstring."""
    from csbdeep.utils import normalize
    from stardist import edt_prob, star_dist
    from stardist.geometry import polygons_to_label
    from stardist.models import Config2D, StarDist2D
    from stardist.nms import non_maximum_suppression

    conf = Config2D(n_rays=32, grid=(2, 2), n_channel_in=1)
    model = StarDist2D(conf, name="random", basedir=None)
    if args.warm_up:
        warm = normalize(np.load(args.warm_up).astype(np.float32), 1, 99.8, axis=(0, 1))
        model.predict_instances_big(warm, axes="YX", block_size=256, min_overlap=64,
                                    context=64, prob_thresh=1.0, show_progress=False)
    rows = []
    for image_path, truth_path in zip(args.images, args.truth):
        image, truth = np.load(image_path), np.load(truth_path).astype(np.int32)
        prob = edt_prob(truth)[::2, ::2].astype(np.float32)
        dist = star_dist(truth, 32, grid=(2, 2)).astype(np.float32)
        for _ in range(2):  # the second call is timed: graph tracing per block shape excluded
            t0 = time.perf_counter()
            x = normalize(image.astype(np.float32), 1, 99.8, axis=(0, 1))
            model.predict_instances_big(x, axes="YX", block_size=args.block, min_overlap=64,
                                        context=64, prob_thresh=1.0, show_progress=False)
            network = time.perf_counter() - t0
        t1 = time.perf_counter()
        points, probi, disti = non_maximum_suppression(dist, prob, grid=(2, 2),
                                                       prob_thresh=conf.thresholds["prob"]
                                                       if hasattr(conf, "thresholds") else 0.5,
                                                       nms_thresh=0.4)
        labels = polygons_to_label(disti, points, shape=truth.shape, prob=probi)
        nms = time.perf_counter() - t1
        out = Path(image_path).with_suffix(".stardist_timing.npy")
        np.save(out, labels.astype(np.int32))
        rows.append({"image": image_path, "mode": "big (random weights + NMS on truth maps)",
                     "seconds": network + nms, "network_s": network, "nms_s": nms,
                     "labels": str(out)})
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
    print(json.dumps({"rows": rows, "hwm_kib": int(hwm[0].split()[1])}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", default=str(DATA))
    t.add_argument("--out", default="runs/peers/stardist")
    t.add_argument("--minutes", type=float, default=115.0)
    t.add_argument("--max-epochs", type=int, default=1000)
    t.add_argument("--steps-per-epoch", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("predict")
    q.add_argument("--model", default="runs/peers/stardist")
    q.add_argument("--images", nargs="+", required=True)
    q.add_argument("--block", type=int, default=1024)
    q.add_argument("--warm-up", help="an image (.npy) segmented untimed before the others")
    q.add_argument("--whole-max", type=int, default=2048)
    q.add_argument("--modes", nargs="+", choices=["big", "whole"],
                   help="only these modes (default: big, and whole up to --whole-max px)")
    g = sub.add_parser("timing")
    g.add_argument("--images", nargs="+", required=True)
    g.add_argument("--truth", nargs="+", required=True, help="ground-truth labels (.npy)")
    g.add_argument("--block", type=int, default=1024)
    g.add_argument("--warm-up", help="an image (.npy) run untimed before the others")
    args = p.parse_args()
    {"train": train, "predict": predict, "timing": timing}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
