"""Property-based tests (hypothesis): tiling, stitching, metrics, readers."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.draw import disk

from cellmask.metrics import Evaluation
from cellmask.stitch import InstanceSet, SpatialIndex, paint_region, resolve
from cellmask.tiling import plan_tiles

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(h=st.integers(1, 700), w=st.integers(1, 700), tile=st.integers(1, 300),
       halo=st.integers(0, 80))
def test_cores_cover_every_pixel_once_and_windows_stay_inside(h, w, tile, halo):
    cover = np.zeros((h, w), np.uint8)
    for t in plan_tiles((h, w), tile, halo):
        y0, y1, x0, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        wy0, wy1, wx0, wx1 = t.window
        assert 0 <= wy0 <= y0 and y1 <= wy1 <= h and 0 <= wx0 <= x0 and x1 <= wx1 <= w
    assert (cover == 1).all()


def random_instances(seed, shape, n):
    """Overlapping disks with random scores, as box-local masks (a model's raw output)."""
    rng = np.random.default_rng(seed)
    wins, masks, scores = [], [], []
    for _ in range(n):
        r = int(rng.integers(2, 12))
        cy, cx = int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1]))
        full = np.zeros(shape, bool)
        full[disk((cy, cx), r, shape=shape)] = True
        ys, xs = np.nonzero(full)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        wins.append([x0, y0, x1, y1])
        masks.append(full[y0:y1, x0:x1])
        scores.append(float(rng.integers(0, 5)) / 4)  # many ties: order must not matter
    return InstanceSet(np.array(wins, np.int64).reshape(-1, 4), np.array(scores, np.float32),
                       masks)


def painted(inst, shape, chunk, order_seed=None):
    kept = resolve(inst, cell=max(8, chunk))
    index = SpatialIndex(kept, max(8, chunk))
    out = np.zeros(shape, np.int32)
    regions = [(y, min(y + chunk, shape[0]), x, min(x + chunk, shape[1]))
               for y in range(0, shape[0], chunk) for x in range(0, shape[1], chunk)]
    if order_seed is not None:
        np.random.default_rng(order_seed).shuffle(regions)
    for r in regions:
        out[r[0]:r[1], r[2]:r[3]] = paint_region(kept, index, r)
    return out


@FAST
@given(seed=st.integers(0, 10_000), h=st.integers(20, 160), w=st.integers(20, 160),
       n=st.integers(0, 60), chunk=st.integers(5, 200), order=st.integers(0, 100))
def test_stitched_labels_do_not_depend_on_chunking_or_order(seed, h, w, n, chunk, order):
    inst = random_instances(seed, (h, w), n)
    reference = painted(inst, (h, w), 10_000)
    assert np.array_equal(painted(inst, (h, w), chunk, order), reference)
    perm = np.random.default_rng(order).permutation(len(inst))
    shuffled = InstanceSet(inst.windows[perm], inst.scores[perm], [inst.masks[i] for i in perm])
    assert np.array_equal(painted(shuffled, (h, w), chunk), reference)


def resolve_by_canvas(inst, min_visible_fraction, min_area, shape):
    """What ``resolve`` must compute, written the plain way: instances in priority order claim
    the unclaimed pixels of a full canvas."""
    from cellmask.stitch import priority_order

    canvas = np.zeros(shape, bool)
    kept = []
    for i in priority_order(inst):
        x0, y0, x1, y1 = inst.windows[i]
        mask = inst.masks[i]
        free = mask & ~canvas[y0:y1, x0:x1]
        area, visible = int(mask.sum()), int(free.sum())
        if area < min_area or visible < min_area or visible < min_visible_fraction * area:
            continue
        canvas[y0:y1, x0:x1] |= free
        kept.append(((x0, y0, x1, y1), free))
    return kept


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(0, 80), cell=st.integers(1, 90),
       fraction=st.sampled_from([0.0, 0.5, 0.8]))
