"""Whole-image runs: exact stitching (model-free), resume, locking, outputs, inputs."""

import json
import os
import signal
import subprocess
import sys
import time

import dask.array as da
import numpy as np
import pytest
import zarr
from skimage.draw import disk

import cellmask
from cellmask.metrics import Evaluation
from cellmask.pipeline import OutputLocked, run
from cellmask.run_state import RunFolder
from cellmask.stitch import InstanceSet
from fixtures import load_fixture


def oracle(truth):
    """A perfect detector: each ground-truth object that the window sees (clipped to it, as a
    network would see it), kept by the tile whose core holds the centre of its visible box."""
    ids = np.unique(truth)[1:]
    from scipy import ndimage

    slices = ndimage.find_objects(truth)

    def detect(tile, window):
        wy0, wy1, wx0, wx1 = tile.window
        wins, scores, masks = [], [], []
        for i in ids:
            sl = slices[i - 1]
            y0, y1 = max(sl[0].start, wy0), min(sl[0].stop, wy1)
            x0, x1 = max(sl[1].start, wx0), min(sl[1].stop, wx1)
            if y0 >= y1 or x0 >= x1:
                continue
            m = truth[y0:y1, x0:x1] == i
            if not m.any():
                continue
            ys, xs = np.nonzero(m)
            by0, by1, bx0, bx1 = y0 + ys.min(), y0 + ys.max() + 1, x0 + xs.min(), x0 + xs.max() + 1
            if not tile.owns(np.array([(by0 + by1) / 2]), np.array([(bx0 + bx1) / 2]))[0]:
                continue
            wins.append([bx0, by0, bx1, by1])
            masks.append(truth[by0:by1, bx0:bx1] == i)
            scores.append(0.9)
        if not wins:
            return InstanceSet.empty()
        return InstanceSet(np.array(wins), np.array(scores, np.float32), masks)

    return detect


