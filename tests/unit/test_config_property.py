"""The config loader, fuzzed: whatever a user writes ends in a RunConfig or one ConfigError.

Three ways in, as the command line assembles a config (orchestrator/presets.py): a mapping
given to `RunConfig.from_dict` (a config file or a checkpoint's copy), `--set KEY=VALUE`
strings applied by `apply_sets` / `resolve`, and both together. Values are JSON/YAML-like:
nested dicts and lists, integers past 64 bits and past Python's 4300-digit printing limit,
floats with nan and inf, bools, None, strings, dates (YAML has them). Half of the mappings
follow the real schema with one wrong value at a time, so validation past the type checks is
reached too; the other half are arbitrary. A valid config must survive JSON and YAML (it is
saved in every checkpoint and run folder).
"""

import dataclasses
import json
import types
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import (
    CHOICES,
    AdapterConfig,
    EvalConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TaskConfig,
)
from common.errors import ConfigError
from orchestrator.presets import apply_sets, resolve

SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

EDGE_INTS = [0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1]
# built lazily: hypothesis reprs a strategy's constants, and Python refuses to print these
HUGE_INTS = st.sampled_from([400, 5000, -5000]).map(lambda n: 10 ** abs(n) * (1 if n > 0 else -1))
WORDS = sorted({word for choice in CHOICES.values() for word in choice}
               | {"default", "{text} {mask}", "{text} it was", "cma", "fwa", "", " ", "\n"})
INTS = st.integers() | st.sampled_from(EDGE_INTS) | HUGE_INTS
FLOATS = st.floats() | st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                                        1e308, 5e-324])
LEAVES = (st.none() | st.booleans() | INTS | FLOATS | st.text(max_size=8)
          | st.sampled_from(WORDS) | st.dates())


def leaf_paths(cls: type = RunConfig, prefix: str = "") -> dict[str, typing.Any]:
    """Every leaf key of the config tree, dotted, with its type hint."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(leaf_paths(hint, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


PATHS = leaf_paths()
SECTIONS = sorted({path.split(".")[0] for path in PATHS})
KEYS = (st.sampled_from(sorted(PATHS) + SECTIONS) | st.text(max_size=6) | INTS | st.none()
        | st.booleans() | st.floats(allow_nan=False))
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


def typed(hint: typing.Any) -> st.SearchStrategy:
    """Values of `hint`'s shape, edge cases included, and sometimes anything at all."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(typed(a) for a in args if a is not type(None))) | st.none()
    if origin is tuple:
        shaped = st.lists(typed(args[0]), max_size=4)
    elif origin is dict:
        shaped = st.dictionaries(KEYS, typed(args[1]), max_size=3)
    elif hint is int:
        shaped = INTS | st.integers(-3, 40)
    elif hint is float:
        shaped = FLOATS | INTS | st.floats(-3, 3)
    elif hint is bool:
        shaped = st.booleans()
    elif hint is str:
        shaped = st.sampled_from(WORDS) | st.text(max_size=8)
    else:
        shaped = st.nothing()
    return st.one_of(shaped, shaped, shaped, LEAVES)  # mostly the right shape


def nested(flat: dict[str, typing.Any]) -> dict:
    """{"task.k": 3} -> {"task": {"k": 3}}."""
    out: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@st.composite
def schema_configs(draw) -> dict:
    """The defaults with a few leaves redrawn (by their own type most of the time)."""
    base = RunConfig().to_dict()
    chosen = draw(st.lists(st.sampled_from(sorted(PATHS)), max_size=4, unique=True))
    flat = {path: draw(typed(PATHS[path])) for path in chosen}
    for section, entries in nested(flat).items():
        if isinstance(base.get(section), dict):
            base[section].update(entries)
        else:
            base[section] = entries
    return base


CONFIGS = schema_configs() | st.dictionaries(KEYS, VALUES, max_size=6) | VALUES


def flow_text(value) -> str:
    """A value written as one line of JSON (a YAML subset) when Python can print it."""
    try:
        return json.dumps(value, allow_nan=True, default=str)
    except (ValueError, TypeError):  # an integer past 4300 digits, a non-string key
        return "1" * 5000


TRICKY_YAML = ["2001-02-30", "!!timestamp x", "!!int x", "!!float x", "!!binary 0", "[" * 3000,
               "1" * 5000, "0x" + "f" * 5000, "{a: 1", "null", "~", ".inf", ".nan", "&a [*a]",
               "*x", "!!python/object/apply:os.system [ls]", "{? [1]: 2}", "[1, 2", "'",
               "!!set {a}", "- a\n- b", "a: b\nc", "\t", "1:30", "0o777", "1_000",
               "--- a\n--- b"]
