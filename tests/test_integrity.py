"""Every output belongs to its input: identity, ownership, durability, clear refusals."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from fixtures import load_fixture
from test_pipeline import _tiny_model, oracle

import cellmask
from cellmask import labels_store
from cellmask.errors import OutputConflict, OutputLocked
from cellmask.pipeline import output_root
from cellmask.run_state import RunFolder
from cellmask.sources import ImageSource, open_image


def _oracle_run(image, truth, out, **kw):
    kw.setdefault("tile", 64)
    kw.setdefault("halo", 16)
    return cellmask.segment_zarr(image, out, progress=False, detector=oracle(truth),
                                 model=_tiny_model(), measure=False, **kw)


@pytest.mark.parametrize("name,expected", [
    ("plate.A1.tif", "plate.A1.cellmask.ome.zarr"),
    ("plate.A2.tif", "plate.A2.cellmask.ome.zarr"),
    ("2024.01.05_slide.svs", "2024.01.05_slide.cellmask.ome.zarr"),
    ("scan.ome.tif", "scan.cellmask.ome.zarr"),
    ("cells.npy", "cells.cellmask.ome.zarr")])
def test_default_output_names_keep_the_whole_stem(tmp_path, name, expected):
    src = ImageSource(np.zeros((4, 4, 1)), kind="tiff", path=tmp_path / name)
    assert output_root(src, None) == tmp_path / expected


def test_output_named_like_an_image_file_is_refused(tmp_path):
    with pytest.raises(cellmask.InputError, match="names an image file"):
        cellmask.segment_zarr(np.zeros((64, 64), np.uint8), tmp_path / "result.png",
                              model=_tiny_model(), progress=False)
    assert not (tmp_path / "result.png").exists()


def test_labels_as_tiff_when_asked(tmp_path):
    image, truth = load_fixture("fluo_29dd28df98ee")
    (tmp_path / "mine.tif").write_bytes(b"a user's file")
    with pytest.raises(OutputConflict, match="mine.tif exists"):
        _oracle_run(image, truth, tmp_path / "mine.tif")
    assert (tmp_path / "mine.tif").read_bytes() == b"a user's file"
    result = _oracle_run(image, truth, tmp_path / "labels.tif", pixel_size=0.5)
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        labels = tif.asarray()
        assert tif.pages[0].is_tiled
    assert np.array_equal(labels, np.asarray(result.labels)) and labels.max() > 10
    assert result.path.parent.parent == tmp_path / "labels.ome.zarr"
    again = _oracle_run(image, truth, tmp_path / "labels.tif", pixel_size=0.5)  # resumes
    assert again.objects == result.objects


def test_resuming_with_another_input_is_refused(tmp_path):
    image, truth = load_fixture("fluo_29dd28df98ee")
    b03, b04 = tmp_path / "screen.B03.tif", tmp_path / "screen.B04.tif"
    tifffile.imwrite(b03, image)
    tifffile.imwrite(b04, image[::-1])  # same shape, dtype and intensity range
    first = _oracle_run(b03, truth, None)
    assert first.path.parent.parent.name == "screen.B03.cellmask.ome.zarr"
    with pytest.raises(OutputConflict, match="input.path.*--overwrite") as info:
        _oracle_run(b04, truth[::-1], first.path.parent.parent)
    assert "input.sample_sha256" in str(info.value)
    again = _oracle_run(b04, truth[::-1], first.path.parent.parent, overwrite=True)
    assert np.array_equal(np.asarray(again.labels) > 0, truth[::-1] > 0)


def test_in_memory_inputs_are_told_apart_by_their_pixels(tmp_path):
    image, truth = load_fixture("fluo_29dd28df98ee")
    _oracle_run(image, truth, tmp_path / "o.zarr")
    with pytest.raises(OutputConflict, match="sample_sha256"):
        _oracle_run(image[:, ::-1].copy(), truth[:, ::-1], tmp_path / "o.zarr")


def test_batch_size_and_precision_are_in_the_fingerprint(tmp_path):
    image, truth = load_fixture("fluo_29dd28df98ee")
    _oracle_run(image, truth, tmp_path / "o.zarr", batch_size=1)
    with pytest.raises(OutputConflict, match=r"settings.batch: 1 -> 2"):
        _oracle_run(image, truth, tmp_path / "o.zarr", batch_size=2)
    fp = json.loads((tmp_path / "o.zarr/labels/cellmask/.run/run.json").read_text())
    assert fp["fingerprint"]["settings"]["precision"] == _tiny_model().precision
    assert fp["fingerprint"]["settings"]["threads_per_pass"] >= 1
    assert fp["fingerprint"]["model"]["digest"] == _tiny_model().weights_digest


def test_threads_per_network_pass_are_in_the_fingerprint(tmp_path):
    import torch

    image, truth = load_fixture("fluo_29dd28df98ee")
    total = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _oracle_run(image, truth, tmp_path / "o.zarr", workers=1)
        with pytest.raises(OutputConflict, match=r"settings.threads_per_pass: 2 -> 1"):
            _oracle_run(image, truth, tmp_path / "o.zarr", workers=2)
    finally:
        torch.set_num_threads(total)


def _foreign_labels(root: Path):
    """A store with ``labels/nuclei`` written by another tool (no cellmask run folder)."""
    group = zarr.open_group(str(root), mode="w")
    labels = group.require_group("labels")
    labels.attrs["ome"] = {"version": "0.5", "labels": ["nuclei"]}
    nuclei = labels.require_group("nuclei")
    arr = nuclei.create_array("0", shape=(64, 64), chunks=(64, 64), dtype="int32", fill_value=0)
    arr[:] = 7
    nuclei.attrs["ome"] = {"version": "0.5", "image-label": {"source": {"image": "../../"}}}
    return root / "labels" / "nuclei"


@pytest.mark.parametrize("overwrite", [False, True])
def test_labels_of_another_tool_are_never_written(tmp_path, overwrite):
    image, truth = load_fixture("fluo_29dd28df98ee")
    theirs = _foreign_labels(tmp_path / "o.zarr")
    before = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    with pytest.raises(OutputConflict, match="did not write.*--name"):
        _oracle_run(image, truth, tmp_path / "o.zarr", name="nuclei", overwrite=overwrite)
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before
    ours = _oracle_run(image, truth, tmp_path / "o.zarr")  # beside them: fine
    assert ours.objects > 0
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before
    names = zarr.open_group(str(tmp_path / "o.zarr/labels")).attrs["ome"]["labels"]
    assert names == ["nuclei", "cellmask"]


def test_edited_labels_are_not_painted_over(tmp_path):
    image, truth = load_fixture("fluo_29dd28df98ee")
    first = _oracle_run(image, truth, tmp_path / "o.zarr")
    level0 = zarr.open_array(str(first.path / "0"), mode="r+")
    level0[10:20, 70:80] = 999  # a user's correction, saved into cellmask's labels
    with pytest.raises(OutputConflict, match=r"1 tile\(s\).*edited.*y 0:64, x 64:128"):
        _oracle_run(image, truth, tmp_path / "o.zarr")
    assert (level0[10:20, 70:80] == 999).all()
    again = _oracle_run(image, truth, tmp_path / "o.zarr", overwrite=True)
    assert np.array_equal(np.asarray(again.labels), np.asarray(first.labels))


def test_power_cut_records_cut_short_are_recomputed(tmp_path):
    image, truth = load_fixture("fluo_29dd28df98ee")
    clean = np.asarray(_oracle_run(image, truth, tmp_path / "clean.zarr").labels)
    out = tmp_path / "o.zarr"
    _oracle_run(image, truth, out)
    run_dir = out / "labels/cellmask/.run"
    records = sorted((run_dir / "tiles").glob("*.npz"))
    for rec in records[::3]:  # a file system that lost the end of some writes
        data = rec.read_bytes()
        rec.write_bytes(data[:len(data) // 2])
    state = json.loads((run_dir / "run.json").read_text())
    state["state"] = "tiles"
    (run_dir / "run.json").write_text(json.dumps(state))
    result = _oracle_run(image, truth, out)
    assert np.array_equal(np.asarray(result.labels), clean)
    (run_dir / "run.json").write_text((run_dir / "run.json").read_text()[:40])  # cut short
    result = _oracle_run(image, truth, out)
    assert np.array_equal(np.asarray(result.labels), clean)


def test_no_temporary_files_are_left_and_writes_are_atomic(tmp_path):
    image, truth = load_fixture("fluo_29dd28df98ee")
    result = cellmask.segment_zarr(image, tmp_path / "o.zarr", progress=False, tile=64,
                                   halo=16, detector=oracle(truth), model=_tiny_model())
    leftovers = [p for p in result.path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [] and (result.path / "measurements.parquet").is_file()


LOCK_HOLDER = ("import sys, time; from cellmask.run_state import RunFolder; "
               "f = RunFolder(sys.argv[1]); f.lock(); print('locked', flush=True); "
               "time.sleep(60)")


def test_a_lock_dies_with_its_process(tmp_path):
    group = tmp_path / "o.zarr/labels/cellmask"
    group.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(group)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked, match=f"pid {proc.pid}"):
            RunFolder(group).lock()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    folder = RunFolder(group)  # no stale lock to take over: the kernel released it
    folder.lock()
    folder.unlock()


def test_z_and_t_need_those_axes():
    with pytest.raises(cellmask.InputError, match="z=3 was given but the image has no Z axis"):
        open_image(np.zeros((32, 32), np.uint8), z=3)
    with pytest.raises(cellmask.InputError, match="no T axis"):
        open_image(np.zeros((2, 32, 32), np.uint8), axes="ZYX", z=0, t=1)


def test_huge_claimed_shape_is_refused_before_allocating(tmp_path):
    import resource

    zarr.create_array(str(tmp_path / "bomb.zarr"), shape=(2 ** 31, 2 ** 31), chunks=(1, 1),
                      dtype="uint8")
    assert sum(p.stat().st_size for p in (tmp_path / "bomb.zarr").rglob("*")
               if p.is_file()) < 1000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(cellmask.InputError, match="beyond any image"):
        open_image(tmp_path / "bomb.zarr")
    assert time.perf_counter() - t0 < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    zarr.create_array(str(tmp_path / "many.zarr"), shape=(2 ** 17, 2 ** 17), chunks=(8, 8),
                      dtype="uint8")
    with pytest.raises(cellmask.InputError, match="chunks.*re-save it with larger chunks"):
        open_image(tmp_path / "many.zarr")


def test_weights_header_values_are_checked(tmp_path):
    from safetensors.torch import load_file, save_file

    from cellmask.model.registry import shipped_path as model_path
    from cellmask.model.weights import WeightsError, load_weights

    state = load_file(str(model_path("nuclei")))
    _, config, meta = load_weights(model_path("nuclei"))
    for field, value in (("fpn_channels", 10 ** 9), ("score_thresh", "high"),
                         ("stage_widths", [32, 64]), ("mask_roi_size", -3)):
        cfg = json.loads(config.to_json())
        cfg[field] = value
        path = tmp_path / f"{field}.safetensors"
        save_file(state, str(path), metadata={**meta, "config": json.dumps(cfg)})
        with pytest.raises(WeightsError, match=field):
            cellmask.load_model(path)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cellmask", "--quiet", *map(str, args)],
                          capture_output=True, text=True, env=env)


def test_exit_status_tells_bad_input_from_internal_errors(tmp_path, monkeypatch, capsys):
    from cellmask import cli

    r = _cli("segment", tmp_path / "missing.tif")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr

    def broken(*args, **kwargs):
        raise KeyError("a defect")

    monkeypatch.setattr("cellmask.pipeline.segment_zarr", broken)
    image, _ = load_fixture("fluo_29dd28df98ee")
    tifffile.imwrite(tmp_path / "in.tif", image)
    code = cli.main(["--quiet", "segment", str(tmp_path / "in.tif"), "--model",
                     str(Path(cellmask.__file__).parent / "weights/nuclei.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and "internal error" in err and "--debug" in err


def test_input_errors_come_before_torch_loads(tmp_path):
    code = ("import sys; from cellmask.cli import main; "
            "code = main(['--quiet', 'segment', sys.argv[1], '--z', '2']); "
            "print(code, 'torch' in sys.modules)")
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((64, 64), np.uint8))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.tif")],
                       capture_output=True, text=True)
    assert r.stdout.split() == ["2", "False"], r.stderr
    assert "no Z axis" in r.stderr


def test_demo_never_deletes_what_is_not_its_own(tmp_path):
    from cellmask.demo import run_demo

    mine = tmp_path / "sample.ome.zarr"
    mine.mkdir()
    (mine / "precious.txt").write_text("a user's file")
    with pytest.raises(OutputConflict, match="not an earlier demo output"):
        run_demo(tmp_path, device="cpu")
    assert (mine / "precious.txt").read_text() == "a user's file"


def test_distributed_equals_local_with_every_setting(tmp_path, shipped_model):
    from dask.distributed import Client, LocalCluster

    image, _ = load_fixture("histo_0e4c2e2780de")  # brightfield, rescaled
    src = zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, chunks=(64, 64, 3),
                            dtype=image.dtype)
    src[:] = image
    chunk = tmp_path / "in.zarr" / "c" / "1" / "1" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"garbage")  # one unreadable chunk
    kw = dict(model=shipped_model, tile=128, halo=32, modality="brightfield", scale=1.25,
              skip_corrupt=True, progress=False)
    local = cellmask.segment_zarr(tmp_path / "in.zarr", tmp_path / "local.zarr", **kw)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        dist = cellmask.segment_zarr(tmp_path / "in.zarr", tmp_path / "dist.zarr",
                                     client=client, **kw)
    assert local.corrupt and sorted(dist.corrupt) == sorted(local.corrupt)
    assert local.objects > 10
    assert np.array_equal(np.asarray(dist.labels), np.asarray(local.labels))


def test_files_written_atomically_get_the_mode_open_would_give(tmp_path):
    """A table or GeoJSON is readable by whom the umask allows, not private as temporary
    files are made; a replaced file keeps its mode."""
    old = os.umask(0o027)
    try:
        labels_store.write_atomic(tmp_path / "t.csv", lambda fh: fh.write(b"a\n1\n"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t.csv").stat().st_mode) == 0o640
    os.chmod(tmp_path / "t.csv", 0o604)
    labels_store.write_atomic(tmp_path / "t.csv", lambda fh: fh.write(b"a\n2\n"))
    assert stat.S_IMODE((tmp_path / "t.csv").stat().st_mode) == 0o604
    assert (tmp_path / "t.csv").read_bytes() == b"a\n2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]  # no temporary left
