"""The run folder: every output of a run, in standard formats, in one place.

    <out>/config.yaml          the fully resolved config (what `dfolora run --config` takes back)
    <out>/metrics.jsonl        one JSON line per record: generations, dev evaluations, start, final
    <out>/results.json         zero-shot and final metrics, evaluations, wall time, peak memory
    <out>/best_vectors.npz     the final adapter's subspace vectors, one array per layer
    <out>/adapter/             the final adapter in PEFT format (adapter_config.json, safetensors)
    <out>/checkpoints/         resumable state (orchestrator/checkpoint.py)
    <out>/plots/               PNGs, redrawn after every dev evaluation (orchestrator/plots.py)

Every file is written atomically (temporary name, then rename). Nothing here imports torch: the
adapter arrives as numpy arrays from whichever process holds the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from common.config import RunConfig
from common.errors import ConfigError
from common.messages import LABEL_OFFSETS, label_offsets_document
from orchestrator.checkpoint import atomic_write, npz_bytes

CONFIG, METRICS, RESULTS = "config.yaml", "metrics.jsonl", "results.json"
VECTORS, ADAPTER, CHECKPOINTS, PLOTS = "best_vectors.npz", "adapter", "checkpoints", "plots"


class RunFolder:
    """`fsync`: whether each file is flushed to disk before its rename (checkpoint.atomic_write)."""

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path, self.fsync = Path(path), fsync
        self.fresh = False  # create() found the folder missing or empty
        self.made: list[Path] = []  # the folders create() made, innermost first

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def check(self, resume: bool) -> None:
        """Refuse a path that is a file, or (unless resuming) a folder that holds anything;
        writes nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output folder '{self.path}' is a file")
        if not resume and self.path.is_dir() and any(self.path.iterdir()):
            raise ConfigError(f"output folder '{self.path}' is not empty: pass --resume to "
                              f"continue the run there, or choose another --out")

    def create(self) -> None:
        """Create the folder (and its parents) and check that it is writable."""
        self.fresh = not self.path.is_dir() or not any(self.path.iterdir())
        self.made = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"output folder '{self.path}' is not writable "
                              f"({err.strerror or err})") from None

    def prepare(self, resume: bool) -> None:
        """`check`, then `create`: the folder of a command that writes at once."""
        self.check(resume)
        self.create()

    def discard(self) -> None:
        """Remove what was written since create() found the folder missing or empty (a refused
        command's config.yaml, ...), and the folders create() made; a folder that held
        anything before is left alone."""
        if not self.fresh or not self.path.is_dir():
            return
        for item in self.path.iterdir():
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
        for folder in self.made:
            try:
                folder.rmdir()
            except OSError:  # not empty (something else writes there) or already gone
                break

    def write_config(self, cfg: RunConfig) -> None:
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write(self / CONFIG, text.encode(), self.fsync)

    def write_results(self, results: dict) -> None:
        atomic_write(self / RESULTS, (json.dumps(results, indent=2) + "\n").encode(), self.fsync)

    def read_results(self) -> dict:
        path = self / RESULTS
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"'{self.path}' has no {RESULTS}: not a finished run "
                              f"folder") from None
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read '{path}': {err}") from None

    def write_vectors(self, vectors: dict[int, np.ndarray]) -> None:
        arrays = {f"layer_{k}": v for k, v in sorted(vectors.items())}
        atomic_write(self / VECTORS, npz_bytes(arrays), self.fsync)

    def write_adapter(self, tensors: dict[str, np.ndarray], config: dict,
                      label_offsets: list[float] | None = None) -> Path:
        """adapter_config.json + adapter_model.safetensors, as PEFT's save_pretrained writes;
        with `label_offsets` (eval.calibrate=train) also label_offsets.json, which a plain PEFT
        load ignores: subtract offsets[i] from label i's logit before the argmax."""
        from safetensors.numpy import save as save_bytes

        folder = self / ADAPTER
        folder.mkdir(exist_ok=True)
        atomic_write(folder / "adapter_model.safetensors",
                     save_bytes(tensors, metadata={"format": "pt"}), self.fsync)
        atomic_write(folder / "adapter_config.json",
                     (json.dumps(config, indent=2) + "\n").encode(), self.fsync)
        if label_offsets is not None:
            atomic_write(folder / LABEL_OFFSETS, label_offsets_document(label_offsets).encode(),
                         self.fsync)
        return folder

    def append_metrics(self, record: dict) -> None:
        with open(self / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def keep_metrics(self, count: int) -> None:
        """Cut metrics.jsonl to its first `count` complete lines (a resumed session drops the
        records of the step it replays)."""
        path = self / METRICS
        if not path.exists():
            return
        lines = path.read_bytes().split(b"\n")[:count]
        atomic_write(path, b"".join(line + b"\n" for line in lines if line), self.fsync)

    def stored_config(self) -> RunConfig | None:
        """The config.yaml of a run stopped before its first checkpoint, if there is one."""
        path = self / CONFIG
        return RunConfig.from_dict(read_config(path)) if path.is_file() else None


def read_config(path: str | Path) -> dict:
    """A YAML (or JSON) config file as a mapping, or a ConfigError naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file '{path}': {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: "
                          f"{str(err).splitlines()[0]}") from None
    except (ValueError, RecursionError) as err:  # PyYAML: `2001-02-30`, huge ints, deep nests
        raise ConfigError(f"config file '{path}': a value YAML cannot read "
                          f"({str(err)[:80]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got "
                          f"{type(data).__name__}")
    return data
