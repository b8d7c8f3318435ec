"""A base model from one community checkpoint file (original LDM layout, as on civitai), offline."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ella import load_pipeline
from ella.cli import build_parser
from ella.errors import EllaError
from ella.hub import DEFAULT_BASE
from ldm_layout import write_ldm_checkpoint

KW = dict(num_inference_steps=3, height=64, width=64, output_type="np", guidance_scale=7.0)
PROMPT = "a red cat sitting on a blue chair"


@pytest.fixture(scope="module")
def ldm_file(tiny_sd, tiny_dir):
    return write_ldm_checkpoint(tiny_sd, tiny_dir / "tiny-sd15-ldm.safetensors")


@pytest.fixture()
def load(tiny_t5, tiny_ella_file):
    def load(base, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = load_pipeline(base, tiny_ella_file, tiny_t5, device="cpu", dtype="float32", **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


def images(pipe):
    return pipe(PROMPT, negative_prompt="blurry", generator=torch.Generator().manual_seed(5), **KW).images


@pytest.fixture()
def empty_hf_cache(tmp_path, monkeypatch):
    """Offline, with a Hugging Face cache that holds nothing (env and huggingface_hub's import-time constant)."""
    import huggingface_hub.constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def test_checkpoint_is_in_the_original_ldm_layout(ldm_file):
    with safe_open(str(ldm_file), "pt") as f:
        keys = list(f.keys())
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert {p for p in prefixes if any(k.startswith(p) for k in keys)} == set(prefixes)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys  # SD 1.x block numbering
    assert not any("down_blocks" in k or "resnets" in k for k in keys)  # no diffusers names left


def test_single_file_gives_the_same_images_as_the_directory(load, tiny_sd, ldm_file):
    from_dir = images(load(tiny_sd))
    from_file = images(load(ldm_file, base_config=tiny_sd))
    assert from_file.shape == (1, 64, 64, 3)
    assert np.abs(from_file - from_dir).max() < 1e-6


def test_single_file_weights_equal_the_originals(load, tiny_sd, ldm_file):
    ref, pipe = load(tiny_sd), load(ldm_file, base_config=tiny_sd)
    for name in ("unet", "vae"):
        got, want = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys(), name
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), f"{name}.{key}"
    for name in ("unet", "vae", "scheduler"):
        got, want = (dict(getattr(p, name).config) for p in (pipe, ref))
        got.pop("_name_or_path", None), want.pop("_name_or_path", None)
        assert got == want, name


def test_offline_without_the_default_config_names_it_and_the_fix(load, ldm_file, empty_hf_cache, monkeypatch):
    import ella.loading

    def not_reached(*args, **kwargs):
        raise AssertionError("the missing config must fail before the connector and LLM load")

    monkeypatch.setattr(ella.loading, "load_connector", not_reached)
    with pytest.raises(EllaError) as info:
        load(ldm_file)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{DEFAULT_BASE}'" in message and "HF_HUB_OFFLINE=1" in message
    assert f'hf download {DEFAULT_BASE} --include "*.json" "*.txt"' in message
    assert "--base-config DIR" in message and ldm_file.name in message


def test_offline_default_config_from_the_cache(load, tiny_sd, ldm_file, empty_hf_cache):
    """The default (SD 1.5 repo) config is used from the HF cache offline, as `hf download ... --include` left it."""
    commit = "0" * 40
    repo = empty_hf_cache / f"models--{DEFAULT_BASE.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_sd, snapshot, ignore=shutil.ignore_patterns("*.safetensors"))  # configs only, no weights
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert np.abs(images(load(ldm_file)) - images(load(tiny_sd))).max() < 1e-6


def test_base_config_dir_must_be_a_diffusers_pipeline(load, ldm_file, tmp_path):
    with pytest.raises(EllaError, match="no model_index.json"):
        load(ldm_file, base_config=tmp_path)


def test_cli_flag_reaches_load_pipeline(monkeypatch, tmp_path):
    import ella.loading

    seen = {}

    def fake_load_pipeline(*args, **kwargs):
        seen.update(kwargs)
        raise EllaError("stop here")

    monkeypatch.setattr(ella.loading, "load_pipeline", fake_load_pipeline)
    from ella.cli import cmd_generate

    args = build_parser().parse_args(
        ["generate", "a cat", "--base", "m.safetensors", "--base-config", "cfg", "--out", str(tmp_path)]
    )
    with pytest.raises(EllaError, match="stop here"):
        cmd_generate(args)
    assert seen["base_config"] == "cfg"