YAML_TEXT = (st.sampled_from(TRICKY_YAML) | st.text(max_size=12)
             | VALUES.map(flow_text))
SET_KEYS = st.sampled_from(sorted(PATHS) + SECTIONS + ["", ".", "task..k", ".seed", "seed.",
                                                       " task.k ", "seed.x", "task.k.x"]) \
    | st.text(max_size=8)
SETS = st.lists(st.one_of(st.tuples(SET_KEYS, YAML_TEXT).map("=".join),
                          st.text(max_size=10)), max_size=4)


def check(data) -> None:
    """A RunConfig that round-trips and serialises, or a ConfigError of one line."""
    try:
        cfg = RunConfig.from_dict(data)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err), repr(str(err))
        return
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@SETTINGS
@given(CONFIGS)
def test_from_dict_gives_a_config_or_a_config_error(data):
    check(data)


@SETTINGS
@given(SETS)
def test_resolve_sets_gives_a_config_or_a_config_error(sets):
    try:
        cfg = resolve(sets=sets)
    except ConfigError as err:
        assert str(err)
    else:
        check(cfg.to_dict())


@SETTINGS
@given(CONFIGS, SETS)
def test_sets_over_any_mapping(data, sets):
    try:
        merged = apply_sets(data, sets)
    except ConfigError as err:
        assert str(err)
        return
    check(merged)


# Cases the fuzzing found: each raised ValueError, TypeError, AttributeError or RecursionError
# before (Python refuses to print integers of over 4300 digits; PyYAML's constructors raise more
# than YAMLError; apply_sets indexed a non-mapping base).

@pytest.mark.parametrize("data", [
    {"seed": -(10**5000)}, {"model": {"name": 10**5000}}, {10**5000: 1},
    {"task": {"labels": {10**5000: "x"}}}, {"seed": 2**63}, {"budget": [10**5000]},
])
def test_huge_integers(data):
    with pytest.raises(ConfigError):
        RunConfig.from_dict(data)
    check(data)


@pytest.mark.parametrize("text", ["2001-02-30", "1" * 5000, "0x" + "f" * 5000, "[" * 3000,
                                  "!!timestamp x", "!!int x", "!!float x"])
def test_yaml_values_that_crashed(text):
    with pytest.raises(ConfigError, match="seed"):
        resolve(sets=[f"seed={text}"])


@pytest.mark.parametrize("base", [[], "seed: 1", 3])
def test_sets_over_a_non_mapping(base):
    with pytest.raises(ConfigError, match="must be a mapping"):
        apply_sets(base, ["seed=1"])


# -- looser strategies (from test_bad_input.py): any key or value, sections by their fields --

LOOSE_SECTIONS = {"model": ModelConfig, "task": TaskConfig, "adapter": AdapterConfig,
                  "eval": EvalConfig, "optimizer": OptimizerConfig}
LOOSE_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                | st.sampled_from(["auto", "causal", "masked", "first", "qk-input", "ce", "hinge",
                                   "{text} {mask}", "default"]))
LOOSE_VALUES = st.recursive(
    LOOSE_LEAVES,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def loose_section(cls) -> st.SearchStrategy:
    names = [f for f in cls.__dataclass_fields__]
    keys = st.sampled_from(names) | st.text(max_size=6)
    return st.dictionaries(keys, LOOSE_VALUES, max_size=len(names))


LOOSE_CONFIGS = st.dictionaries(
    st.sampled_from(["seed", *LOOSE_SECTIONS]) | st.text(max_size=6),
    st.one_of(LOOSE_VALUES, *(loose_section(cls) for cls in LOOSE_SECTIONS.values())),
    max_size=6,
)


def check_from_dict(data) -> None:
    try:
        cfg = RunConfig.from_dict(data)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)
    else:
        # unknown keys are refused, so every key given is known; every key not given (at the
        # top or inside a section given) keeps its default; and the config round-trips
        given, full, default = data or {}, cfg.to_dict(), RunConfig().to_dict()
        assert set(given) <= set(full)
        for key, value in full.items():
            if key not in given:
                assert value == default[key], key
            elif isinstance(given[key], dict):
                assert set(given[key]) <= set(value), key
                assert all(value[k] == default[key][k] for k in value if k not in given[key]), key
        assert RunConfig.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LOOSE_CONFIGS)
def test_from_dict_only_raises_config_error(data):
    check_from_dict(data)


@settings(max_examples=60, deadline=None)
@given(LOOSE_VALUES)
def test_from_dict_on_any_json_value(data):
    check_from_dict(data)
