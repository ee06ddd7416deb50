"""Untrusted input, mutated at random: Zarr v2/v3 metadata, TIFF headers, safetensors headers.

Every case must end in a clear refusal (a :class:`cellmask.errors.CellmaskError`, or a missing
file) or in a valid read, never in another exception, a hang or unbounded memory.
"""

import json
import resource
import struct

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmask.engine import read_window
from cellmask.errors import CellmaskError
from cellmask.sources import open_image
from cellmask.survey import survey_image

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

leaves = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
          | st.sampled_from(["uint8", "<u2", "float64", "|b1", "bytes", "zstd", "C", "F",
                             "regular", "default", "/", ".", "v2"]))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


def _paths(value, prefix=()):
    """Every key path of a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _mutate(meta, data):
    paths = list(_paths(meta))[1:]
    path = data.draw(st.sampled_from(paths))
    new = data.draw(json_values)
    node = meta
    for key in path[:-1]:
        node = node[key]
    if data.draw(st.booleans()) and isinstance(node, dict):
        node.pop(path[-1])  # a field removed
    else:
        node[path[-1]] = new
    return meta


def _memory_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _read_through(path):
    """Open, survey and read a window, as a run does before the network."""
    try:
        src = open_image(path)
        h, w = src.shape
        survey_image(src, (1.0, 99.8), max_samples=4096)
        read_window(src, (0, min(h, 64), 0, min(w, 64)))
    except (CellmaskError, FileNotFoundError):
        return "refused"
    return "read"


@pytest.fixture(scope="module")
def baseline():
    return _memory_kib()


@pytest.mark.parametrize("fmt", [2, 3])
@SETTINGS
@given(data=st.data())
def test_mutated_zarr_metadata(tmp_path_factory, baseline, fmt, data):
    store = tmp_path_factory.mktemp(f"z{fmt}") / "a.zarr"
    arr = zarr.create_array(str(store), shape=(96, 80), chunks=(32, 32), dtype="uint16",
                            zarr_format=fmt)
    arr[:] = np.arange(96 * 80, dtype=np.uint16).reshape(96, 80)
    meta_file = store / ("zarr.json" if fmt == 3 else ".zarray")
    meta = _mutate(json.loads(meta_file.read_text()), data)
    meta_file.write_text(json.dumps(meta, allow_nan=True))
    assert _read_through(store) in ("refused", "read")
    assert _memory_kib() - baseline < 1_000_000  # KiB: under 1 GB more than at the start


@SETTINGS
@given(data=st.data())
def test_mutated_tiff_headers(tmp_path_factory, baseline, data):
    path = tmp_path_factory.mktemp("tif") / "a.tif"
    tifffile.imwrite(path, np.arange(96 * 80, dtype=np.uint16).reshape(96, 80), tile=(32, 32))
    raw = bytearray(path.read_bytes())
    ifd = struct.unpack("<I", raw[4:8])[0]
    header = list(range(0, 8)) + list(range(ifd, min(len(raw), ifd + 2 + 12 * 20)))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.sampled_from(header))
        raw[pos] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    assert _read_through(path) in ("refused", "read")
    assert _memory_kib() - baseline < 1_000_000


@pytest.fixture(scope="module")
def weights():
    from cellmask.model.registry import shipped_path

    raw = shipped_path("nuclei").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@SETTINGS
@given(data=st.data())
def test_mutated_safetensors_headers(tmp_path_factory, baseline, weights, data):
    import cellmask

    header, body = weights
    header = json.loads(json.dumps(header))
    if data.draw(st.booleans()):  # the model configuration inside the metadata
        config = json.loads(header["__metadata__"]["config"])
        header["__metadata__"]["config"] = json.dumps(_mutate(config, data), allow_nan=True)
    else:  # tensor shapes, dtypes, offsets
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        header = {**header, name: _mutate({"t": header[name]}, data)["t"]}
    text = json.dumps(header, allow_nan=True).encode()
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    try:
        cellmask.load_model(path, device="cpu")
    except CellmaskError:
        pass
    assert _memory_kib() - baseline < 1_000_000
