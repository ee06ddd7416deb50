import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmask.io import read_ome_zarr_labels
from cellmask.samples import load_sample


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cellmask", "--quiet", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_demo_writes_labels_table_and_overlay(tmp_path, shipped_model):
    r = run("demo", "--out", str(tmp_path / "demo"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "nuclei found" in r.stdout
    labels = read_ome_zarr_labels(tmp_path / "demo" / "sample.ome.zarr")
    image, _ = load_sample()
    assert np.array_equal(labels, shipped_model.segment(image))
    table = pd.read_csv(tmp_path / "demo" / "measurements.csv")
    assert len(table) == labels.max() and "intensity_mean" in table.columns
    assert (tmp_path / "demo" / "overlay.png").stat().st_size > 10_000
    again = run("demo", "--out", str(tmp_path / "demo"), "--device", "cpu")
    assert again.returncode == 0, again.stderr


def test_segment_command(tmp_path):
    image, _ = load_sample()
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image)
    before = src.read_bytes()
    r = run("segment", str(src), "--out", str(tmp_path / "out.ome.zarr"), "--tile", "256")
    assert r.returncode == 0, r.stderr
    labels = read_ome_zarr_labels(tmp_path / "out.ome.zarr")
    assert labels.shape == image.shape and labels.max() > 50
    table = pd.read_csv(tmp_path / "out.ome.zarr" / "labels" / "cellmask" / "measurements.csv")
    assert len(table) == labels.max()
    assert src.read_bytes() == before  # input untouched
    again = run("segment", str(src), "--out", str(tmp_path / "out.ome.zarr"), "--tile", "256")
    assert again.returncode == 0, again.stderr  # the same command again: resumes, nothing to do
    assert np.array_equal(read_ome_zarr_labels(tmp_path / "out.ome.zarr"), labels)
    other = run("segment", str(src), "--out", str(tmp_path / "out.ome.zarr"))
    # the refusal names the setting that changed (the worker split may change with the tiles too)
    assert other.returncode == 2 and "settings.tile: 256 -> 1024" in other.stderr
    assert "INFO" not in other.stderr and len(other.stderr.strip().splitlines()) == 1  # --quiet
    assert "Traceback" not in other.stderr


def test_segment_without_the_image(tmp_path):
    """``--no-image``: the store holds the labels and the table, not a copy of the input, and
    the labels name the input as their source."""
    import zarr

    image, _ = load_sample()
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image)
    out = tmp_path / "out.ome.zarr"
    r = run("segment", str(src), "--out", str(out), "--no-image")
    assert r.returncode == 0, r.stderr
    root = zarr.open_group(str(out), mode="r")
    assert "0" not in root and "multiscales" not in root.attrs.get("ome", {})
    assert read_ome_zarr_labels(out).max() > 50
    source = zarr.open_group(str(out / "labels" / "cellmask"), mode="r").attrs["ome"]
    assert source["image-label"]["source"]["image"] == str(src)
    assert (out / "labels" / "cellmask" / "measurements.csv").is_file()


@pytest.mark.parametrize("content,message", [(None, "does not exist"),
                                             (b"this is text", "cannot read")])
def test_bad_input_files(tmp_path, content, message):
    path = tmp_path / "image.tif"
    if content is not None:
        path.write_bytes(content)
    r = run("segment", str(path))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_evaluate_prints_the_table(dataset_dir):
    r = run("evaluate", "--data", str(dataset_dir), "--split", "splits/train.txt",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "AP@0.5" in r.stdout and "0.950" in r.stdout  # the last threshold row


def test_export_refuses_a_test_split(tmp_path, dataset_dir):
    (dataset_dir / "splits" / "test.txt").write_text("x\n")
    r = run("export", "nuclei", "--data", str(dataset_dir), "--split", "splits/test.txt",
            "--out", str(tmp_path / "w.safetensors"))
    assert r.returncode == 2 and "test split" in r.stderr


def test_segment_with_augment_fuses_eight_views_and_records_them(tmp_path, shipped_model):
    image, _ = load_sample()
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image)
    r = run("segment", str(src), "--out", str(tmp_path / "a.ome.zarr"), "--augment",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    labels = read_ome_zarr_labels(tmp_path / "a.ome.zarr")
    assert np.array_equal(labels, shipped_model.with_config(test_views=8).segment(image))
    import zarr

    record = zarr.open_group(str(tmp_path / "a.ome.zarr" / "labels" / "cellmask"),
                             mode="r").attrs["cellmask"]
    assert record["test_views"] == 8
    # a run without the views is another computation: it does not resume this folder
    other = run("segment", str(src), "--out", str(tmp_path / "a.ome.zarr"), "--device", "cpu")
    assert other.returncode == 2 and "test_views: 8 -> 1" in other.stderr
