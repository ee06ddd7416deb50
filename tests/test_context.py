"""The halo: from the network's effective receptive field and the objects' size."""

import json
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cellmask
from cellmask.errors import OutputConflict
from cellmask.model.context import auto_halo, effective_context
from fixtures import load_fixture
from test_pipeline import _tiny_model, oracle


class _Convs(torch.nn.Module):
    """A backbone of stacked all-ones ``k`` x ``k`` convolutions (stride 1)."""

    def __init__(self, k, layers):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(1, 1, k, padding=k // 2, bias=False)
                                         for _ in range(layers))
        for conv in self.convs:
            torch.nn.init.ones_(conv.weight)

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        return OrderedDict([("0", x)])


def test_effective_context_of_known_networks():
    # one 9x9 box filter: every input pixel within 4 px weighs alike, so 95% needs radius 4
    assert effective_context(_Convs(9, 1), 1) == 4
    # two of them: theoretical radius 8, but the weight concentrates at the centre
    two = effective_context(_Convs(9, 2), 1)
    assert 4 < two < 8
    # measured alike where inference and int8 calibration run: without autograd
    net = _Convs(9, 2)
    with torch.no_grad():
        assert effective_context(net, 1) == two
    with torch.inference_mode():
        assert effective_context(net, 1) == two


def test_auto_halo_from_context_objects_and_scale(caplog):
    model = SimpleNamespace(context_px=53, trained_diameter=20.0)  # the shipped model's
    assert auto_halo(model, 1.0) == 64  # 3 diameters (60 px) > context, rounded up to 16
    assert auto_halo(model, 0.5) == 128  # objects twice as large in level-0 pixels
    assert auto_halo(model, 2.0) == 32
    wide = SimpleNamespace(context_px=100, trained_diameter=10.0)
    assert auto_halo(wide, 1.0) == 112  # the context decides
    assert auto_halo(model, 0.125, tile=256) == 128  # at most half the tile, with a warning
    assert "more than half the tile" in caplog.text


def test_shipped_model_context_and_default_halo():
    model = cellmask.load_model("nuclei")
    assert 32 <= model.context_px <= 96
    assert auto_halo(model, 1.0) == 64


def test_default_halo_is_resolved_once_and_in_the_fingerprint(tmp_path):
    image, truth = load_fixture("fluo_29dd28df98ee")
    kw = dict(progress=False, detector=oracle(truth), model=_tiny_model(), measure=False,
              tile=256)
    cellmask.segment_zarr(image, tmp_path / "o.zarr", **kw)
    fp = json.loads((tmp_path / "o.zarr/labels/cellmask/.run/run.json").read_text())
    halo = fp["fingerprint"]["settings"]["halo"]
    assert halo == auto_halo(_tiny_model(), 1.0) and halo % 16 == 0
    cellmask.segment_zarr(image, tmp_path / "o.zarr", **kw)  # the same default resumes
    with pytest.raises(OutputConflict, match=rf"settings.halo: {halo} -> {halo + 16}"):
        cellmask.segment_zarr(image, tmp_path / "o.zarr", halo=halo + 16, **kw)
    # in memory, the same default gives the same labels as the run
    labels = _tiny_model().segment(image, tile=256, halo=halo)
    assert labels.shape == image.shape[:2] and np.array_equal(
        labels, _tiny_model().segment(image, tile=256))