def same_partition(a, b):
    """Equal up to a renaming of ids."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))
            and np.array_equal(a == 0, b == 0))


def disks_image(shape, n, rmax, seed):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    k = 0
    for _ in range(n):
        r = int(rng.integers(2, rmax))
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        rr, cc = disk((cy, cx), r, shape=shape)
        free = labels[rr, cc] == 0
        if free.sum() < 6:
            continue
        k += 1
        labels[rr[free], cc[free]] = k
    return labels


@pytest.mark.parametrize("tile,halo", [(64, 32), (96, 40), (128, 64), (200, 48), (1024, 64)])
def test_model_free_stitching_is_exact_on_real_masks(tmp_path, tile, halo):
    _, truth = load_fixture("fluo_e23e11414ee6")  # 520x696, 199 real nuclei up to ~40 px
    truth = truth.astype(np.int32)
    image = (truth > 0).astype(np.uint8)
    result = cellmask.segment_zarr(image, tmp_path / "o.zarr", tile=tile, halo=halo,
                                   progress=False, detector=oracle(truth), model=_tiny_model())
    labels = np.asarray(result.labels)
    assert same_partition(labels, truth)
    assert result.objects == truth.max()


@pytest.mark.parametrize("seed,shape,tile", [(0, (257, 391), 48), (1, (333, 129), 64),
                                             (2, (100, 100), 48)])
def test_model_free_stitching_on_dense_synthetic_disks(tmp_path, seed, shape, tile):
    truth = disks_image(shape, 400, 9, seed)
    result = cellmask.segment_zarr((truth > 0).astype(np.uint8), tmp_path / "o.zarr", tile=tile,
                                   halo=20, progress=False, detector=oracle(truth),
                                   model=_tiny_model(), measure=False)
    assert same_partition(np.asarray(result.labels), truth)


_TINY = {}


def _tiny_model():
    if "m" not in _TINY:
        from cellmask.config import ModelConfig
        from cellmask.model.network import build_network
        from cellmask.model.segmenter import Model

        cfg = ModelConfig(stage_widths=(8, 8, 8), stage_blocks=(1, 1, 1), fpn_channels=8,
                          box_head_width=8, mask_head_layers=(8,))
        _TINY["m"] = Model(build_network(cfg), cfg)
    return _TINY["m"]


def test_real_model_tiled_matches_whole_image(tmp_path, shipped_model):
    image, truth = load_fixture("fluo_e23e11414ee6")
    whole = shipped_model.segment(image, tile=4096)
    result = cellmask.segment_zarr(image, tmp_path / "o.zarr", model=shipped_model, tile=256,
                                   halo=64, progress=False)
    tiled = np.asarray(result.labels)
    ev = Evaluation(thresholds=(0.5, 0.9))
    ev.add(whole, tiled)
    r50, r90 = ev.table().to_dict("records")
    assert r90["tp"] >= 0.97 * whole.max()
    assert r50["fp"] <= 2 and r50["fn"] <= 2
    a_whole, a_tiled = Evaluation(thresholds=(0.5,)), Evaluation(thresholds=(0.5,))
    a_whole.add(truth, whole)
    a_tiled.add(truth, tiled)
    assert a_tiled.table()["ap"][0] >= a_whole.table()["ap"][0] - 0.01


def test_outputs_ngff_pyramid_and_measurements(tmp_path):
    _, truth = load_fixture("fluo_29dd28df98ee")
    truth = truth.astype(np.int32)
    image = np.where(truth > 0, 200, 10).astype(np.uint8)
    result = cellmask.segment_zarr(image, tmp_path / "o.zarr", tile=128, halo=32,
                                   progress=False, detector=oracle(truth), model=_tiny_model())
    group = zarr.open_group(str(tmp_path / "o.zarr" / "labels" / "cellmask"), mode="r")
    meta = group.attrs["ome"]
    assert meta["version"] == "0.5" and "image-label" in meta
    assert [d["path"] for d in meta["multiscales"][0]["datasets"]] == ["0", "1", "2"]
    assert group["1"].shape == (128, 128)
    assert np.array_equal(group["1"][:], group["0"][::2, ::2])
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(tmp_path / "o.zarr" / "labels" / "cellmask")))())
    assert any(len(n.data) >= 2 for n in nodes)
    table = result.table
    assert (tmp_path / "o.zarr/labels/cellmask/measurements.parquet").is_file()
    ref = cellmask.measure(np.asarray(result.labels), image)
    for col in ("label", "area", "centroid-0", "centroid-1", "bbox-0", "bbox-3", "perimeter",
                "solidity", "eccentricity", "intensity_mean", "intensity_sum"):
        assert np.allclose(table[col], ref[col], atol=1e-6), col
    assert np.array_equal(np.asarray(cellmask.open_labels(tmp_path / "o.zarr")),
                          np.asarray(result.labels))


def test_second_run_on_same_output_is_refused(tmp_path):
    image = np.zeros((64, 64), np.uint8)
    gen = run(image, tmp_path / "o.zarr", tile=32, halo=8, model=_tiny_model(),
              detector=lambda tile, window: InstanceSet.empty())
    next(gen)  # first run holds the lock, mid-way
    with pytest.raises(OutputLocked, match="another cellmask run"):
        list(run(image, tmp_path / "o.zarr", tile=32, halo=8, model=_tiny_model(),
                 detector=lambda tile, window: InstanceSet.empty()))
    list(gen)  # the first completes
    result = list(run(image, tmp_path / "o.zarr", tile=32, halo=8, model=_tiny_model(),
                      detector=lambda tile, window: InstanceSet.empty()))[-1]
    assert result.objects == 0


def test_different_settings_do_not_mix(tmp_path):
    image = np.zeros((64, 64), np.uint8)
    cellmask.segment_zarr(image, tmp_path / "o.zarr", tile=32, halo=8, model=_tiny_model(),
                          progress=False)
    # (with fewer tiles, fewer network passes run at once: the threads per pass differ too)
    with pytest.raises(FileExistsError, match=r"another run \(.*settings.tile: 32 -> 64\)"
                       r".*--overwrite"):
        cellmask.segment_zarr(image, tmp_path / "o.zarr", tile=64, halo=8, model=_tiny_model(),
                              progress=False)
    again = cellmask.segment_zarr(image, tmp_path / "o.zarr", tile=64, halo=8,
                                  model=_tiny_model(), progress=False, overwrite=True)
    assert again.labels.shape == (64, 64)


def test_labels_of_another_shape_are_refused_before_anything_is_written(tmp_path):
    cellmask.segment_zarr(np.zeros((64, 64), np.uint8), tmp_path / "o.zarr", tile=32, halo=8,
                          model=_tiny_model(), progress=False)
    run_json = tmp_path / "o.zarr" / "labels" / "cellmask" / ".run" / "run.json"
    before = run_json.read_text()
    with pytest.raises(FileExistsError, match="another shape"):
        cellmask.segment_zarr(np.zeros((96, 64), np.uint8), tmp_path / "o.zarr", tile=32,
                              halo=8, model=_tiny_model(), progress=False)
    assert run_json.read_text() == before


def test_resume_after_sigkill_gives_identical_labels(tmp_path, shipped_model):
    from benchmarks.mosaic import dense_mosaic  # noqa: F401  (repo root importable)

    image, _ = load_fixture("fluo_e23e11414ee6")
    src = tmp_path / "in.npy"
    np.save(src, image)
    clean = cellmask.segment_zarr(src, tmp_path / "clean.zarr", model=shipped_model, tile=128,
                                  halo=48, progress=False)
    cmd = [sys.executable, "-c",
           "import sys, cellmask; cellmask.segment_zarr(sys.argv[1], sys.argv[2], tile=128, "
           "halo=48, progress=False)", str(src), str(tmp_path / "killed.zarr")]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    tiles = tmp_path / "killed.zarr" / "labels" / "cellmask" / ".run" / "tiles"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tiles.glob("*_*.npz"))) < 8:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in tiles.glob("*_*.npz") if ".tmp" not in p.name}
    assert 0 < len(finished) < 30  # killed mid-run (30 tiles in all)
    resumed = cellmask.segment_zarr(src, tmp_path / "killed.zarr", model=shipped_model, tile=128,
                                    halo=48, progress=False)
    assert np.array_equal(np.asarray(resumed.labels), np.asarray(clean.labels))
    assert resumed.table.equals(clean.table)
    assert json.loads((tiles.parent / "run.json").read_text())["state"] == "done"
    # finished tiles were not redone: their records are untouched
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())


@pytest.mark.parametrize("kind", ["numpy", "dask", "npy", "tiff", "zarr", "ome-zarr-0.5",
                                  "ome-zarr-0.4"])
def test_inputs(tmp_path, kind, shipped_model):
    import tifffile

    image, _ = load_fixture("fluo_29dd28df98ee")
    ref = shipped_model.segment(image)
    out = tmp_path / "out.zarr"
    if kind == "numpy":
        source = image
    elif kind == "dask":
        source = da.from_array(image, chunks=100)
    elif kind == "npy":
        source = tmp_path / "i.npy"
        np.save(source, image)
    elif kind == "tiff":
        source = tmp_path / "i.tif"
        tifffile.imwrite(source, image, tile=(64, 64))
    elif kind == "zarr":
        source = tmp_path / "i.zarr"
        zarr.create_array(str(source), shape=image.shape, chunks=(100, 100), dtype=image.dtype)[:] = image
    else:
        from ome_zarr.format import FormatV04, FormatV05
        from ome_zarr.writer import write_image

        v04 = kind.endswith("0.4")
        source = tmp_path / "i.ome.zarr"
        group = zarr.open_group(str(source), mode="w", zarr_format=2 if v04 else 3)
        write_image(image[None], group, axes="cyx", fmt=FormatV04() if v04 else FormatV05(),
                    scale_factors=(2,))
        out = None
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = cellmask.segment_zarr(source, out, model=shipped_model, tile=1024, halo=64,
                                   progress=False)
    labels = np.asarray(result.labels)
    ev = Evaluation(thresholds=(0.9,))
    ev.add(ref, labels)
    assert ev.table()["ap"][0] >= 0.98
    for p, data in before.items():  # the input is never modified
        assert p.read_bytes() == data, p
    if kind.startswith("ome-zarr"):
        assert result.path == source / "labels" / "cellmask"
        if kind.endswith("0.4"):
            attrs = json.loads((result.path / ".zattrs").read_text())
            assert attrs["multiscales"][0]["version"] == "0.4"


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        cellmask.segment_zarr(tmp_path / "missing.zarr", tmp_path / "o.zarr", progress=False)
    (tmp_path / "folder").mkdir()
    with pytest.raises(cellmask.InputError, match="not a Zarr store"):
        cellmask.segment_zarr(tmp_path / "folder", tmp_path / "o.zarr", progress=False)
    with pytest.raises(cellmask.InputError, match="channels"):
        cellmask.segment_zarr(np.zeros((4, 32, 32)), tmp_path / "o.zarr", axes="CYX",
                              progress=False)
    with pytest.raises(cellmask.InputError, match="planes along Z"):
        cellmask.segment_zarr(np.zeros((3, 32, 32)), tmp_path / "o.zarr", axes="ZYX",
                              progress=False)
    with pytest.raises(cellmask.InputError, match="twice the halo"):
        cellmask.segment_zarr(np.zeros((32, 32)), tmp_path / "o.zarr", tile=64, halo=64,
                              progress=False)
    with pytest.raises(cellmask.InputError, match="needs output"):
        cellmask.segment_zarr(np.zeros((32, 32)), progress=False)


def test_dask_distributed_cluster_gives_identical_labels(tmp_path, shipped_model):
    from dask.distributed import Client, LocalCluster

    image, _ = load_fixture("fluo_e23e11414ee6")
    src = tmp_path / "in.npy"
    np.save(src, image)
    local = cellmask.segment_zarr(src, tmp_path / "local.zarr", model=shipped_model, tile=256,
                                  halo=64, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        dist = cellmask.segment_zarr(src, tmp_path / "dist.zarr", model=shipped_model, tile=256,
                                     halo=64, client=client, progress=False)
        pids = set(client.run(os.getpid).values())
    assert len(pids) == 2
    assert np.array_equal(np.asarray(dist.labels), np.asarray(local.labels))
    assert dist.table.equals(local.table)


def test_corrupt_chunk_is_named(tmp_path):
    image, _ = load_fixture("fluo_29dd28df98ee")
    src = tmp_path / "i.zarr"
    zarr.create_array(str(src), shape=image.shape, chunks=(128, 128), dtype=image.dtype)[:] = image
    (src / "c" / "1" / "0").write_bytes(b"garbage, not a compressed chunk")
    with pytest.raises(cellmask.InputError, match=r"chunk \(1, 0\).*key c/1/0"):
        cellmask.segment_zarr(src, tmp_path / "o.zarr", tile=128, halo=32, progress=False,
                              model=_tiny_model())


@pytest.mark.parametrize("layout", ["new", "equal-chunks"])
def test_pyramid_levels_downsample_level0_for_any_shape(tmp_path, layout):
    _, truth = load_fixture("fluo_29dd28df98ee")
    truth = truth[:203, :177].astype(np.int32)  # odd sides: partial chunks at every level
    image = np.where(truth > 0, 200, 10).astype(np.uint8)
    out = tmp_path / "o.zarr"
    if layout == "equal-chunks":  # labels written by an older cellmask: same chunks per level
        labels = zarr.open_group(str(out), mode="w").require_group("labels")
        group = labels.require_group("cellmask")
        for path, shape in (("0", (203, 177)), ("1", (102, 89)), ("2", (51, 45))):
            group.create_array(path, shape=shape, chunks=(64, 64), dtype="int32", fill_value=0)
        (out / "labels" / "cellmask" / ".run").mkdir()  # every cellmask output has its run folder
    cellmask.segment_zarr(image, out, tile=64, halo=16, progress=False,
                          detector=oracle(truth), model=_tiny_model(), measure=False)
    group = zarr.open_group(str(out / "labels" / "cellmask"), mode="r")
    level0 = group["0"][:]
    assert level0.max() > 10
    assert np.array_equal(group["1"][:], level0[::2, ::2])
    assert np.array_equal(group["2"][:], level0[::4, ::4])
    if layout == "new":
        assert [group[p].chunks for p in "012"] == [(64, 64), (32, 32), (16, 16)]


def test_pyramidal_bigtiff(tmp_path, shipped_model):
    import tifffile

    image, _ = load_fixture("fluo_29dd28df98ee")
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(image, tile=(64, 64), subifds=1, compression="zlib")
        tif.write(image[::2, ::2], tile=(64, 64), subfiletype=1, compression="zlib")
    src = cellmask.sources.open_image(path)
    assert len(src.levels) == 2 and src.levels[1].shape[:2] == (128, 128)
    result = cellmask.segment_zarr(path, tmp_path / "o.zarr", model=shipped_model,
                                   progress=False)
    ev = Evaluation(thresholds=(0.9,))
    ev.add(shipped_model.segment(image), np.asarray(result.labels))
    assert ev.table()["ap"][0] >= 0.98


@pytest.mark.data
def test_aperio_svs_region(tmp_path, shipped_model):
    from fixtures import SHARED

    svs = SHARED / "cmu1_he_region" / "CMU-1-Small-Region.svs"
    src = cellmask.sources.open_image(svs)
    assert src.shape == (2967, 2220) and src.array.shape[2] == 3
    result = cellmask.segment_zarr(svs, tmp_path / "o.zarr", model=shipped_model, tile=1024,
                                   progress=False, measure=False)
    assert result.objects > 500  # an H&E region full of nuclei


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_batched_tiles_give_the_same_labels(tmp_path, precision):
    from cellmask.model.quantize import int8_supported

    if precision == "int8" and not int8_supported():
        pytest.skip("no oneDNN quantised kernels")
    model = cellmask.load_model(device="cpu", precision=precision)
    image, _ = load_fixture("fluo_e23e11414ee6")
    one = cellmask.segment_zarr(image, tmp_path / "a.zarr", model=model, tile=256,
                                halo=64, batch_size=1, progress=False, measure=False)
    four = cellmask.segment_zarr(image, tmp_path / "b.zarr", model=model, tile=256,
                                 halo=64, batch_size=4, progress=False, measure=False)
    ev = Evaluation(thresholds=(0.5, 0.9))
    ev.add(np.asarray(one.labels), np.asarray(four.labels))
    ap = ev.table()["ap"]
    # batches pad tiles to one size: the same objects; fp32 masks agree to rounding, while the
    # int8 kernels round differently for another batch size (measured: 95% identical at 0.9)
    assert ap[0] >= 0.97 and ap[1] >= (0.97 if precision == "fp32" else 0.9)


def test_bf16_autocast_runs_and_agrees(shipped_model):
    from cellmask.model.segmenter import Model

    image, _ = load_fixture("fluo_29dd28df98ee")
    bf16 = Model(shipped_model.net, shipped_model.config, meta=shipped_model.meta,
                 precision="bf16")
    ev = Evaluation(thresholds=(0.5,))
    ev.add(shipped_model.segment(image), bf16.segment(image))
    assert ev.table()["ap"][0] >= 0.9


def test_objects_larger_than_the_halo_are_reported(tmp_path, caplog):
    truth = np.zeros((200, 200), np.int32)
    truth[disk((100, 100), 40)] = 1  # 81 px across, halo 32
    with caplog.at_level("WARNING"):
        cellmask.segment_zarr((truth > 0).astype(np.uint8), tmp_path / "o.zarr", tile=96,
                              halo=32, progress=False, detector=oracle(truth),
                              model=_tiny_model(), measure=False)
    assert any("--halo 96" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):  # one tile: no seam can cut it, nothing to warn of
        cellmask.segment_zarr((truth > 0).astype(np.uint8), tmp_path / "one.zarr", tile=256,
                              halo=32, progress=False, detector=oracle(truth),
                              model=_tiny_model(), measure=False)
    assert not any("halo" in r.message for r in caplog.records)


def test_parallel_tile_workers_give_the_same_labels(tmp_path, shipped_model):
    from concurrent.futures import ThreadPoolExecutor

    import torch

    image, _ = load_fixture("fluo_e23e11414ee6")
    runs = [cellmask.segment_zarr(image, tmp_path / f"{w}.zarr", model=shipped_model, tile=256,
                                  halo=64, workers=w, progress=False, measure=False)
            for w in (1, 2, 3)]
    first = np.asarray(runs[0].labels)
    assert first.max() > 20
    for r in runs[1:]:
        assert np.array_equal(first, np.asarray(r.labels))
    # the workers' thread settings do not leak into threads started afterwards
    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(torch.get_num_threads).result() == torch.get_num_threads()


def test_error_in_one_tile_worker_stops_the_run_cleanly(tmp_path, shipped_model):
    image, _ = load_fixture("fluo_e23e11414ee6")
    image = np.tile(image, (4, 4)).astype(np.float32)  # 5.8 Mpx: intensities sampled 1 in 4
    image[1301, 2001] = np.nan  # one pixel the sample misses, in one tile
    kwargs = dict(model=shipped_model, tile=512, halo=64, workers=2, progress=False)
    region = "NaN or infinite pixels in y 960:1600, x 1472:2112"
    with pytest.raises(cellmask.InputError, match=region):
        cellmask.segment_zarr(image, tmp_path / "o.zarr", **kwargs)
    run_dir = tmp_path / "o.zarr/labels/cellmask/.run"
    saved = len(list((run_dir / "tiles").glob("*.npz")))
    assert saved < 30  # 5 x 6 tiles
    folder = RunFolder(run_dir.parent)
    folder.lock()  # the failed run released its lock
    folder.unlock()
    image[1301, 2001] = 0  # repaired: the same command finishes, keeping the saved tiles
    result = cellmask.segment_zarr(image, tmp_path / "o.zarr", measure=False, **kwargs)
    assert result.objects > 1000 and len(list((run_dir / "tiles").glob("*.npz"))) == 30


def test_the_image_copy_stops_with_a_failed_run_and_is_whole_after_it(tmp_path):
    """The input is copied into the output while tiles are detected; a run that fails leaves
    no copying thread behind, and the run that finishes holds the whole input."""
    import threading

    image, truth = load_fixture("fluo_29dd28df98ee")
    perfect, calls = oracle(truth), {"n": 0}

    def failing(tile, window):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a tile failed")
        return perfect(tile, window)

    out = tmp_path / "o.zarr"
    kwargs = dict(tile=64, halo=16, model=_tiny_model(), progress=False, measure=False)
    with pytest.raises(RuntimeError, match="a tile failed"):
        cellmask.segment_zarr(image, out, detector=failing, **kwargs)
    assert not [t for t in threading.enumerate() if t.name == "cellmask-image-copy"]
    result = cellmask.segment_zarr(image, out, detector=perfect, **kwargs)
    root = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(root["0"][0], image)
    np.testing.assert_array_equal(root["2"][0], image[::4, ::4])
    assert same_partition(np.asarray(result.labels), truth)
