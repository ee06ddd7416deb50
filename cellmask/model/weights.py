"""Weights files: safetensors only, with the model configuration in the header metadata.

A weights file is never unpickled: ``safetensors`` parses a JSON header and raw tensor bytes,
so a file from a colleague cannot run code. Anything that is not a valid cellmask safetensors
file (a pickle, a renamed ``.pt``, a truncated download, tensors that do not fit the declared
architecture) is refused with a :class:`WeightsError` saying what is wrong.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from cellmask.config import ModelConfig
from cellmask.errors import WeightsError  # noqa: F401  (re-exported)

FORMAT = "cellmask-maskrcnn"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+, and torch.save's zip archive


def save_weights(path: str | Path, state: dict[str, torch.Tensor], config: ModelConfig,
                 meta: dict[str, str] | None = None) -> Path:
    """Write ``state`` and ``config`` to ``path`` atomically (a killed write leaves no half file,
    two writers never share a temporary one) and durably, readable as any file the user
    writes."""
    from cellmask.labels_store import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "config": config.to_json()}
    header.update({k: str(v) for k, v in (meta or {}).items()})
    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=header)
    write_atomic(path, lambda fh: fh.write(data))
    return path


def read_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file, after checking that it is one."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
        length = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else -1
        looks_safetensors = head[8:9] == b"{" and 0 < length <= min(size - 8, 100_000_000)
        if not looks_safetensors:
            if any(head.startswith(m) for m in _PICKLE_MAGIC):
                raise WeightsError(f"{path} is a pickle/torch.save file, which cellmask never "
                                   "loads (it can run arbitrary code); convert it to safetensors "
                                   "with safetensors.torch.save_file on a machine you trust")
            raise WeightsError(f"{path} is not a valid safetensors file (truncated, or another "
                               "format)")
        fh.seek(8)
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightsError(f"{path} has a corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} has a corrupt safetensors header")
    return header


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, str]]:
    """Read a cellmask weights file: ``(state_dict, config, metadata)``; nothing is executed."""
    meta = read_header(path).get("__metadata__") or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise WeightsError(f"{path} is a safetensors file but not cellmask weights (no "
                           f"'{FORMAT}' metadata); train or fine-tune with `cellmask train`")
    try:
        config = ModelConfig.from_json(meta["config"])
        state = load_file(str(path))
    except (SafetensorError, ValueError, TypeError) as err:
        raise WeightsError(f"cannot read {path}: {err}") from None
    return state, config, meta


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                source: str) -> None:
    """Refuse a state dict whose tensor names or shapes differ from the built network's."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise WeightsError(f"{source} does not match its declared architecture: "
                           f"{len(missing)} missing tensors {missing[:3]}, "
                           f"{len(extra)} unexpected tensors {extra[:3]}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                               f"the architecture needs {tuple(tensor.shape)}")
