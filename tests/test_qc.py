"""Per-object quality signals and the run's quality summary."""

import json

import numpy as np

import cellmask
from fixtures import load_fixture
from test_pipeline import _tiny_model, oracle


def test_real_model_scores_and_mask_confidence(tmp_path, shipped_model):
    image, _ = load_fixture("fluo_e23e11414ee6")
    result = cellmask.segment_zarr(image, tmp_path / "o.zarr", model=shipped_model, tile=256,
                                   halo=64, progress=False)
    t = result.table
    c = shipped_model.config
    assert (t["score"] >= c.score_thresh).all() and (t["score"] <= 1).all()
    assert (t["mask_confidence"] >= c.mask_thresh).all() and (t["mask_confidence"] <= 1).all()
    assert t["mask_confidence"].std() > 0.005  # it tells objects apart
    qc = json.loads((result.path / "qc.json").read_text())
    assert qc["objects"] == len(t) == result.objects
    assert len(qc["mean_score_per_tile"]) == 3 and len(qc["mean_score_per_tile"][0]) == 3


def test_border_seam_and_size_signals(tmp_path):
    _, truth = load_fixture("fluo_29dd28df98ee")
    truth = truth.astype(np.int32).copy()
    big = truth.max() + 1
    truth[150:230, 150:230][truth[150:230, 150:230] == 0] = big  # one object far too large
    image = np.where(truth > 0, 200, 10).astype(np.uint8)
    result = cellmask.segment_zarr(image, tmp_path / "o.zarr", tile=64, halo=32,
                                   detector=oracle(truth), model=_tiny_model(), progress=False)
    t = result.table
    h, w = image.shape
    edge = (t["bbox-0"] == 0) | (t["bbox-1"] == 0) | (t["bbox-2"] == h) | (t["bbox-3"] == w)
    assert edge.any() and (t["touches_border"] == edge).all()
    spans = (t["bbox-0"] // 64 != (t["bbox-2"] - 1) // 64) | \
        (t["bbox-1"] // 64 != (t["bbox-3"] - 1) // 64)
    assert spans.any() and (t["crosses_seam"] == spans).all()
    qc = json.loads((result.path / "qc.json").read_text())
    biggest = int(t.loc[t["area"].idxmax(), "label"])
    assert biggest in qc["size_outlier_labels"] and qc["larger_than_halo"] >= 1
    assert qc["touching_border"] == int(edge.sum())
