"""Choosing the torch device."""

from __future__ import annotations

import torch

from cellmask.errors import InputError


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` gives CUDA when available, else the CPU; anything else is checked and returned."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but no CUDA GPU is visible; use "
                         "--device cpu or auto")
    return dev
