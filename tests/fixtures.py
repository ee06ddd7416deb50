"""Shared test helpers: real fixtures and paths (imported by the tests and conftest)."""

from pathlib import Path

import numpy as np
import tifffile

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXTURES = ["fluo_29dd28df98ee", "fluo_e23e11414ee6", "histo_0e4c2e2780de"]


def load_fixture(name: str) -> tuple[np.ndarray, np.ndarray]:
    return tifffile.imread(DATA / f"{name}.tif"), tifffile.imread(DATA / f"{name}_masks.tif")
