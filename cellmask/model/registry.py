"""Named models shipped inside the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: name -> file under ``cellmask/weights/``
MODELS = {"nuclei": "nuclei.safetensors"}
DEFAULT = "nuclei"


def resolve(name_or_path: str | Path) -> Path:
    """The weights file of a shipped model name, or the given path if it is a file."""
    key = str(name_or_path)
    if key in MODELS:
        return Path(str(resources.files("cellmask") / "weights" / MODELS[key]))
    path = Path(key)
    if path.is_file():
        return path
    raise FileNotFoundError(f"no model named {key!r} and no such file; shipped models: "
                            f"{', '.join(sorted(MODELS))}, or pass a path to a .safetensors file")
