"""The run folder ``labels/<name>/.run``: what makes a run resumable and its output its own.

- **Fingerprint** (``run.json``): the input's identity (path, store metadata, a digest of a
  fixed strided sample of its pixels) and every setting that changes the arithmetic (model
  digest and configuration, precision, device, batch, tile, halo, scale, modality). A run
  resumes only a folder whose fingerprint is its own; otherwise it is refused, naming what
  differs (``overwrite=True`` starts afresh).
- **Lock**: an operating-system file lock (``filelock``, ``flock`` on POSIX), taken atomically
  and released by the kernel when its process ends, however it ends: a stale lock cannot exist,
  so there is no takeover to race.
- **Tile records**: one ``.npz`` per tile, written atomically and fsynced
  (:func:`~cellmask.labels_store.write_atomic`); one that cannot be opened (cut short by a power
  loss on a file system that reorders writes) is detected and its tile computed again.
- **Painted digests** (``painted.json``): SHA-1 of every painted level-0 tile, so that labels a
  user edited after cellmask wrote them are never painted over without ``overwrite``.
- **Ownership**: a ``labels/<name>`` group is cellmask's when it holds a run folder or
  cellmask's record in its attributes; any other (another tool's labels) is never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import zipfile
from pathlib import Path

import numpy as np

from cellmask.errors import OutputConflict, OutputLocked
from cellmask.labels_store import read_json, write_json_atomic
from cellmask.tiling import Tile

log = logging.getLogger(__name__)


def source_identity(src, sample_digest: str) -> dict:
    """What identifies an input: its resolved path and size on disk (for files), its store
    metadata (kind, shape, channels, dtype, chunks, pyramid levels, pixel size and unit) and
    the digest of a fixed strided sample of its pixels."""
    ident = {"kind": src.kind, "shape": list(src.shape), "channels": int(src.array.shape[2]),
             "dtype": str(src.array.dtype),
             "chunks": [int(c) for c in src.array.chunksize[:2]],
             "levels": len(src.levels) or 1,
             "pixel_size": list(src.pixel_size) if src.pixel_size else None,
             "pixel_unit": src.pixel_unit, "sample_sha256": sample_digest}
    if src.path is not None:
        path = Path(src.path).resolve()
        ident["path"] = str(path)
        if path.is_file():
            ident["bytes"] = path.stat().st_size
    return ident


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every leaf of two nested dicts that differs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differences(a, b, where + "."))
        elif a != b:
            out.append(f"{where}: {_short(a)} -> {_short(b)}")
    return out


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 48 else text[:45] + "..."


def is_ours(group_dir: Path) -> bool:
    """Whether ``labels/<name>`` was made by cellmask (a run folder, or its record)."""
    if (group_dir / ".run").is_dir():
        return True
    for meta in ("zarr.json", ".zattrs"):
        try:
            attrs = json.loads((group_dir / meta).read_text())
        except (OSError, ValueError):
            continue
        attrs = attrs.get("attributes", attrs) if meta == "zarr.json" else attrs
        if isinstance(attrs, dict) and "cellmask" in attrs:
            return True
    return False


def check_not_foreign(root: Path, name: str) -> None:
    """Refuse to write ``labels/<name>`` of ``root`` when it holds another tool's labels."""
    group_dir = Path(root) / "labels" / name
    if group_dir.exists() and any(group_dir.iterdir()) and not is_ours(group_dir):
        raise OutputConflict(
            f"{group_dir} holds labels that cellmask did not write; cellmask never writes or "
            f"re-points another tool's labels: pass --name (name=) to write beside them")


class RunFolder:
    """The ``.run`` folder of the labels group ``group_dir``."""

    def __init__(self, group_dir: Path):
        self.group_dir = Path(group_dir)
        self.dir = self.group_dir / ".run"
        self.tiles_dir = self.dir / "tiles"
        self._lock = None

    # --- lock
    def lock(self) -> None:
        """Take the run's lock or raise :class:`OutputLocked`, naming the holder."""
        from filelock import FileLock, Timeout

        self.tiles_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.dir / "lock", timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            holder = (self.dir / "holder").read_text() if (self.dir / "holder").exists() else "?"
            raise OutputLocked(f"another cellmask run ({holder}) is writing "
                               f"{self.group_dir.parent.parent}: wait for it to finish or "
                               "stop it") from None
        self._lock = lock
        (self.dir / "holder").write_text(f"{socket.gethostname()} pid {os.getpid()}")

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- fingerprint and state
    def previous(self) -> dict | None:
        """The last run's ``run.json``, None if there was none (or it is unreadable)."""
        try:
            return read_json(self.dir / "run.json")
        except ValueError:  # cut short: nothing of that run can be trusted
            log.warning("%s is unreadable (cut short?): starting this run afresh",
                        self.dir / "run.json")
            return None

    def save_state(self, fingerprint: dict, state: str, **extra) -> None:
        write_json_atomic(self.dir / "run.json",
                          {"fingerprint": fingerprint, "state": state, **extra})

    def reset(self) -> None:
        """Forget every earlier result: records, state, painted digests, corrupt chunks, and
        the label arrays and tables (all cellmask's own; the caller checked ownership)."""
        for child in self.group_dir.iterdir():
            if child.name in (".run",):
                continue
            if child.is_dir():
                shutil.rmtree(child)
            elif child.name not in ("zarr.json", ".zattrs", ".zgroup"):
                child.unlink()
        for child in self.dir.iterdir():
            if child.name in ("lock", "holder"):
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.tiles_dir.mkdir(parents=True, exist_ok=True)

    # --- tile records
    def record_path(self, tile: Tile) -> Path:
        return self.tiles_dir / f"{tile.index[0]}_{tile.index[1]}.npz"

    def finished(self, tiles: list[Tile]) -> set[tuple[int, int]]:
        """Indices of the tiles whose record is whole; a record cut short is removed."""
        done = set()
        for tl in tiles:
            path = self.record_path(tl)
            if not path.is_file():
                continue
            try:
                with zipfile.ZipFile(path) as archive:
                    archive.infolist()  # the central directory is at the end: a cut file fails
                done.add(tl.index)
            except (zipfile.BadZipFile, OSError, EOFError):
                log.warning("tile record %s is damaged: computing that tile again", path.name)
                path.unlink(missing_ok=True)
        return done

    # --- painted digests
    def save_painted(self, digests: dict[str, str]) -> None:
        write_json_atomic(self.dir / "painted.json", digests)

    def edited_tiles(self, level0, tiles: list[Tile]) -> list[Tile]:
        """The tiles whose level-0 labels differ from what cellmask painted there."""
        try:
            painted = read_json(self.dir / "painted.json")
        except ValueError:
            painted = None
        if not painted:
            return []
        edited = []
        for tl in tiles:
            want = painted.get(tile_key(tl))
            if want is None:
                continue
            y0, y1, x0, x1 = tl.core
            if labels_digest(np.asarray(level0[y0:y1, x0:x1])) != want:
                edited.append(tl)
        return edited


def tile_key(tile: Tile) -> str:
    return f"{tile.index[0]}_{tile.index[1]}"


def labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(labels, dtype=np.int32).tobytes()).hexdigest()
