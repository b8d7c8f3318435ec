"""The tiny SDXL stand-in (tiny_models.build_tiny_sdxl) loads and runs through the real diffusers code paths."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from tiny_models import (
    TINY_SDXL_CROSS_ATTENTION_DIM,
    TINY_SDXL_POOLED_DIM,
    TINY_SDXL_TIME_EMBED_DIM,
    build_tiny_sdxl,
)

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl-base")


def test_layout_is_sdxl_base(tiny_sdxl):
    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    for sub in ("unet", "vae"):
        assert {p.name for p in (tiny_sdxl / sub).iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    for sub in ("text_encoder", "text_encoder_2"):
        assert {p.name for p in (tiny_sdxl / sub).iterdir()} == {"config.json", "model.safetensors"}
    for sub in ("tokenizer", "tokenizer_2"):
        assert {p.name for p in (tiny_sdxl / sub).iterdir()} == TOKENIZER_FILES
    sched = json.loads((tiny_sdxl / "scheduler" / "scheduler_config.json").read_text())
    assert sched["timestep_spacing"] == "leading" and sched["steps_offset"] == 1
    assert sched["beta_schedule"] == "scaled_linear" and sched["prediction_type"] == "epsilon"
    vae = json.loads((tiny_sdxl / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(0.13025)


def test_unet_is_sdxl_style(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == TINY_SDXL_CROSS_ATTENTION_DIM == 48
    assert unet.config.addition_time_embed_dim == TINY_SDXL_TIME_EMBED_DIM == 8
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    assert pooled == TINY_SDXL_POOLED_DIM == 16
    assert unet.add_embedding.linear_1.in_features == TINY_SDXL_POOLED_DIM + 6 * TINY_SDXL_TIME_EMBED_DIM


def test_pipeline_loads_and_runs(tiny_sdxl):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    assert pipe.text_encoder_2.config.projection_dim == TINY_SDXL_POOLED_DIM
    assert pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size == 48
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"

    embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a red cat", device="cpu")
    assert embeds.shape == (1, 77, TINY_SDXL_CROSS_ATTENTION_DIM) and pooled.shape == (1, TINY_SDXL_POOLED_DIM)
    assert torch.count_nonzero(neg) == 0 and torch.count_nonzero(neg_pooled) == 0  # force_zeros_for_empty_prompt

    out = pipe(
        "a red cat",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_same_seed_same_bytes_and_caller_rng_untouched(tiny_sdxl, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny_sdxl(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected)  # building did not consume the caller's RNG
    for rel in (
        UNET_WEIGHTS,
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    ):
        assert (again / rel).read_bytes() == (tiny_sdxl / rel).read_bytes(), rel
    other = build_tiny_sdxl(tmp_path / "other", seed=1)
    assert (other / UNET_WEIGHTS).read_bytes() != (tiny_sdxl / UNET_WEIGHTS).read_bytes()
