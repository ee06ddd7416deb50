"""Bad input through the command line (in-process) and the API: one clear line, nothing lost."""

import hashlib
import os
import stat

import numpy as np
import pytest
import tifffile
import zarr

import cellmask
from cellmask.cli import main
from fixtures import load_fixture


def cli(capsys, *args):
    code = main(["--quiet", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return code, err


def tree_digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def zarr_image(tmp_path):
    image, _ = load_fixture("fluo_29dd28df98ee")
    path = tmp_path / "img.zarr"
    zarr.create_array(str(path), shape=image.shape, chunks=(128, 128), dtype=image.dtype)[:] = image
    return path


def make(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


CASES = {
    "missing": (lambda d: d / "nope.tif", [], "does not exist"),
    "text-named-tif": (lambda d: [(d / "a.tif").write_text("hello"), d / "a.tif"][1], [],
                       "cannot read"),
    "folder-not-zarr": (lambda d: (d / "dir").mkdir() or d / "dir", [], "not a Zarr store"),
    "empty": (lambda d: make(d, "e.npy", np.zeros((0, 10), np.uint8)), [], "empty"),
    "all-nan": (lambda d: make(d, "n.npy", np.full((64, 64), np.nan)), [], "NaN or infinite"),
    "all-inf": (lambda d: make(d, "i.npy", np.full((64, 64), np.inf)), [], "NaN or infinite"),
    "5d-no-axes": (lambda d: make(d, "f.npy", np.zeros((1, 2, 3, 16, 16))), [], "needs axes"),
    "ambiguous-axes": (lambda d: make(d, "c.npy", np.zeros((2, 16, 16))), ["--axes", "YYX"],
                       "distinct letter"),
    "channel-out-of-range": (lambda d: make(d, "c.npy", np.zeros((2, 16, 16))),
                             ["--axes", "CYX", "--channel", "5"], "out of range"),
    "several-channels": (lambda d: make(d, "c.npy", np.zeros((2, 16, 16))), ["--axes", "CYX"],
                         "choose the nuclear one"),
    "z-stack": (lambda d: make(d, "z.npy", np.zeros((4, 16, 16))), ["--axes", "ZYX"],
                "planes along Z"),
    "tile-smaller-than-halo": (lambda d: make(d, "s.npy", np.zeros((16, 16))),
                               ["--tile", "64", "--halo", "64"], "twice the halo"),
    "zero-tile": (lambda d: make(d, "s.npy", np.zeros((16, 16))), ["--tile", "0"],
                  "must be positive"),
    "negative-halo": (lambda d: make(d, "s.npy", np.zeros((16, 16))), ["--halo", "-3"],
                      "zero or more"),
    "boundary-without-cells": (lambda d: make(d, "c.npy", np.ones((2, 16, 16))),
                               ["--axes", "CYX", "--channel", "0", "--cell-boundary", "1"],
                               "--cell-expansion"),
    "boundary-not-a-channel": (lambda d: make(d, "c.npy", np.ones((2, 16, 16))),
                               ["--axes", "CYX", "--channel", "0", "--pixel-size", "0.5",
                                "--cell-expansion", "3", "--cell-boundary", "WGA"],
                               "not a channel of the input"),
    "bad-model": (lambda d: make(d, "s.npy", np.zeros((16, 16))), ["--model", "nonexistent"],
                  "no model named"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input(case, tmp_path, capsys):
    build, extra, message = CASES[case]
    path = build(tmp_path)
    before = tree_digest(tmp_path)
    code, err = cli(capsys, "segment", path, "--out", tmp_path / "out.zarr", *extra)
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    assert tree_digest(tmp_path) == before or not (tmp_path / "out.zarr" / "labels").exists() or \
        case in ("all-nan", "all-inf")  # only our own output folder may have been started


def test_truncated_tiff(tmp_path, capsys):
    image, _ = load_fixture("fluo_29dd28df98ee")
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, image, tile=(64, 64), compression="zlib")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    code, err = cli(capsys, "segment", cut, "--out", tmp_path / "o.zarr")
    assert code == 2 and len(err.splitlines()) == 1 and "cannot read" in err


def test_corrupt_chunk_named_then_skipped(tmp_path, capsys, zarr_image):
    (zarr_image / "c" / "1" / "0").write_bytes(b"garbage")
    before = tree_digest(zarr_image)
    code, err = cli(capsys, "segment", zarr_image, "--out", tmp_path / "o.zarr")
    assert code == 2 and "key c/1/0" in err and "--skip-corrupt" in err
    code, err = cli(capsys, "segment", zarr_image, "--out", tmp_path / "o2.zarr",
                    "--skip-corrupt")
    assert code == 0 and "corrupt input chunk (1, 0)" in err
    labels = cellmask.open_labels(tmp_path / "o2.zarr")
    assert int(labels[128:, :128].max()) == 0 and int(labels[:128].max()) > 0
    group = zarr.open_group(str(tmp_path / "o2.zarr" / "labels" / "cellmask"), mode="r")
    assert "c/1/0" in group.attrs["cellmask"]["corrupt_input_chunks"][0]
    assert tree_digest(zarr_image) == before


def test_output_equal_to_input(tmp_path, capsys):
    image, _ = load_fixture("fluo_29dd28df98ee")
    src = tmp_path / "i.tif"
    tifffile.imwrite(src, image)
    before = src.read_bytes()
    code, err = cli(capsys, "segment", src, "--out", src)
    assert code == 2 and "is the input" in err
    assert src.read_bytes() == before


def test_unwritable_output(tmp_path, capsys):
    path = make(tmp_path, "s.npy", np.zeros((16, 16), np.uint8))
    code, err = cli(capsys, "segment", path, "--out", "/proc/cellmask-out.zarr")
    assert code == 2 and "cannot write the output" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path, capsys):
    path = make(tmp_path, "s.npy", np.zeros((16, 16), np.uint8))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    code, err = cli(capsys, "segment", path, "--out", ro / "o.zarr")
    assert code == 2 and "read-only" in err


@pytest.mark.parametrize("shape", [(1, 1), (7, 3000), (100000, 16)])
def test_extreme_shapes(tmp_path, shape, shipped_model):
    image = np.random.default_rng(0).integers(0, 50, shape).astype(np.uint8)
    result = cellmask.segment_zarr(image, tmp_path / "o.zarr", model=shipped_model,
                                   progress=False, measure=False)
    assert result.labels.shape == shape


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float64, bool])
def test_dtypes(tmp_path, dtype, shipped_model):
    image, _ = load_fixture("fluo_29dd28df98ee")
    ref = shipped_model.segment(image)
    data = (image > np.percentile(image, 75)) if dtype is bool else image.astype(dtype) * 3
    result = cellmask.segment_zarr(data, tmp_path / "o.zarr", model=shipped_model,
                                   progress=False, measure=False)
    if dtype is not bool:
        from cellmask.metrics import Evaluation

        ev = Evaluation(thresholds=(0.9,))
        ev.add(ref, np.asarray(result.labels))
        assert ev.table()["ap"][0] > 0.95
    else:
        assert result.objects > 10


def test_constant_image_has_no_objects(tmp_path, capsys):
    path = make(tmp_path, "c.npy", np.full((300, 200), 17, np.uint16))
    code, err = cli(capsys, "segment", path, "--out", tmp_path / "o.zarr")
    assert code == 0
    assert int(cellmask.open_labels(tmp_path / "o.zarr").max()) == 0


def test_no_pickle_or_torch_load_in_the_package():
    import pathlib
    import re

    root = pathlib.Path(cellmask.__file__).parent
    plugin = root.parent / "napari_plugin"
    offenders = []
    for py in list(root.rglob("*.py")) + list(plugin.rglob("*.py")):
        text = py.read_text()
        if re.search(r"(?m)^\s*(import|from) (pickle|cloudpickle|dill)\b|pickle\.loads?\(|"
                     r"torch\.load\(|joblib\.load\(", text):
            offenders.append(str(py))
    assert not offenders
