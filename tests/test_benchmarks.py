"""The GPU benchmark script stays ready for the first lent GPU: its dry run on the CPU, as CI
runs it, goes end to end and records the machine with its figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_end_to_end_on_the_cpu(dataset_dir, tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "SIZES": "256", "PRECISIONS": "fp32", "BATCH": "1", "TILE": "256",
           "PY": sys.executable, "OUT": str(tmp_path / "out"), "DATA": str(dataset_dir),
           "SPLIT": "train.txt"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_bench.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    assert [(r["size"], r["precision"]) for r in rows] == [(256, "fp32")]
    row = rows[0]
    assert row["objects"] > 10 and row["end_to_end_mpx_s"] > 0
    assert "CPU capability" in row["machine"] and row["device"] == row["machine"]
    assert "CPU capability" in (tmp_path / "out" / "gpu_bench.log").read_text()


def test_geojson_memory_benchmark_output_exports_every_object(tmp_path):
    """The memory benchmark's synthetic output is a valid cellmask output: the export finds
    every object of the grid, each outlined where its disc lies."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.geojson_memory import child, write_output

    store = tmp_path / "grid.ome.zarr"
    shape = write_output(store, 50, 8, chunk=32)
    assert shape == (7 * 8, 8 * 8)  # 8 per row, 7 rows
    result = child(store, tmp_path / "grid.geojson", "export")
    assert result["peak_mib"] > 0 and result["seconds"] > 0
    features = json.loads((tmp_path / "grid.geojson").read_text())["features"]
    assert len(features) == 50
    first = next(f for f in features if f["id"] == "cellmask-1")
    xs = [x for x, _ in first["geometry"]["coordinates"][0]]
    ys = [y for _, y in first["geometry"]["coordinates"][0]]
    assert 0 <= min(xs) < max(xs) <= 8 and 0 <= min(ys) < max(ys) <= 8
