"""Community tools on ELLA pipelines: ella+clip mode, textual inversion, img2img, inpainting, ControlNet,
Karras/fractional timesteps, A1111 prompt weights — every path checked against an independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, EulerDiscreteScheduler
from PIL import Image

from conftest import gen, rebuild, record
from ella.errors import EllaError
from ella.pipelines import (
    EllaStableDiffusionControlNetPipeline,
    EllaStableDiffusionImg2ImgPipeline,
    EllaStableDiffusionInpaintPipeline,
    EllaStableDiffusionPipeline,
)
from ella.prompts import PromptWeightsWarning
from ella.text import encode_text

PROMPT = "a red cat sitting on a blue chair next to a green lamp"
KW = {"num_inference_steps": 5, "output_type": "np"}


def ella_reference(pipe, texts, t) -> torch.Tensor:
    feats = encode_text(pipe.llm, pipe.llm_tokenizer, texts, max_length=128).hidden_states
    return pipe.connector(feats, t)


@pytest.fixture()
def clip_pipe(pipe, tiny_sd):
    return rebuild(pipe, EllaStableDiffusionPipeline, clip_dir=tiny_sd, condition_mode="ella+clip")


# ------------------------------------------------------------------------------------------- ella+clip


def test_ella_clip_mode_gives_the_unet_clip_tokens_then_ella_tokens(clip_pipe):
    seen = record(clip_pipe.unet)
    clip_pipe(PROMPT, negative_prompt="blurry", generator=gen(1), height=64, width=64, **KW)
    clip = clip_pipe.clip_embeds(["blurry", PROMPT], "cpu")  # CFG order: negative, positive
    assert clip.shape[1] == 77
    for t, cond in seen:
        assert cond.shape == (2, 77 + 8, 32)
        assert torch.allclose(cond[:, :77], clip, atol=1e-6)
        assert torch.allclose(cond[:, 77:], ella_reference(clip_pipe, ["blurry", PROMPT], t), atol=1e-5)


def test_ella_clip_order_does_not_change_the_image_and_scales_do(clip_pipe):
    first = clip_pipe(PROMPT, generator=gen(2), height=64, width=64, **KW).images
    seen = record(clip_pipe.unet)
    last = clip_pipe(PROMPT, generator=gen(2), height=64, width=64, clip_first=False, **KW).images
    assert torch.allclose(seen[0][1][:, -77:], clip_pipe.clip_embeds(["", PROMPT], "cpu"), atol=1e-6)
    assert np.abs(first - last).max() < 1e-4  # cross-attention is permutation-invariant over its keys
    quiet_clip = clip_pipe(PROMPT, generator=gen(2), height=64, width=64, clip_scale=0.0, **KW).images
    assert np.abs(first - quiet_clip).max() > 1e-3
    ella_only = clip_pipe(PROMPT, generator=gen(2), height=64, width=64, condition_mode="ella", **KW).images
    assert np.abs(first - ella_only).max() > 1e-3


def test_textual_inversion_reaches_the_unet_through_the_clip_part_only(clip_pipe):
    width = clip_pipe.text_encoder.config.hidden_size
    prompt = "a photo of <sks> on a table"
    images = {}
    for mode in ("ella+clip", "ella"):
        for seed in (0, 1):
            clip_pipe.load_textual_inversion(
                {"<sks>": torch.randn(width, generator=torch.Generator().manual_seed(seed))}, token="<sks>"
            )
            images[mode, seed] = clip_pipe(
                prompt, generator=gen(3), height=64, width=64, condition_mode=mode, **KW
            ).images
            clip_pipe.unload_textual_inversion()
    assert np.abs(images["ella+clip", 0] - images["ella+clip", 1]).max() > 1e-3  # the learned token matters
    assert np.array_equal(images["ella", 0], images["ella", 1])  # ELLA alone never sees CLIP's embeddings


def test_bad_mode_and_missing_clip_are_clear_errors(pipe):
    with pytest.raises(EllaError, match="unknown condition mode 'clip'"):
        pipe(PROMPT, condition_mode="clip", height=64, width=64, **KW)
    with pytest.raises(EllaError, match="needs the base model's CLIP text_encoder"):
        pipe(PROMPT, condition_mode="ella+clip", height=64, width=64, **KW)
    with pytest.raises(EllaError, match="ella\\+clip"):
        pipe(PROMPT, clip_scale=0.5, height=64, width=64, **KW)


# ------------------------------------------------------------------------------- img2img / inpainting


def test_img2img_starts_at_the_strength_timestep_with_its_condition(pipe):
    p = rebuild(pipe, EllaStableDiffusionImg2ImgPipeline)
    seen = record(p.unet)
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    out = p(PROMPT, image=init, strength=0.6, generator=gen(4), guidance_scale=1.0, **KW).images
    assert out.shape == (1, 64, 64, 3)
    full = p.scheduler.timesteps  # the 5-step schedule; strength 0.6 runs its last 3 steps
    assert [float(t) for t, _ in seen] == [float(t) for t in full[2:]]
    for t, cond in seen:
        assert torch.allclose(cond, ella_reference(p, [PROMPT], t), atol=1e-5)
    again = p(PROMPT, image=init, strength=0.6, generator=gen(4), guidance_scale=1.0, **KW).images
    assert np.array_equal(out, again)


def test_inpainting_keeps_the_unmasked_region_and_conditions_every_step(pipe):
    p = rebuild(pipe, EllaStableDiffusionInpaintPipeline)
    seen = record(p.unet)
    init = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # repaint the right half
    out = p(PROMPT, image=init, mask_image=Image.fromarray(mask), strength=1.0, generator=gen(5), **KW).images[0]
    for t, cond in seen:
        assert torch.allclose(cond, ella_reference(p, ["", PROMPT], t), atol=1e-5)
    assert len(seen) == 5
    # a 4-channel UNet blends the known latents back at every step: the kept half stays close to
    # the VAE round-trip of the input, the repainted half does not
    src = np.asarray(init, np.float32) / 255
    kept, repainted = np.abs(out[:, :24] - src[:, :24]).mean(), np.abs(out[:, 40:] - src[:, 40:]).mean()
    assert kept < repainted


# ------------------------------------------------------------------------------------------ ControlNet


def test_controlnet_receives_the_unets_condition_of_the_current_timestep(pipe):
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    p = rebuild(pipe, EllaStableDiffusionControlNetPipeline, controlnet=controlnet)
    to_unet, to_controlnet = record(p.unet), record(p.controlnet)
    control = Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8))
    p(PROMPT, image=control, generator=gen(6), height=64, width=64, **KW)
    assert len(to_controlnet) == len(to_unet) == 5
    for (t_c, cond_c), (t_u, cond_u) in zip(to_controlnet, to_unet):
        assert float(t_c) == float(t_u)
        assert torch.equal(cond_c, cond_u)
        assert torch.allclose(cond_c, ella_reference(p, ["", PROMPT], t_c), atol=1e-5)


# ------------------------------------------------------------------------------ schedulers, prompt text


def test_karras_sigmas_fractional_timesteps_get_their_own_condition(pipe):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    seen = record(pipe.unet)
    pipe(PROMPT, generator=gen(7), height=64, width=64, guidance_scale=1.0, **KW)
    timesteps = [float(t) for t, _ in seen]
    assert any(t != round(t) for t in timesteps)  # Karras sigmas map to fractional timesteps
    for t, cond in seen:
        assert torch.allclose(cond, ella_reference(pipe, [PROMPT], t), atol=1e-5)


def test_a1111_prompt_weights_off_strips_them_with_a_warning(pipe):
    plain = pipe("a red cat on a blue chair", generator=gen(8), height=64, width=64, **KW).images
    with pytest.warns(PromptWeightsWarning, match="removed the markup"):
        weighted = pipe(
            "a (red:1.3) cat on a [blue] chair", generator=gen(8), height=64, width=64, prompt_weights=False, **KW
        ).images
    assert np.array_equal(plain, weighted)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tool_files(tiny_sd, tmp_path_factory):
    """Input pictures, a tiny ControlNet dir and a tiny LoRA file, as a user would have them on disk."""
    from tiny_models import write_tiny_lora

    root = tmp_path_factory.mktemp("tools")
    rng = np.random.default_rng(3)
    for name in ("init", "init2", "control"):
        Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(root / f"{name}.png")  # resized on read
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "mask.png")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    with torch.no_grad():  # its zero-initialised output convs would make it a no-op
        for name, p in controlnet.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                p.normal_(0, 0.1)
    controlnet.save_pretrained(root / "cn")
    return {"root": root, "lora": write_tiny_lora(tiny_sd, root / "lora")}


def generate(models: list[str], out, *flags: str) -> tuple[np.ndarray, dict]:
    import json

    from ella.cli import main as cli

    assert (
        cli(
            [
                "generate",
                "a red cat on a blue chair",
                "--steps",
                "3",
                "--width",
                "64",
                "--height",
                "64",
                "--out",
                str(out),
                *models,
                *flags,
            ]
        )
        == 0
    )
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png)), json.loads(png.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def cli_models(tiny_sd, tiny_ella_file, tiny_t5):
    return ["--base", str(tiny_sd), "--ella", str(tiny_ella_file), "--llm", str(tiny_t5), "--device", "cpu"]


def test_generate_tool_flags_pick_the_pipeline_and_record_their_inputs(cli_models, tool_files, tmp_path):
    r = tool_files["root"]
    plain, _ = generate(cli_models, tmp_path / "plain")
    cases = {
        "img2img": ["--init-image", str(r / "init.png"), "--strength", "0.6"],
        "inpaint": ["--init-image", str(r / "init.png"), "--mask", str(r / "mask.png")],
        "controlnet": ["--controlnet", str(r / "cn"), "--control-image", str(r / "control.png")],
        "controlnet-img2img": [
            "--controlnet",
            str(r / "cn"),
            "--control-image",
            str(r / "control.png"),
            "--init-image",
            str(r / "init.png"),
        ],
    }
    for kind, flags in cases.items():
        image, sidecar = generate(cli_models, tmp_path / kind, *flags)
        assert sidecar["models"]["kind"] == kind
        assert set(sidecar["inputs"].values()) == {f for f in flags if f.endswith(".png")}
        assert image.shape == (64, 64, 3) and np.abs(image.astype(int) - plain).max() > 0
    again, sidecar = generate(cli_models, tmp_path / "img2img-again", *cases["img2img"])
    other, _ = generate(
        cli_models, tmp_path / "img2img-other", "--init-image", str(r / "init2.png"), "--strength", "0.6"
    )
    assert np.array_equal(again, np.asarray(Image.open(next((tmp_path / "img2img").glob("*.png")))))
    assert sidecar["strength"] == 0.6 and np.abs(other.astype(int) - again).max() > 0  # the input image matters


def test_generate_lora_and_ella_clip_mode_change_the_image(cli_models, tool_files, tmp_path):
    plain, _ = generate(cli_models, tmp_path / "plain")
    lora, sidecar = generate(cli_models, tmp_path / "lora", "--lora", f"{tool_files['lora']}:0.7")
    assert sidecar["models"]["lora"] == [{"path": str(tool_files["lora"]), "scale": 0.7}]
    assert np.abs(lora.astype(int) - plain).max() > 0
    both, sidecar = generate(cli_models, tmp_path / "clip", "--mode", "ella+clip")
    assert sidecar["condition_mode"] == "ella+clip" and np.abs(both.astype(int) - plain).max() > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mask", "m.png"], "--mask needs --init-image"),
        (["--controlnet", "cn"], "--controlnet and --control-image go together"),
        (["--init-image", "x.png", "--strength", "1.5"], "strength must be in"),
        (["--init-image", "nope.png"], "cannot read image 'nope.png'"),
        (["--lora", "missing.safetensors"], "does not exist"),
    ],
)
def test_generate_tool_flag_mistakes_are_one_line(cli_models, tmp_path, capsys, flags, message):
    from ella.cli import main as cli

    assert cli(["generate", "a cat", "--steps", "2", "--out", str(tmp_path), *cli_models, *flags]) == 2
    assert message in capsys.readouterr().err
