"""The study's scripts (bench/study.py, bench/soup_probe.py): every variant is a valid config, and
the soup probe reads a PEFT adapter's delta with its scaling."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from orchestrator import presets

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = load_script("study")


def variant_config(name: str, seed: int, root: Path):
    """The config a study variant's run resolves to (`--set` pairs on the demo preset); raises
    ConfigError on a typo'd key or value."""
    argv = study.command(name, seed, "default", root)
    return presets.resolve(None, "demo", [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])


@pytest.mark.parametrize("name", sorted(study.VARIANTS))
def test_every_study_variant_is_a_valid_config(name, tmp_path):
    argv = study.command(name, 13, "default", tmp_path)
    assert argv[0] == "dfolora" and argv[1] in ("run", "lora", "zero-shot")
    cfg = variant_config(name, 13, tmp_path)
    assert cfg.seed == 13 and cfg.task.template == "default"


def test_sixth_session_variants_change_one_thing_on_calib_loss(tmp_path):
    def resolved(name):
        return variant_config(name, 21, tmp_path).to_dict()

    reference = resolved("calib-loss")
    assert reference["eval"]["calibrate"] == "train" and reference["schedule"]["select"] == "loss"
    assert resolved("cl-dim100")["adapter"]["dim"] == 100
    assert resolved("cl-dim100") == {**reference, "adapter": {**reference["adapter"], "dim": 100}}
    assert resolved("cl-l2s")["schedule"] == {**reference["schedule"], "l2": 0.005}


def test_soup_probe_reads_a_peft_delta_with_its_scaling(tmp_path):
    soup = load_script("soup_probe")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, generator=generator)  # lora_A (r, in)
    b = torch.randn(3, 2, generator=generator)  # lora_B (out, r)
    name = "model.layers.0.self_attn.q_proj"
    (tmp_path / "adapter").mkdir()
    save_file({f"base_model.model.{name}.lora_A.weight": a,
               f"base_model.model.{name}.lora_B.weight": b},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 2,
                                                                          "lora_alpha": 8}))
    deltas = soup.deltas(tmp_path)
    assert list(deltas) == [name]
    np.testing.assert_allclose(deltas[name].numpy(), 4.0 * (b @ a).numpy(), rtol=1e-6)


def test_auto_fit_is_the_demo_preset_and_older_variants_keep_mean_offsets(tmp_path):
    def resolved(name):
        return variant_config(name, 13, tmp_path).to_dict()

    assert resolved("auto-fit") == presets.resolve(None, "demo", ["seed=13"]).to_dict()
    for name in ("calib-loss", "auto-loss", "cl-diag", "lora-calib"):
        assert resolved(name)["eval"]["offsets"] == "mean"
    assert resolved("cl-sep")["optimizer"]["cma_diagonal"] is True
