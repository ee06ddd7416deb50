"""The training loop: AdamW, linear warm-up then cosine decay, gradient clipping, checkpoints.

A run writes into ``OUT``:

* ``checkpoint.safetensors``: weights, optimiser moments and the step, every few minutes and at
  the end (atomically); ``--resume`` continues from it and draws the very batches an
  uninterrupted run would have drawn;
* ``weights.safetensors``: the weights alone, loadable by :func:`cellmask.load_model`;
* ``log.csv``: step, seconds, learning rate and each loss.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cellmask.config import ModelConfig, TrainConfig
from cellmask.device import pick_device
from cellmask.errors import InputError
from cellmask.model.network import build_network
from cellmask.model.registry import CARD_KEYS
from cellmask.model.quantize import split_calibration
from cellmask.model.weights import check_state, load_weights, save_weights
from cellmask.train.data import CropSampler, batches, load_samples, refuse_test_split

log = logging.getLogger(__name__)

_OPT_PREFIX = "optimizer."


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 2% at ``cfg.iterations``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.iterations - cfg.warmup))
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for index, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{_OPT_PREFIX}{index}.{key}"] = torch.as_tensor(value)
    return out


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name[len(_OPT_PREFIX):].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def freeze_except(net: torch.nn.Module, prefixes: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Put ``net`` in training mode with only the parameters named ``prefix...`` trainable
    (all of them if ``prefixes`` is empty) and return those. A module with no trainable
    parameter of its own runs in eval mode, so a frozen batch norm normalises with its running
    statistics, as at inference, and does not update them."""
    net.train()
    if not prefixes:
        return list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise InputError(f"no parameter of the network is named {prefix}...: parameter "
                             f"names start with {sorted({n.split('.')[0] for n in names})}")
    trainable = []
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith(tuple(prefixes)))
        if p.requires_grad:
            trainable.append(p)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)):
            module.eval()
    return trainable


def _reshaped_parts_fresh(fresh: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                          prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``state`` (fine-tuning weights) fitted to a network whose trainable parts (``prefixes``)
    changed shape, e.g. a mask head of fewer layers: there the tensors the new network lacks
    are dropped and those it adds or re-shapes keep their fresh initialisation from
    ``fresh``; everything else must match as before."""
    trained = tuple(prefixes)
    out = {k: v for k, v in state.items() if not (k.startswith(trained) and k not in fresh)}
    fresh_start = [k for k, v in fresh.items() if k.startswith(trained) and
                   (k not in out or tuple(out[k].shape) != tuple(v.shape))]
    for k in fresh_start:
        out[k] = fresh[k]
    unused = sum(k not in out or k in fresh_start for k in state)
    if unused or fresh_start:
        log.info("fine-tuning a changed %s: %d tensors start fresh, %d of the initial weights "
                 "unused", "/".join(prefixes), len(fresh_start), unused)
    return out


def training_samples(cfg: TrainConfig, percentiles: tuple[float, float],
                     second_stain: float = 0.0, level: float = 0.0
                     ) -> tuple[list, list[float] | None]:
    """The samples of ``cfg.data``/``cfg.split`` and of every ``cfg.more_data`` set, and each
    sample's drawing weight (None: uniform, when there is one set); ``percentiles``,
    ``second_stain`` and ``level`` as the model's configuration has them."""
    for split in [cfg.split] + [more[1] for more in cfg.more_data]:
        refuse_test_split(split, "train", "a training split")
    samples = load_samples(cfg.data, cfg.split, percentiles, second_stain=second_stain,
                           level=level)
    if not cfg.more_data:
        return samples, None
    rest = 1.0 - sum(float(share) for _, _, share in cfg.more_data)
    if rest <= 0 or any(float(share) <= 0 for _, _, share in cfg.more_data):
        raise InputError("the shares of the extra data sets must be positive and sum to less "
                         "than 1 (the main set has the rest)")
    weights = [rest / len(samples)] * len(samples)
    for data, split, share in cfg.more_data:
        more = load_samples(data, split, percentiles, second_stain=second_stain, level=level)
        samples += more
        weights += [float(share) / len(more)] * len(more)
    return samples, weights


def train(cfg: TrainConfig, model_cfg: ModelConfig | None = None, *, resume: bool = False,
          init: str | None = None, changes: dict | None = None, progress: bool = True) -> Path:
    """Train (or fine-tune from ``init``) and return the path of the final weights file.

    ``changes``: :class:`ModelConfig` fields replaced in the configuration of ``init`` (or of
    ``model_cfg``), e.g. ``{"mask_roi_size": 10}``; with ``init``, only changes that keep
    every weight's shape are possible.
    """
    bar = None
    weights = None
    for row in train_steps(cfg, model_cfg, resume=resume, init=init, changes=changes):
        if "weights" in row:
            weights = row["weights"]
            continue
        if progress:
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=cfg.iterations, initial=row["step"] - 1, unit="it",
                           dynamic_ncols=True)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}")
    if bar is not None:
        bar.close()
    return weights


