"""Checkpoints after every generation, written atomically and checksummed, from which a run
resumes exactly.

Folder layout (`<out_dir>/checkpoints/`):

    LATEST                     the step of the newest complete entry (written last: the commit)
    ckpt-000042.json           config, schedule state, metrics so far, evaluator setup, and the
                               optimiser files this entry uses
    ckpt-000042.npz            committed vectors and the best-dev snapshot's vectors
    ckpt-000042.sha256         SHA-256 of every file entry 42 uses (`sha256sum -c` reads it)
    opt-L3-cma-000040.json     one optimiser's state as of step 40 (plain part)
    opt-L3-cma-000040.pkl      ... and its pickled library object (pycma, Nevergrad), if any

Every file is written to a temporary name, flushed to disk and renamed over its target
(`os.replace` is atomic on POSIX); an entry's checksum file follows its other files, and LATEST
moves only once the entry is complete, so a crash at any moment leaves the previous entry intact.
The latest two entries are kept. Loading verifies every file of an entry against its checksums
before parsing (or unpickling) it: a truncated, corrupted or missing file of the latest entry is
named in a warning and the previous entry is used (which replays one generation, identically);
when neither is whole, `CheckpointError`. Checksums also catch an entry half overwritten: after
such a fallback the next entry reuses the damaged one's step number.

The run has no random state outside its optimisers (every seed derives from the run seed, and
each optimiser owns its generators), so the optimiser states are the RNG states to save.
Optimiser files are written only when the optimiser changed since the last entry: a 500-dim
CMA-ES state is about 4 MB, and a generation touches one layer's optimiser out of up to ~60.
Their JSON may hold Infinity/NaN (unknown losses), which Python's json reads back exactly.

Trust: the `.pkl` files are pickles (pycma and Nevergrad objects have no other faithful form) and
unpickling runs arbitrary code; a checksum guards against damage, not against a forger. Resume
only from checkpoint folders you trust, i.e. your own runs; never from downloaded ones. Exported
artefacts (adapters, results) never use pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DfoloraError
from orchestrator.state import OptKey

# 2: every entry has a .sha256 file; 1 (no checksums, older versions) still loads, unverified
FORMAT = 2


class CheckpointError(DfoloraError):
    """A checkpoint folder that cannot be resumed from."""


class CheckpointWarning(UserWarning):
    """A damaged entry was skipped, or one was loaded without checksums to verify it."""


class _Damaged(ValueError):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name = name


@dataclass
class Entry:
    """What a checkpoint entry holds, as loaded."""

    step: int
    payload: dict[str, Any]
    arrays: dict[str, np.ndarray]
    optimizers: dict[OptKey, dict[str, Any]]  # optimiser state_dicts


def atomic_write(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` to a temporary name, then rename it over `path`. With `fsync` the data is
    flushed to disk before the rename, so the file survives a power loss, not only a crash of
    the process (a few ms per file; tests that do not check durability pass False)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """Writes and reads the entries of one checkpoint folder; `fsync`: see `atomic_write`."""

    def __init__(self, folder: str | Path, fsync: bool = True) -> None:
        self.folder, self.fsync = Path(folder), fsync
        self.step = -1  # the newest entry written or loaded
        self.files: dict[OptKey, str] = {}  # optimiser -> its newest file stem
        self.digests: dict[str, str] = {}  # file name -> SHA-256 of what was written or read
        self._uses: dict[int, set[str]] = {}  # step -> optimiser file stems it uses

    def exists(self) -> bool:
        """Whether there is an entry to resume: LATEST, or (should LATEST be lost) an entry's
        checksum file, its last file before LATEST moves. Files of a first entry cut short
        before that are not a run: it starts afresh."""
        return (self.folder / "LATEST").is_file() or any(self.folder.glob("ckpt-*.sha256"))

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
        self._write(self._path(step, ".npz").name, npz_bytes(arrays))
        self._write(self._path(step, ".json").name, json.dumps(entry).encode())
        names = [self._path(step, ext).name for ext in (".json", ".npz")]
        names += [name for stem in sorted(set(self.files.values())) for name in self._names(stem)]
        sums = "".join(f"{self.digests[name]}  {name}\n" for name in names)
        atomic_write(self._path(step, ".sha256"), sums.encode(), fsync=self.fsync)
        atomic_write(self.folder / "LATEST", f"{step}\n".encode(), fsync=self.fsync)
        self.step = step
        self._collect_garbage()
        return step

    def _write(self, name: str, data: bytes) -> None:
        atomic_write(self.folder / name, data, fsync=self.fsync)
        self.digests[name] = sha256(data)

    def _names(self, stem: str) -> list[str]:
        """An optimiser's files: its JSON, and its pickle if it has one."""
        return [name for name in (f"{stem}.json", f"{stem}.pkl") if name in self.digests]

    def _write_optimizer(self, key: OptKey, state: dict[str, Any], step: int) -> str:
        layer, method = key
        stem = f"opt-L{layer}-{re.sub(r'[^A-Za-z0-9_-]', '_', method)}-{step:06d}"
        state = {**state, "algo": dict(state["algo"])}
        blob = state["algo"].pop("pickle", None)
        self.digests.pop(f"{stem}.pkl", None)  # a damaged entry's file of the same name
        if blob is not None:
            self._write(f"{stem}.pkl", blob)
            state["algo"]["pickle_file"] = f"{stem}.pkl"
        self._write(f"{stem}.json", json.dumps(state).encode())
        return stem

    def _collect_garbage(self) -> None:
        """Keep the latest two entries and the optimiser files they use; drop the rest
        (including temporary files a crash left behind)."""
        self._uses[self.step] = set(self.files.values())
        self._uses = {s: stems for s, stems in self._uses.items() if s >= self.step - 1}
        keep = {self._path(s, ext).name for s in self._uses
                for ext in (".json", ".npz", ".sha256")}
        for stems in self._uses.values():
            keep.update(name for stem in stems for name in (f"{stem}.json", f"{stem}.pkl"))
        for path in self.folder.iterdir():
            if path.name != "LATEST" and path.name not in keep:
                path.unlink()
        self.digests = {name: d for name, d in self.digests.items() if name in keep}

    def _path(self, step: int, ext: str) -> Path:
        return self.folder / f"ckpt-{step:06d}{ext}"

    # -- reading --------------------------------------------------------------------------------
    def load(self) -> Entry:
        """The newest whole entry (the latest, else the one before it), every file verified."""
        errors: list[str] = []
        for step in self._candidates():
            try:
                entry, digests = self._load(step)
            except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
                errors.append(f"entry {step} is damaged ({_describe(err)})")
                continue
            for problem in errors:
                warnings.warn(f"checkpoint {problem} in '{self.folder}': resuming from entry "
                              f"{step} instead (its next step is replayed, identically)",
                              CheckpointWarning, stacklevel=2)
            self.step, self.digests = step, digests
            self.files = {(o["layer"], o["method"]): o["file"]
                          for o in entry.payload["optimizers"]}
            self._uses = {step: set(self.files.values())}
            return entry
        raise CheckpointError(f"cannot resume from '{self.folder}': checkpoint "
                              f"{'; '.join(errors)}; start a new run in another folder")

    def _candidates(self) -> list[int]:
        """LATEST's step and the one before it; without a readable LATEST, the newest two
        entries on disk (each is verified before use, so a complete one is safe to take)."""
        try:
            latest = int((self.folder / "LATEST").read_text())
            return [latest, latest - 1]
        except (OSError, ValueError) as err:
            steps = sorted((int(m[1]) for p in self.folder.glob("ckpt-*.sha256")
                            if (m := re.fullmatch(r"ckpt-(\d+)\.sha256", p.name))),
                           reverse=True)
            if not steps:
                raise CheckpointError(f"no readable checkpoint in '{self.folder}': "
                                      f"{_describe(err)}") from None
            warnings.warn(f"checkpoint LATEST in '{self.folder}' is unreadable "
                          f"({_describe(err)}); trying entries {steps[:2]}", CheckpointWarning,
                          stacklevel=3)
            return steps[:2]

    def _load(self, step: int) -> tuple[Entry, dict[str, str]]:
        reader = _Reader(self.folder, self._path(step, ".sha256"))
        payload = json.loads(reader.read(self._path(step, ".json").name))
        if payload.get("format") not in (1, FORMAT):
            raise ValueError(f"unsupported checkpoint format {payload.get('format')!r}")
        if reader.sums is None:
            if payload["format"] == FORMAT:
                raise _Damaged(reader.manifest.name, "missing")
            warnings.warn(f"checkpoint entry {step} in '{self.folder}' has no checksums "
                          f"(written by an older version): loaded unverified",
                          CheckpointWarning, stacklevel=3)
        with np.load(io.BytesIO(reader.read(self._path(step, ".npz").name)),
                     allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        optimizers = {}
        for item in payload["optimizers"]:
            state = json.loads(reader.read(f"{item['file']}.json"))
            blob_file = state["algo"].pop("pickle_file", None)
            if blob_file is not None:
                state["algo"]["pickle"] = reader.read(blob_file)
            optimizers[(item["layer"], item["method"])] = state
        return Entry(step, payload, arrays, optimizers), reader.digests


class _Reader:
    """Reads an entry's files, each checked against the entry's checksum file (when it has one:
    format 1 entries do not) before anything parses it."""

    def __init__(self, folder: Path, manifest: Path) -> None:
        self.folder, self.manifest = folder, manifest
        self.digests: dict[str, str] = {}  # what was read
        self.sums: dict[str, str] | None = None
        try:
            text = manifest.read_text()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as err:
            raise _Damaged(manifest.name, _describe(err)) from None
        lines = [re.fullmatch(r"([0-9a-f]{64})  (\S+)", line) for line in text.splitlines()]
        if not lines or not all(lines) or not text.endswith("\n"):
            raise _Damaged(manifest.name, "not a whole checksum file")
        self.sums = {m[2]: m[1] for m in lines}

    def read(self, name: str) -> bytes:
        if self.sums is not None and name not in self.sums:
            raise _Damaged(self.manifest.name, f"does not list {name}")
        try:
            data = (self.folder / name).read_bytes()
        except FileNotFoundError:
            raise _Damaged(name, "missing") from None
        digest = sha256(data)
        if self.sums is not None and digest != self.sums[name]:
            raise _Damaged(name, f"{len(data)} bytes that do not match their checksum in "
                                 f"{self.manifest.name} (truncated or corrupted)")
        self.digests[name] = digest
        return data


def _describe(err: BaseException) -> str:
    if isinstance(err, _Damaged):
        return str(err)
    return f"{type(err).__name__}: {err}"
