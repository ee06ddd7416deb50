"""Speed on this CPU, end to end from Zarr to NGFF labels, against an earlier cellmask and
StarDist in the same run.

    python benchmarks/cpu_speed.py --size 4096 --baseline ../cellmask-296665d \\
        --stardist-python ../peers-venv/bin/python [--stardist-model runs/peers/stardist] \\
        [--rounds 3]

Image: a mosaic of real DSB2018 ``fluo_test`` crops (test data: no model saw it) with exact
ground truth (``benchmarks/mosaic.py``), stored as Zarr (chunks 1024). Each configuration runs
in a fresh process with the same untimed warm-up (a 640x1280 crop), then one timed
``segment_zarr``; "to labels" is the run's time without the measurements table:

* the baseline: another checkout of cellmask (``git worktree add ../cellmask-296665d 296665d``)
  at its defaults;
* this checkout at fp32, and at its defaults (``precision="auto"``: int8 on CPUs without native
  half precision, mixed where bf16 is native);
* StarDist's ``predict_instances_big`` (block 1024, overlap and context 64): the trained model of
  ``benchmarks/peers_setup.sh`` when ``--stardist-model`` holds one, else its network with
  random weights plus its NMS on ground-truth maps (``peer_stardist.py timing``), said so.

Every figure is printed with the CPU it was measured on (``cellmask.hardware.describe``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.mosaic import DEFAULT_DATA, dense_mosaic  # noqa: E402
from benchmarks.peers import ap50, run_peer  # noqa: E402
from cellmask.hardware import describe  # noqa: E402

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import cellmask, dask.array, zarr
m = cellmask.load_model(**{load!r})
cellmask.segment_zarr({warm!r}, {warm_out!r}, model=m, progress=False)  # untimed warm-up
t0 = time.perf_counter()
r = cellmask.segment_zarr({src!r}, {out!r}, model=m, progress=False)
wall = time.perf_counter() - t0
print(json.dumps({{"objects": r.objects, "timings": r.timings, "wall": wall,
                  "precision": m.precision}}))
"""


def run_config(root: Path, load: dict, src: Path, out: Path, warm: Path) -> dict:
    code = CHILD.format(root=str(root), load=load, src=str(src), out=str(out), warm=str(warm),
                        warm_out=str(out) + ".warm")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(root))
    if proc.returncode:
        raise RuntimeError(f"cellmask at {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--baseline", help="a checkout of an earlier cellmask (its defaults)")
    p.add_argument("--stardist-python", help="interpreter with tensorflow-cpu and stardist")
    p.add_argument("--stardist-model", default=str(ROOT / "runs" / "peers" / "stardist"))
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each cellmask configuration, in alternation; the table "
                        "gives the median run")
    args = p.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {describe()}")
    import zarr

    size, mpx = args.size, args.size ** 2 / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        image, truth = dense_mosaic(size, data=Path(args.data), split="fluo_test.txt")
        zarr.create_array(str(tmp / "m.zarr"), shape=image.shape, chunks=(1024, 1024),
                          dtype=image.dtype)[:] = image
        warm = image[:640, :1280]
        zarr.create_array(str(tmp / "warm.zarr"), shape=warm.shape, chunks=(512, 512),
                          dtype=warm.dtype)[:] = warm
        np.save(tmp / "m.npy", image)
        np.save(tmp / "t.npy", truth)
        np.save(tmp / "warm.npy", warm)
        configs = []
        if args.baseline:
            configs.append((f"cellmask {Path(args.baseline).name} (defaults)",
                            Path(args.baseline).resolve(), {}))
        configs += [("cellmask now, fp32", ROOT, {"precision": "fp32"}),
                    ("cellmask now (defaults)", ROOT, {})]
        runs: dict[int, list[dict]] = {k: [] for k in range(len(configs))}
        for rnd in range(args.rounds):  # configurations in alternation: the VM drifts
            for k, (label, root, load) in enumerate(configs):
                out = tmp / f"o{k}_{rnd}.zarr"
                r = run_config(root, load, tmp / "m.zarr", out, tmp / "warm.zarr")
                t = r["timings"]
                to_labels = t["total"] - t.get("measure", 0.0)
                r["to_labels"] = to_labels
                r["outside"] = 100 * (to_labels - t["network_wall"]) / to_labels
                if rnd == 0:
                    labels = np.asarray(zarr.open_array(str(out / "labels/cellmask/0")))
                    r["ap50"] = round(ap50(truth, labels), 4)
                runs[k].append(r)
                print(json.dumps({"tool": label, "round": rnd, "seconds": round(to_labels, 2),
                                  "outside_network_pct": round(r["outside"], 1),
                                  "split_s": {k2: round(v, 2) for k2, v in t.items()}}),
                      flush=True)
        for k, (label, _, _) in enumerate(configs):
            rs = runs[k]
            mid = sorted(rs, key=lambda r: r["to_labels"])[len(rs) // 2]  # the median run
            rows.append({"tool": label, "precision": mid["precision"],
                         "seconds": round(mid["to_labels"], 2),
                         "all_seconds": [round(r["to_labels"], 2) for r in rs],
                         "mpx_s": round(mpx / mid["to_labels"], 3), "objects": mid["objects"],
                         "ap50": rs[0]["ap50"], "outside_network_pct": round(mid["outside"], 1),
                         "split_s": {k2: round(v, 2) for k2, v in mid["timings"].items()}})
        if args.stardist_python:
            trained = (Path(args.stardist_model) / "config.json").is_file()
            extra = (["predict", "--model", args.stardist_model, "--modes", "big",
                      "--warm-up", str(tmp / "warm.npy"), "--images", str(tmp / "m.npy")]
                     if trained else
                     ["timing", "--warm-up", str(tmp / "warm.npy"), "--images",
                      str(tmp / "m.npy"), "--truth", str(tmp / "t.npy")])
            sd = run_peer(args.stardist_python, "peer_stardist.py", extra)["rows"][0]
            lab = np.load(sd["labels"])
            row = {"tool": "StarDist predict_instances_big" + (
                       "" if trained else " (random weights + its NMS on truth-derived maps)"),
                   "seconds": round(sd["seconds"], 2), "mpx_s": round(mpx / sd["seconds"], 3),
                   "objects": int(lab.max()),
                   "ap50": round(ap50(truth, lab), 4) if trained else None,
                   **({} if trained else {"network_s": round(sd["network_s"], 2),
                                          "nms_s": round(sd["nms_s"], 2)})}
            rows.append(row)
            print(json.dumps(row), flush=True)
    now = next(r for r in rows if r["tool"] == "cellmask now (defaults)")
    print(f"\n{size}^2 mosaic of fluo_test crops, {int(truth.max())} annotated nuclei; "
          f"cellmask: the median of {args.rounds} run(s) each\n")
    print("| tool | precision | s to labels (every run) | Mpx/s | objects | AP@0.5 "
          "| outside network | default now is faster by |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ap = "-" if r.get("ap50") is None else f"{r['ap50']:.3f}"
        out = f"{r['outside_network_pct']}%" if "outside_network_pct" in r else "-"
        every = f" ({', '.join(map(str, r['all_seconds']))})" if len(r.get("all_seconds", [])) > 1 \
            else ""
        print(f"| {r['tool']} | {r.get('precision', '-')} | {r['seconds']}{every} | "
              f"{r['mpx_s']} | {r['objects']} | {ap} | {out} | "
              f"{r['seconds'] / now['seconds']:.2f}x |")
    for r in rows:
        if "split_s" in r:
            print(f"{r['tool']}: {r['split_s']}")


if __name__ == "__main__":
    main()
