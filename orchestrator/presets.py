"""Named configs (orchestrator/presets/*.yaml) and how a command line becomes a RunConfig.

A preset's first line is a `# description` comment, shown by `dfolora presets`. A run's config is
assembled in layers: defaults <- a preset or a config file <- `--set KEY=VALUE` overrides, where
KEY is dotted (`task.name`) and VALUE is parsed as YAML (`[29, 28]`, `{name: cma}`, `null`).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

import yaml

from common.config import RunConfig
from common.errors import ConfigError, first_line
from orchestrator.runfolder import read_config

FOLDER = Path(__file__).with_name("presets")


def names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def describe(name: str) -> str:
    first = (FOLDER / f"{name}.yaml").read_text().splitlines()[0]
    return first.lstrip("# ").strip()


def load(name: str) -> dict:
    if name not in names():
        near = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"unknown preset '{name}'{hint}; `dfolora presets` lists them")
    return read_config(FOLDER / f"{name}.yaml")


def apply_sets(data: dict, sets: list[str]) -> dict:
    """`data` with each dotted KEY=VALUE override applied (VALUE parsed as YAML)."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of keys, got {type(data).__name__}")
    data = copy.deepcopy(data or {})
    for item in sets:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set '{item}': expected KEY=VALUE with a dotted key, "
                              f"e.g. --set task.k=8")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except Exception as err:
            # Not only YAMLError: PyYAML's constructors raise ValueError for `2001-02-30` or an
            # integer of over 4300 digits, AttributeError for `!!timestamp x`, RecursionError
            # for `[[[[...` nested too deep.
            raise ConfigError(f"--set {key}: the value '{text}' is not valid YAML "
                              f"({first_line(err) or type(err).__name__})") from None
        *parents, leaf = key.split(".")
        node = data
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parents[:depth + 1])}' is not a "
                                  f"section of the config")
            node = child
        node[leaf] = value
    return data


def resolve(config: str | None = None, preset: str | None = None,
            sets: list[str] | None = None) -> RunConfig:
    """defaults <- preset or config file <- --set overrides, validated."""
    if config and preset:
        raise ConfigError("give either --config or --preset, not both")
    data = read_config(config) if config else load(preset) if preset else {}
    return RunConfig.from_dict(apply_sets(data, sets or []))
