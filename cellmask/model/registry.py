"""Named models shipped inside the package, and what each one is.

What a model is (modality, pixel size, training data, licence, measured accuracy) is stored in
its weights file's header, written by ``cellmask export --card KEY=VALUE``, so that a file
always carries its own description; :func:`list_models` reads only the headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: name -> file under ``cellmask/weights/``
MODELS = {"nuclei": "nuclei.safetensors", "nuclei-he": "nuclei-he.safetensors"}
DEFAULT = "nuclei"

#: Header keys of a model's description (``cellmask export --card KEY=VALUE``).
CARD_KEYS = ("summary", "modality", "pixel_size_um", "trained_diameter", "training_data",
             "licence", "accuracy")


@dataclass(frozen=True)
class ModelInfo:
    """One shipped model as ``cellmask models`` lists it."""

    name: str
    path: Path
    summary: str
    modality: str
    pixel_size: str
    training_data: str
    licence: str
    accuracy: str
    #: what the int8 activation ranges were measured on (``cellmask calibrate``), or "none"
    int8_calibration: str = "none"

    @property
    def non_commercial(self) -> bool:
        return is_non_commercial(self.licence)


def is_non_commercial(licence: str) -> bool:
    """Whether a licence string restricts use to non-commercial purposes."""
    text = licence.upper()
    return "-NC" in text or "NON-COMMERCIAL" in text or "NONCOMMERCIAL" in text


def shipped_path(name: str) -> Path:
    return Path(str(resources.files("cellmask") / "weights" / MODELS[name]))


def resolve(name_or_path: str | Path) -> Path:
    """The weights file of a shipped model name, or the given path if it is a file."""
    key = str(name_or_path)
    if key in MODELS:
        path = shipped_path(key)
        if not path.is_file():
            raise FileNotFoundError(f"the model {key!r} is not installed ({path} is missing): "
                                    "reinstall cellmask")
        return path
    path = Path(key)
    if path.is_file():
        return path
    raise FileNotFoundError(f"no model named {key!r} and no such file; shipped models: "
                            f"{', '.join(sorted(MODELS))}, or pass a path to a .safetensors file")


def describe(name: str, path: Path, meta: dict[str, str]) -> ModelInfo:
    """The :class:`ModelInfo` of a weights file's header metadata."""
    px = meta.get("pixel_size_um")
    pixel = f"{float(px):g} um" if px and float(px) > 0 else (
        f"not stated (nuclei of ~{float(meta.get('trained_diameter', 20)):g} px)")
    return ModelInfo(name, path, meta.get("summary", "(no description in the file)"),
                     meta.get("modality", "not stated"), pixel,
                     meta.get("training_data", "not stated"), meta.get("licence", "not stated"),
                     meta.get("accuracy", "not stated"), meta.get("int8_calibration", "none"))


def list_models() -> list[ModelInfo]:
    """Every shipped model with its modality, pixel size, training data, licence and accuracy."""
    from cellmask.model.weights import read_header

    out = []
    for name in MODELS:
        path = shipped_path(name)
        if path.is_file():
            meta = read_header(path).get("__metadata__") or {}
            out.append(describe(name, path, meta))
    return out
