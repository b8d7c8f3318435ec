"""ELLA-SDXL inference on the tiny SDXL: per-timestep tokens *and* pooled embedding, time ids, ella+clip."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import T5_DIM, tiny_connector
from ella.errors import EllaError
from ella.llm import load_llm
from ella.pipelines import EllaStableDiffusionXLImg2ImgPipeline, EllaStableDiffusionXLPipeline
from ella.text import encode_text
from tiny_models import TINY_SDXL_CROSS_ATTENTION_DIM, TINY_SDXL_POOLED_DIM, build_tiny_sdxl

PROMPT = "a red cat sitting on a blue chair next to a green lamp"
KW = {"num_inference_steps": 4, "height": 64, "width": 64, "output_type": "np"}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl-base")


def load(tiny_sdxl, tiny_t5, cls=EllaStableDiffusionXLPipeline, pooled=True, clip=False):
    connector = tiny_connector(
        seed=2,
        width=TINY_SDXL_CROSS_ATTENTION_DIM,
        input_dim=T5_DIM,
        pooled_dim=TINY_SDXL_POOLED_DIM if pooled else None,
    )
    llm, tok = load_llm(tiny_t5)
    parts = {} if clip else {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(
            tiny_sdxl,
            connector=connector,
            llm=llm,
            llm_tokenizer=tok,
            condition_mode="ella+clip" if clip else "ella",
            **parts,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record(unet) -> list:
    seen = []
    unet.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(
            (
                args[1].clone(),
                kwargs["encoder_hidden_states"].clone(),
                {k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()},
            )
        ),
        with_kwargs=True,
    )
    return seen


def test_unet_gets_tokens_and_pooled_of_each_timestep(tiny_sdxl, tiny_t5):
    pipe = load(tiny_sdxl, tiny_t5)
    seen = record(pipe.unet)
    out = pipe(PROMPT, negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **KW).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    feats = encode_text(pipe.llm, pipe.llm_tokenizer, ["blurry", PROMPT], max_length=128).hidden_states
    assert len(seen) == 4
    for t, cond, added in seen:
        tokens = pipe.connector(feats, t)
        assert torch.allclose(cond, tokens, atol=1e-5)
        assert torch.allclose(added["text_embeds"], pipe.connector.pool(tokens), atol=1e-5)  # as trained
        # diffusers' own time ids: original size, crop top-left, target size
        assert added["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2
    assert not torch.allclose(seen[0][2]["text_embeds"], seen[-1][2]["text_embeds"])
    again = pipe(PROMPT, negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **KW).images
    assert np.array_equal(out, again)


def test_ella_clip_mode_uses_both_clips_tokens(tiny_sdxl, tiny_t5):
    pipe = load(tiny_sdxl, tiny_t5, clip=True)
    seen = record(pipe.unet)
    pipe(PROMPT, generator=torch.Generator().manual_seed(1), **KW)
    from diffusers import StableDiffusionXLPipeline

    clip, _, _, _ = StableDiffusionXLPipeline.encode_prompt(
        pipe, ["", PROMPT], device="cpu", do_classifier_free_guidance=False
    )
    for _, cond, _ in seen:
        assert cond.shape == (2, 77 + 8, TINY_SDXL_CROSS_ATTENTION_DIM)
        assert torch.allclose(cond[:, :77], clip, atol=1e-6)


def test_without_a_pooling_head_clip_gives_the_pooled_embedding_or_a_clear_error(tiny_sdxl, tiny_t5):
    pipe = load(tiny_sdxl, tiny_t5, pooled=False)
    with pytest.raises(EllaError, match="no pooling head"):
        pipe(PROMPT, **KW)
    pipe = load(tiny_sdxl, tiny_t5, pooled=False, clip=True)
    seen = record(pipe.unet)
    pipe(PROMPT, generator=torch.Generator().manual_seed(2), **KW)
    from diffusers import StableDiffusionXLPipeline

    _, _, clip_pooled, _ = StableDiffusionXLPipeline.encode_prompt(
        pipe, ["", PROMPT], device="cpu", do_classifier_free_guidance=False
    )
    assert torch.allclose(seen[0][2]["text_embeds"], clip_pooled, atol=1e-6)


def test_sdxl_img2img_starts_at_the_strength_timestep(tiny_sdxl, tiny_t5):
    from PIL import Image

    pipe = load(tiny_sdxl, tiny_t5, cls=EllaStableDiffusionXLImg2ImgPipeline)
    seen = record(pipe.unet)
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    pipe(
        PROMPT,
        image=init,
        strength=0.5,
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=4,
        output_type="np",
    )
    assert [float(t) for t, _, _ in seen] == [float(t) for t in pipe.scheduler.timesteps[2:]]


def test_load_pipeline_picks_sdxl_for_a_pooled_connector_and_cli_generates(tiny_sdxl, tiny_t5, tmp_path):
    import json

    from PIL import Image

    from ella import load_pipeline
    from ella.cli import main as cli

    ella_file = tmp_path / "ella-sdxl.safetensors"
    tiny_connector(
        seed=2, width=TINY_SDXL_CROSS_ATTENTION_DIM, input_dim=T5_DIM, pooled_dim=TINY_SDXL_POOLED_DIM
    ).save_single_file(ella_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_pipeline(tiny_sdxl, ella_file, tiny_t5, device="cpu", dtype="float32", scheduler="euler")
    assert type(pipe) is EllaStableDiffusionXLPipeline and pipe.text_encoder_2 is None
    assert (
        cli(
            [
                "generate",
                PROMPT,
                "--base",
                str(tiny_sdxl),
                "--ella",
                str(ella_file),
                "--llm",
                str(tiny_t5),
                "--device",
                "cpu",
                "--steps",
                "2",
                "--width",
                "64",
                "--height",
                "64",
                "--scheduler",
                "euler",
                "--mode",
                "ella+clip",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    (png,) = (tmp_path / "out").glob("*.png")
    assert Image.open(png).size == (64, 64)
    assert json.loads(png.with_suffix(".json").read_text())["condition_mode"] == "ella+clip"


def test_prompt_2_feeds_the_second_clip_in_ella_clip_mode_and_is_refused_in_ella_mode(tiny_sdxl, tiny_t5):
    from ella.errors import EllaError
    from ella.pipelines.clip import encode_clip
    from ella.prompts import parse_weights

    pipe = load(tiny_sdxl, tiny_t5, clip=True)
    seen = record(pipe.unet)
    generator = torch.Generator().manual_seed(0)
    pipe(PROMPT, prompt_2="a green lamp", clip_prompt="a red cat", guidance_scale=1.0, generator=generator, **KW)
    embeds, _, _ = encode_clip(pipe, [parse_weights("a red cat")], "cpu", rows_2=[parse_weights("a green lamp")])
    one_text, _, _ = encode_clip(pipe, [parse_weights("a red cat")], "cpu")
    assert not torch.allclose(embeds, one_text)
    for _, cond, _ in seen:
        assert torch.allclose(cond[:, :77], embeds, atol=1e-6)
    with pytest.raises(EllaError, match="prompt_2"):
        pipe(PROMPT, prompt_2="a green lamp", condition_mode="ella", **KW)
