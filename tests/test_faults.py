"""Faults: kills at any moment, a dying dask worker, a full disk. Output stays identical."""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import cellmask
from cellmask import labels_store
from fixtures import load_fixture

RUN = ("import sys, cellmask; cellmask.segment_zarr(sys.argv[1], sys.argv[2], tile=128, halo=48, "
       "progress=False)")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    image, _ = load_fixture("fluo_e23e11414ee6")
    np.save(d / "in.npy", image)
    clean = cellmask.segment_zarr(d / "in.npy", d / "clean.zarr", tile=128, halo=48,
                                  progress=False)
    return d / "in.npy", np.asarray(clean.labels), clean.table


def test_sigkill_at_random_moments_then_resume(tmp_path, source):
    src, clean_labels, clean_table = source
    out = tmp_path / "o.zarr"
    rng = np.random.default_rng(7)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()  # an uninterrupted run, timed: kills fall inside a run's span
    subprocess.run([sys.executable, "-c", RUN, str(src), str(tmp_path / "timed.zarr")], env=env,
                   check=True)
    span = time.perf_counter() - t0
    kills = 0
    for _ in range(6):  # kill at random points: loading, tiles, stitching, painting, pyramid
        proc = subprocess.Popen([sys.executable, "-c", RUN, str(src), str(out)], env=env)
        time.sleep(float(rng.uniform(0.3, 0.8) * span))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3
    result = cellmask.segment_zarr(src, out, tile=128, halo=48, progress=False)
    assert np.array_equal(np.asarray(result.labels), clean_labels)
    assert result.table.equals(clean_table)


def test_disk_full_is_clear_and_resumable(tmp_path, source, monkeypatch):
    src, clean_labels, _ = source
    real = labels_store.save_npz_atomic
    calls = {"n": 0}

    def failing(path, arrays):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, arrays)

    monkeypatch.setattr("cellmask.pipeline.save_npz_atomic", failing)
    with pytest.raises(OSError, match="is full.*5 tile results are saved.*run the same command"):
        cellmask.segment_zarr(src, tmp_path / "o.zarr", tile=128, halo=48, progress=False)
    monkeypatch.setattr("cellmask.pipeline.save_npz_atomic", real)
    result = cellmask.segment_zarr(src, tmp_path / "o.zarr", tile=128, halo=48, progress=False)
    assert np.array_equal(np.asarray(result.labels), clean_labels)


def test_killed_dask_worker_does_not_change_the_result(tmp_path, source):
    from dask.distributed import Client, LocalCluster

    src, clean_labels, _ = source
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        gen = cellmask.pipeline.run(src, tmp_path / "o.zarr", tile=128, halo=48, client=client)
        result = None
        for event in gen:
            if getattr(event, "stage", None) == "tiles" and event.done == 4:
                os.kill(pids[0], signal.SIGKILL)  # the nanny restarts it; its tasks are redone
            if isinstance(event, cellmask.SegmentationResult):
                result = event
    assert np.array_equal(np.asarray(result.labels), clean_labels)
