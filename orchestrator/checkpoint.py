"""Checkpoints after every generation, written atomically, from which a run resumes exactly.

Folder layout (`<out_dir>/checkpoint/`):

    LATEST                     the step of the newest complete entry (written last: the commit)
    ckpt-000042.json           config, schedule state, metrics so far, evaluator setup, and the
                               optimiser files this entry uses
    ckpt-000042.npz            committed vectors and the best-dev snapshot's vectors
    opt-L3-cma-000040.json     one optimiser's state as of step 40 (plain part)
    opt-L3-cma-000040.pkl      ... and its pickled library object (pycma, Nevergrad), if any

Every file is written to a temporary name, flushed to disk and renamed over its target
(`os.replace` is atomic on POSIX), and LATEST moves only once its entry is complete, so a crash at
any moment leaves the previous entry intact. The latest two entries are kept; a damaged latest
falls back to the previous one (which replays one generation, identically).

The run has no random state outside its optimisers (every seed derives from the run seed, and
each optimiser owns its generators), so the optimiser states are the RNG states to save.
Optimiser files are written only when the optimiser changed since the last entry: a 500-dim
CMA-ES state is about 4 MB, and a generation touches one layer's optimiser out of up to ~60.
Their JSON may hold Infinity/NaN (unknown losses), which Python's json reads back exactly.

Trust: the `.pkl` files are pickles (pycma and Nevergrad objects have no other faithful form) and
unpickling runs arbitrary code. Resume only from checkpoint folders you trust, i.e. your own
runs; never from downloaded ones. Exported artefacts (adapters, results) never use pickle.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DfoloraError

OptKey = tuple[int, str]
FORMAT = 1
# fsync each file before its rename, so an entry survives a power loss, not only a crash of
# the process; a few ms per file. Tests turn it off: durability is not what they check.
FSYNC = True


class CheckpointError(DfoloraError):
    """A checkpoint folder that cannot be resumed from."""


@dataclass
class Entry:
    """What a checkpoint entry holds, as loaded."""

    step: int
    payload: dict[str, Any]
    arrays: dict[str, np.ndarray]
    optimizers: dict[OptKey, dict[str, Any]]  # optimiser state_dicts


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if FSYNC:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class CheckpointStore:
    """Writes and reads the entries of one checkpoint folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.step = -1  # the newest entry written or loaded
        self.files: dict[OptKey, str] = {}  # optimiser -> its newest file stem
        self._uses: dict[int, set[str]] = {}  # step -> optimiser file stems it uses

    def exists(self) -> bool:
        return (self.folder / "LATEST").is_file()

    # -- writing --------------------------------------------------------------------------------
    def save(self, payload: dict[str, Any], arrays: dict[str, np.ndarray],
             optimizers: dict[OptKey, Any], dirty: set[OptKey]) -> int:
        """Write entry step+1: optimisers in `dirty` (and any never written) get new files."""
        self.folder.mkdir(parents=True, exist_ok=True)
        step = self.step + 1
        for key, opt in optimizers.items():
            if key in dirty or key not in self.files:
                self.files[key] = self._write_optimizer(key, opt.state_dict(), step)
        manifest = [{"layer": layer, "method": method, "file": stem}
                    for (layer, method), stem in sorted(self.files.items())]
        entry = {"format": FORMAT, "step": step, "optimizers": manifest, **payload}
        atomic_write(self._path(step, ".npz"), npz_bytes(arrays))
        atomic_write(self._path(step, ".json"), json.dumps(entry).encode())
        atomic_write(self.folder / "LATEST", f"{step}\n".encode())
        self.step = step
        self._collect_garbage()
        return step

    def _write_optimizer(self, key: OptKey, state: dict[str, Any], step: int) -> str:
        layer, method = key
        stem = f"opt-L{layer}-{re.sub(r'[^A-Za-z0-9_-]', '_', method)}-{step:06d}"
        state = {**state, "algo": dict(state["algo"])}
        blob = state["algo"].pop("pickle", None)
        if blob is not None:
            atomic_write(self.folder / f"{stem}.pkl", blob)
            state["algo"]["pickle_file"] = f"{stem}.pkl"
        atomic_write(self.folder / f"{stem}.json", json.dumps(state).encode())
        return stem

    def _collect_garbage(self) -> None:
        """Keep the latest two entries and the optimiser files they use; drop the rest
        (including temporary files a crash left behind)."""
        self._uses[self.step] = set(self.files.values())
        self._uses = {s: stems for s, stems in self._uses.items() if s >= self.step - 1}
        keep = {self._path(s, ext).name for s in self._uses for ext in (".json", ".npz")}
        for stems in self._uses.values():
            keep.update(name for stem in stems for name in (f"{stem}.json", f"{stem}.pkl"))
        for path in self.folder.iterdir():
            if path.name != "LATEST" and path.name not in keep:
                path.unlink()

    def _path(self, step: int, ext: str) -> Path:
        return self.folder / f"ckpt-{step:06d}{ext}"

    # -- reading --------------------------------------------------------------------------------
    def load(self) -> Entry:
        """The newest readable entry (the latest, else the one before it)."""
        try:
            latest = int((self.folder / "LATEST").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"no readable checkpoint in '{self.folder}': {err}") from None
        errors = []
        for step in (latest, latest - 1):
            try:
                entry = self._load(step)
            except (OSError, ValueError, KeyError, EOFError) as err:
                errors.append(f"step {step}: {err!r}")
                continue
            self.step = step
            self.files = {(o["layer"], o["method"]): o["file"]
                          for o in entry.payload["optimizers"]}
            self._uses = {step: set(self.files.values())}
            return entry
        raise CheckpointError(f"cannot resume from '{self.folder}': {'; '.join(errors)}")

    def _load(self, step: int) -> Entry:
        payload = json.loads(self._path(step, ".json").read_text())
        if payload.get("format") != FORMAT:
            raise ValueError(f"unsupported checkpoint format {payload.get('format')!r}")
        with np.load(self._path(step, ".npz"), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        optimizers = {}
        for item in payload["optimizers"]:
            state = json.loads((self.folder / f"{item['file']}.json").read_text())
            blob_file = state["algo"].pop("pickle_file", None)
            if blob_file is not None:
                state["algo"]["pickle"] = (self.folder / blob_file).read_bytes()
            optimizers[(item["layer"], item["method"])] = state
        return Entry(step, payload, arrays, optimizers)
