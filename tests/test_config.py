"""The config tree: TOML + overrides, type and cross-field checks naming the field, CLI exit 2."""

import json
import subprocess
import sys

import pytest

from pipeline.config import ConfigError, ModelConfig, RunConfig, config_from_dict, describe, load_config
from tests.conftest import ROOT, subprocess_env

DEMO = ROOT / "configs" / "demo.toml"


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config(DEMO, ["optim.base_lr=3e-4", "data.crop_scale=[0.5, 1.0]", "model.norm_pix_loss=false",
                             "name=x"])
    assert cfg.optim.base_lr == 3e-4 and cfg.data.crop_scale == [0.5, 1.0]
    assert cfg.model.norm_pix_loss is False and cfg.name == "x" and cfg.model.in_chans == 1


@pytest.mark.parametrize("override,field", [
    ("model.bogus=1", "model.bogus"),
    ("optim.base_lr=-1", "optim.base_lr"),
    ("model.mask_ratio=1.0", "model.mask_ratio"),
    ("model.img_size=30", "model.img_size"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("train.precision='fp8'", "train.precision"),
    ("model.preset='giant'", "model.preset"),
    ("data.batch_size=1.5", "data.batch_size"),
    ("data.mean=[0.1, 0.2]", "data.mean"),
    ("model.decoder_depth=-1", "model.decoder_depth"),
    ("model.decoder_embed_dim=66", "model.decoder_embed_dim"),  # not a multiple of the decoder's 4 heads
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(DEMO, [override])


def test_accepted_values_are_listed():
    with pytest.raises(ConfigError, match="'fp32', 'bf16', 'fp16'"):
        load_config(DEMO, ["train.precision=fp8"])


def test_config_built_in_code_names_an_unknown_preset():
    with pytest.raises(ConfigError, match=r"model\.preset='giant'.*micro, tiny"):
        ModelConfig(preset="giant").check()


def test_roundtrip_through_saved_json(tmp_path):
    cfg = load_config(DEMO, ["train.steps=7"])
    cfg.save(tmp_path / "config.json")
    again = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again == cfg and again.hash() == cfg.hash()


def test_hash_tracks_model_only_by_default():
    a, b = RunConfig(), RunConfig()
    b.train.steps = 5
    assert a.hash() == b.hash()
    b.model.mask_ratio = 0.5
    assert a.hash() != b.hash()


def test_every_field_has_a_docstring():
    text = describe()
    fields = [line for line in text.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    docs = [line for line in text.splitlines() if line.startswith("      ")]
    assert len(fields) == len(docs) and all(d.strip() for d in docs)


@pytest.mark.parametrize("override", ["model.bogus=1", "model.mask_ratio=1.0", "optim.base_lr=-1", "model.img_size=30"])
def test_cli_exits_2_with_the_field(override):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--config", str(DEMO), override],
                         capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    assert out.returncode == 2
    assert override.split("=")[0] in out.stderr
