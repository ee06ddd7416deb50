"""Running tiles as tasks on a dask.distributed cluster.

Each task detects one tile and writes its record into the run folder (which must be on a file
system every worker sees); the model is loaded once per worker process and cached there, keyed
by a digest of its weights. The stitching afterwards is the same as in a local run, so the labels
are identical.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


_MODELS: dict[str, object] = {}


def _model_bytes(model) -> bytes:
    from safetensors.torch import save

    state = {**model.net.state_dict(), **model.calibration}
    return save({k: v.detach().cpu().contiguous() for k, v in state.items()},
                metadata={"config": model.config.to_json()})


def _worker_model(blob: bytes, digest: str, meta: dict, precision: str):
    """The model of ``blob`` (safetensors bytes), built once per worker process, computing
    with the run's ``precision`` (a worker on other hardware refuses one it cannot do)."""
    key = f"{digest}:{precision}"
    if key not in _MODELS:
        import json

        import torch
        from safetensors.torch import load

        from cellmask.config import ModelConfig
        from cellmask.model.network import build_network
        from cellmask.model.quantize import split_calibration
        from cellmask.model.segmenter import Model

        header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
        net = build_network(ModelConfig.from_json(header["__metadata__"]["config"]))
        state, calibration = split_calibration(load(blob))
        net.load_state_dict(state)
        torch.set_num_threads(1)  # one thread per worker process: the cluster parallelises
        _MODELS[key] = Model(net, ModelConfig.from_json(header["__metadata__"]["config"]),
                             meta=meta, device="cpu", precision=precision,
                             calibration=calibration)
    return _MODELS[key]


def _task(blob, digest, meta, precision, source, tile, appearance: dict, scale, record: str,
          skip_corrupt: bool, level: int) -> tuple[int, list[str]]:
    from cellmask.appearance import Appearance
    from cellmask.engine import detect_tiles, read_window
    from cellmask.labels_store import save_npz_atomic

    model = _worker_model(blob, digest, meta, precision)
    window, corrupt = read_window(source, tile.window, skip_corrupt, level)
    (inst,) = detect_tiles(model, source, [tile], Appearance.from_dict(appearance), scale,
                           [window], level=level)
    save_npz_atomic(Path(record), inst.to_arrays())
    return len(inst), corrupt


def run_tiles(client, model, source, tiles, appearance, scale, folder, skip_corrupt=False,
              level: int = 0):
    """Yield ``(objects, tile, corrupt chunk names)`` as the cluster finishes each tile; each
    task writes its tile's record into ``folder`` (a :class:`~cellmask.run_state.RunFolder`
    on a file system every worker sees), with the run's precision, ``skip_corrupt`` and
    pyramid ``level``."""
    from dask.distributed import as_completed

    blob = _model_bytes(model)
    digest = hashlib.sha256(blob).hexdigest()
    [blob_future] = client.scatter([blob], broadcast=True)
    [src_future] = client.scatter([source], broadcast=True)
    meta = dict(model.meta)
    futures = {}
    for tl in tiles:
        fut = client.submit(_task, blob_future, digest, meta, model.precision, src_future, tl,
                            appearance.to_dict(), scale, str(folder.record_path(tl)),
                            skip_corrupt, level, pure=False)
        futures[fut] = tl
    for fut in as_completed(futures):
        found, corrupt = fut.result()
        yield found, futures[fut], corrupt