def train_steps(cfg: TrainConfig, model_cfg: ModelConfig | None = None, *, resume: bool = False,
                init: str | None = None, samples: list | None = None,
                changes: dict | None = None):
    """The training loop as a generator: yields one row (step, seconds, lr, losses) per step,
    then ``{"weights": path}``. Closing it early saves a checkpoint (``--resume`` continues).
    ``samples`` (a list of :class:`~cellmask.train.data.Sample`) replaces reading ``cfg.data``.

    The process-wide torch settings it changes (thread count, TF32 and cuDNN flags, the random
    generator) are restored when it ends, however it ends: a script or the napari viewer that
    trains keeps its own.
    """
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    try:
        yield from _train_steps(cfg, model_cfg, resume=resume, init=init, samples=samples,
                                changes=changes)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = flags


def _train_steps(cfg: TrainConfig, model_cfg: ModelConfig | None = None, *,
                 resume: bool = False, init: str | None = None, samples: list | None = None,
                 changes: dict | None = None):
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)

    checkpoint = out / "checkpoint.safetensors"
    start = 0
    optimizer_state: dict[str, torch.Tensor] = {}
    inherited: dict[str, str] = {}  # what the weights are (licence, pixel size, ...) goes on
    if resume and checkpoint.is_file():
        state, model_cfg, meta = load_weights(checkpoint)
        inherited = {k: meta[k] for k in CARD_KEYS if k in meta}
        start = int(meta["step"])
        optimizer_state = {k: v for k, v in state.items() if k.startswith(_OPT_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(_OPT_PREFIX)}
        log.info("resuming from %s at step %d", checkpoint, start)
    elif init:
        state, init_cfg, init_meta = load_weights(init)
        # int8 activation ranges describe the weights they were measured on, not the new ones
        state, _ = split_calibration(state)
        inherited = {k: init_meta[k] for k in CARD_KEYS if k in init_meta}
        model_cfg = model_cfg or init_cfg
        log.info("fine-tuning from %s", init)
    else:
        state = None
    model_cfg = model_cfg or ModelConfig()
    if changes and not start:  # a resumed run's configuration already holds them
        model_cfg = model_cfg.replace(**changes)

    net = build_network(model_cfg)
    if state is not None:
        if init and not start and cfg.train_only:
            state = _reshaped_parts_fresh(net.state_dict(), state, cfg.train_only)
        check_state(net.state_dict(), state, str(checkpoint if start else init))
        net.load_state_dict(state)
    net.to(device)
    trainable = freeze_except(net, cfg.train_only)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state:
        _restore_optimizer(opt, optimizer_state)

    weights = None
    if samples is None:
        samples, weights = training_samples(cfg, model_cfg.norm_percentiles,
                                            model_cfg.second_stain_weight,
                                            model_cfg.brightfield_level)
    sampler = CropSampler(samples, cfg.crop, cfg.zoom, cfg.seed, weights, cfg.tissue_aug)
    meta = {**inherited, "train_config": str(asdict(cfg)), "device": str(device)}

    def save(step: int) -> None:
        net_state = net.state_dict()
        save_weights(checkpoint, {**net_state, **_optimizer_tensors(opt)}, model_cfg,
                     {**meta, "step": str(step)})
        save_weights(out / "weights.safetensors", net_state, model_cfg, {**meta, "step": str(step)})

    log_path = out / "log.csv"
    new_log = not (resume and log_path.is_file())
    log_file = open(log_path, "w" if new_log else "a", newline="")
    writer = None
    last_save = time.monotonic()
    t0 = time.monotonic()
    done = start  # steps whose update has been applied
    try:
        stream = batches(sampler, start, cfg.iterations, cfg.batch_size, cfg.workers)
        for step, (images, targets) in zip(range(start, cfg.iterations), stream):
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # RoI sampling: same draw on resume
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            lr = learning_rate(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            losses = net(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}: lower --lr "
                                         "or lengthen --warmup, then --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
            opt.step()
            done = step + 1
            row = {"step": step + 1, "seconds": round(time.monotonic() - t0, 2), "lr": lr,
                   "loss": round(loss.item(), 4),
                   **{k: round(v.item(), 4) for k, v in losses.items()}}
            if writer is None:
                writer = csv.DictWriter(log_file, fieldnames=list(row))
                if new_log:
                    writer.writeheader()
            writer.writerow(row)
            yield row
            if cfg.max_minutes and time.monotonic() - t0 > cfg.max_minutes * 60:
                log.info("time budget of %.1f min spent at step %d", cfg.max_minutes, done)
                break
            if time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
                log_file.flush()
                save(step + 1)
                last_save = time.monotonic()
        save(done)
    except (KeyboardInterrupt, GeneratorExit):
        save(done)
        log.warning("interrupted: checkpoint saved at step %d; continue with --resume", done)
        raise
    finally:
        log_file.close()
    yield {"weights": out / "weights.safetensors"}