def test_resolve_equals_claiming_pixels_on_a_canvas(seed, n, cell, fraction):
    inst = random_instances(seed, (70, 90), n)
    if n:  # a degenerate (empty) window and mask among them
        inst = InstanceSet(np.vstack([inst.windows, [[5, 7, 5, 7]]]),
                           np.append(inst.scores, 0.5).astype(np.float32),
                           inst.masks + [np.zeros((0, 0), bool)])
    got = resolve(inst, min_visible_fraction=fraction, min_area=3, cell=cell)
    want = resolve_by_canvas(inst, fraction, 3, (70, 90))
    assert len(got) == len(want)
    for k, (window, mask) in enumerate(want):
        assert tuple(got.windows[k]) == window and np.array_equal(got.masks[k], mask)


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(0, 40))
def test_metrics_properties(seed, n):
    inst = random_instances(seed, (96, 96), n)
    a = painted(inst, (96, 96), 96)
    b = painted(random_instances(seed + 1, (96, 96), n), (96, 96), 96)
    perfect = Evaluation()
    perfect.add(a, a)
    assert (perfect.table()["ap"] == 1.0).all()
    ab, ba = Evaluation(), Evaluation()
    ab.add(a, b)
    ba.add(b, a)
    assert np.allclose(ab.table()["ap"], ba.table()["ap"])
    assert np.allclose(ab.table()["pq"], ba.table()["pq"])
    ids = np.unique(a)
    relabel = np.zeros(a.max() + 1, np.int64)
    relabel[ids[ids > 0]] = np.random.default_rng(seed).permutation(len(ids[ids > 0])) + 5
    perm = Evaluation()
    perm.add(relabel[a], b)
    assert np.allclose(perm.table()["ap"], ab.table()["ap"])


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=2048))
def test_readers_never_crash_on_random_bytes(tmp_path_factory, data):
    from cellmask import InputError
    from cellmask.model.weights import WeightsError, load_weights
    from cellmask.engine import read_window
    from cellmask.sources import open_image

    d = tmp_path_factory.mktemp("fuzz")
    for name in ("x.tif", "x.npy", "x.png", "x.safetensors"):
        p = d / name
        p.write_bytes(data)
        try:
            if name.endswith(".safetensors"):
                load_weights(p)
            else:
                src = open_image(p)
                read_window(src, (0, min(4, src.shape[0]), 0, min(4, src.shape[1])))
        except (InputError, WeightsError, ValueError, OSError):
            pass  # a clear refusal is the expected outcome


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_truncated_files_are_refused(tmp_path, cut):
    import tifffile

    from cellmask import InputError
    from cellmask.engine import read_window
    from cellmask.sources import open_image
    from fixtures import load_fixture

    image, _ = load_fixture("fluo_29dd28df98ee")
    full = tmp_path / "f.tif"
    tifffile.imwrite(full, image, tile=(64, 64), compression="zlib")
    p = tmp_path / "t.tif"
    p.write_bytes(full.read_bytes()[: int(full.stat().st_size * cut)])
    with pytest.raises(InputError):
        src = open_image(p)
        read_window(src, (0, src.shape[0], 0, src.shape[1]))


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_in_memory_segment_equals_segment_zarr(shipped_model, tmp_path_factory, data):
    """One tile engine: ``Model.segment`` and ``segment_zarr`` give the same labels for random
    crops of real nuclei, sizes, scales, tiles and halos."""
    import cellmask
    from fixtures import load_fixture

    name = data.draw(st.sampled_from(["fluo_e23e11414ee6", "histo_0e4c2e2780de"]))
    image, _ = load_fixture(name)
    h = data.draw(st.integers(40, image.shape[0]))
    w = data.draw(st.integers(40, image.shape[1]))
    y, x = data.draw(st.integers(0, image.shape[0] - h)), data.draw(st.integers(0, image.shape[1] - w))
    crop = np.ascontiguousarray(image[y:y + h, x:x + w])
    halo = data.draw(st.sampled_from([16, 32, 48]))
    tile = data.draw(st.sampled_from([t for t in (64, 128, 256, 1024) if t >= 2 * halo]))
    scale = data.draw(st.sampled_from([0.75, 1.0, 1.3]))
    memory = shipped_model.segment(crop, scale, tile=tile, halo=halo)
    out = tmp_path_factory.mktemp("eq") / "o.zarr"
    whole = cellmask.segment_zarr(crop, out, model=shipped_model, tile=tile, halo=halo,
                                  scale=scale, progress=False, measure=False)
    assert np.array_equal(memory, np.asarray(whole.labels))
