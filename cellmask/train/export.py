"""Turning a training run into a shippable model: thresholds tuned on val, written with them."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from cellmask.config import INFERENCE_SETTINGS, ModelConfig
from cellmask.model.segmenter import load_model
from cellmask.model.weights import save_weights
from cellmask.normalize import InputError
from cellmask.train.tune import tune_thresholds

log = logging.getLogger(__name__)


def parse_settings(items: list[str], inference_only: bool = True
                   ) -> dict[str, int | float | tuple[int, ...]]:
    """``["key=value", ...]`` -> numeric :class:`ModelConfig` settings, typed as the fields are;
    a field that is a list of whole numbers (``mask_head_layers``) takes them comma-separated.

    ``inference_only``: accept only the settings that change inference, not the architecture.
    """
    fields = dataclasses.fields(ModelConfig)
    types = {f.name: f.type for f in fields if f.type in ("int", "float")}
    lists = {f.name for f in fields if f.type == "tuple[int, ...]"}
    allowed = set(INFERENCE_SETTINGS) if inference_only else set(types) | lists
    settings: dict[str, int | float | tuple[int, ...]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise InputError(f"--set takes KEY=VALUE with KEY a numeric model setting "
                             f"({', '.join(sorted(allowed))}), got {item!r}")
        if key in lists:
            try:
                settings[key] = tuple(int(v) for v in value.split(","))
            except ValueError:
                raise InputError(f"--set {key}: {value!r} is not a comma-separated list of "
                                 "whole numbers") from None
            continue
        try:
            number = float(value)
        except ValueError:
            raise InputError(f"--set {key}: {value!r} is not a number") from None
        if types[key] == "int" and number != int(number):
            raise InputError(f"--set {key}: {value!r} must be a whole number")
        settings[key] = int(number) if types[key] == "int" else number
    return settings


def check_card(card: dict[str, str]) -> dict[str, str]:
    """A model description with known keys only (and a numeric pixel size)."""
    from cellmask.model.registry import CARD_KEYS

    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise InputError(f"--card keys must be among {', '.join(CARD_KEYS)}, not {unknown}")
    for key in ("pixel_size_um", "trained_diameter"):
        if key in card:
            try:
                if not float(card[key]) >= 0:
                    raise ValueError
            except ValueError:
                raise InputError(f"--card {key}: {card[key]!r} is not a number >= 0") from None
    return {k: str(v) for k, v in card.items()}


def export_model(weights: str | Path, data_dir: str | Path, split: str | Path,
                 out: str | Path, *, trained_diameter: float | None = None,
                 settings: dict[str, float] | None = None,
                 card: dict[str, str] | None = None) -> tuple[Path, dict]:
    """Tune the inference thresholds of ``weights`` on ``split`` and write ``out``.

    ``settings``: inference settings fixed before tuning (proposal budgets, for instance).
    ``card``: the model's description stored in its header (keys of
    :data:`cellmask.model.registry.CARD_KEYS`: modality, pixel size, data, licence, ...).
    Returns the written path and the tuned thresholds (with the objective they reached).
    """
    model = load_model(weights, device="cpu", precision="fp32")  # the reference arithmetic
    if settings:
        types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
        model = model.with_config(**{k: int(v) if types[k] == "int" else float(v)
                                     for k, v in settings.items()})
    best, value = tune_thresholds(model, data_dir, split)
    config = model.config.replace(**best)
    meta = {k: v for k, v in model.meta.items() if k not in ("format", "config")}
    card = check_card(card or {})
    if trained_diameter is None:  # the card's, else the training run's, else DSB2018's 20 px
        trained_diameter = float(card.get("trained_diameter",
                                          model.meta.get("trained_diameter", 20.0)))
    meta.update({"trained_diameter": str(trained_diameter), "tuned_on": str(split),
                 "fixed_settings": json.dumps(settings or {}),
                 "tuned_thresholds": json.dumps(best), "tuning_objective": f"{value:.4f}"})
    meta.update({k: v for k, v in card.items() if k != "trained_diameter"})
    # thresholds do not change the activations: an int8 calibration stays valid
    path = save_weights(out, {**model.net.state_dict(), **model.calibration}, config, meta)
    log.info("exported %s with thresholds %s (ap50+ap75 on %s = %.4f)", path, best, split, value)
    return path, {**best, "objective": value}
