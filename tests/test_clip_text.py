"""ella.pipelines.clip.encode_clip: A1111-style CLIP encoding (emphasis weights, 75-token windows, BREAK)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ella.errors import EllaError, InvalidArgumentError
from ella.pipelines import clip
from ella.pipelines.clip import encode_clip
from tiny_models import build_tiny_sdxl

#: 9 words the tiny CLIP tokenizer knows, one token each
SENTENCE = ["a", "photo", "of", "a", "red", "car", "on", "the", "street"]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def load_sd(path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return load_sd(tiny_sd)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(tmp_path_factory.mktemp("clip-sdxl") / "sdxl"))


def sd_ref(pipe, prompts, clip_skip=None, **kwargs) -> torch.Tensor:
    """diffusers' own SD encoding of ``prompts`` (77 tokens each)."""
    try:
        return pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=clip_skip, **kwargs)[0]
    except AttributeError:  # diffusers' clip_skip path wants transformers 4's text_encoder.text_model: same by hand
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        states = pipe.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return pipe.text_encoder.final_layer_norm(states)


def xl_ref(pipe, prompts, prompts_2=None, clip_skip=None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' own SDXL encoding: (embeds, pooled)."""
    kwargs = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=clip_skip)
    out = pipe.encode_prompt(prompts, prompts_2, **kwargs)
    return out[0], out[2]


def one(text: str, weight: float = 1.0) -> list[tuple[str, float | None]]:
    return [(text, weight)]


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sd_short_prompts_match_diffusers_bit_for_bit(sd, clip_skip):
    prompts = ["a photo of a red car", "a cat"]
    embeds, pooled, dropped = encode_clip(sd, [one(p) for p in prompts], "cpu", clip_skip=clip_skip)
    assert torch.equal(embeds, sd_ref(sd, prompts, clip_skip))
    assert pooled is None and dropped == ["", ""]


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sdxl_short_prompts_match_diffusers_bit_for_bit(sdxl, clip_skip):
    prompts, prompts_2 = ["a photo of a red car", "a cat"], ["a dog", "blue sky"]
    embeds, pooled, _ = encode_clip(sdxl, [one(p) for p in prompts], "cpu", clip_skip=clip_skip)
    ref, ref_pooled = xl_ref(sdxl, prompts, clip_skip=clip_skip)
    assert embeds.shape == (2, 77, 48) and torch.equal(embeds, ref) and torch.equal(pooled, ref_pooled)

    rows_2 = [one(p) for p in prompts_2]
    embeds, pooled, _ = encode_clip(sdxl, [one(p) for p in prompts], "cpu", rows_2=rows_2, clip_skip=clip_skip)
    ref, ref_pooled = xl_ref(sdxl, prompts, prompts_2, clip_skip=clip_skip)
    assert torch.equal(embeds, ref) and torch.equal(pooled, ref_pooled)


def test_weights_of_one_are_bit_identical_to_no_weights(sd):
    split = [("a photo of a ", 1.0), ("red", 1.0), (" car", 1.0)]
    assert torch.equal(encode_clip(sd, [split], "cpu")[0], encode_clip(sd, [one("a photo of a red car")], "cpu")[0])


def test_a_weight_scales_its_tokens_and_the_window_keeps_its_mean(sd):
    plain = encode_clip(sd, [one("a photo of a red car")], "cpu")[0][0]
    weighted = encode_clip(sd, [[("a photo of a ", 1.0), ("red", 1.3), (" car", 1.0)]], "cpu")[0][0]
    red = 5  # BOS a photo of a red
    others = torch.arange(77) != red
    # every position changes by the mean-restoring factor c; "red" by 1.3 c
    u, v = plain[others], weighted[others]
    c = float((u * v).sum() / (u * u).sum())
    assert abs(c - 1) > 1e-3
    assert torch.allclose(v, c * u, rtol=1e-4, atol=1e-5 * abs(c))
    assert torch.allclose(weighted[red], 1.3 * c * plain[red], rtol=1e-4, atol=1e-5 * abs(c))
    assert abs(float(weighted.mean() - plain.mean())) < 1e-5


def test_sdxl_weights_each_encoder_keeping_its_mean_and_not_the_pooled(sdxl):
    plain, plain_pooled, _ = encode_clip(sdxl, [one("a photo of a red car")], "cpu")
    weighted, pooled, _ = encode_clip(sdxl, [[("a photo of a ", 1.0), ("red", 1.3), (" car", 1.0)]], "cpu")
    assert not torch.equal(weighted, plain) and torch.equal(pooled, plain_pooled)
    for part in (slice(0, 16), slice(16, 48)):  # text_encoder's 16 features, then text_encoder_2's 32
        assert abs(float(weighted[..., part].mean() - plain[..., part].mean())) < 1e-5


def test_a_long_prompt_is_encoded_in_windows_of_75_tokens(sd):
    words = SENTENCE * 34  # 306 tokens
    text = " ".join(words)
    embeds, _, dropped = encode_clip(sd, [one(text)], "cpu")
    windows = math.ceil(len(words) / 75)
    assert embeds.shape == (1, 77 * windows, 32) and dropped == [""]
    for k in range(windows):
        own = sd_ref(sd, [" ".join(words[75 * k : 75 * k + 75])])
        assert torch.equal(embeds[0, 77 * k : 77 * (k + 1)], own[0]), k

    embeds, _, dropped = encode_clip(sd, [one(text)], "cpu", chunked=False)
    assert embeds.shape == (1, 77, 32) and torch.equal(embeds, sd_ref(sd, [text]))
    assert dropped == [" ".join(words[75:])]


def test_break_starts_a_window_and_short_rows_are_padded_with_the_empty_prompt(sd):
    rows = [[("a cat", 1.0), ("BREAK", None), ("a dog", 1.0)], one("a cat")]
    embeds, _, _ = encode_clip(sd, rows, "cpu")
    cat, dog, empty = sd_ref(sd, ["a cat", "a dog", ""])
    assert embeds.shape == (2, 154, 32)
    assert torch.equal(embeds[0, :77], cat) and torch.equal(embeds[0, 77:], dog)
    assert torch.equal(embeds[1, :77], cat) and torch.equal(embeds[1, 77:], empty)

    # a BREAK opens no empty window: at the start, twice in a row, at the end, or right after a full window
    stray = [("BREAK", None), ("a cat", 1.0), ("BREAK", None), ("BREAK", None)]
    assert torch.equal(encode_clip(sd, [stray], "cpu")[0][0], cat)
    full = [(" ".join((SENTENCE * 9)[:75]), 1.0), ("BREAK", None), ("a dog", 1.0)]
    assert encode_clip(sd, [full], "cpu")[0].shape == (1, 154, 32)
    # one window: BREAK is ignored
    assert torch.equal(encode_clip(sd, rows[:1], "cpu", chunked=False)[0], sd_ref(sd, ["a cat a dog"]))
    # an empty prompt is one window
    assert torch.equal(encode_clip(sd, [one("")], "cpu")[0][0], empty)


def test_sdxl_pads_each_encoder_to_the_longest_row(sdxl):
    rows_2 = [[("a cat", 1.0), ("BREAK", None), ("a dog", 1.0)]]
    embeds, pooled, _ = encode_clip(sdxl, [one("a cat")], "cpu", rows_2=rows_2)
    first, first_pooled = xl_ref(sdxl, ["a cat"])
    second, _ = xl_ref(sdxl, [""], ["a dog"])  # text_encoder: the empty prompt; text_encoder_2: "a dog"
    assert embeds.shape == (1, 154, 48)
    assert torch.equal(embeds[:, :77], first) and torch.equal(embeds[:, 77:], second)
    assert torch.allclose(pooled, first_pooled, atol=1e-6)  # the first window's, batched with the others


def test_textual_inversion_multi_vector_tokens_match_diffusers(tiny_sd):
    pipe = load_sd(tiny_sd)
    torch.manual_seed(0)
    pipe.load_textual_inversion({"<tok>": torch.randn(3, 32)}, token="<tok>")
    segments = [("a ", 1.0), ("<tok>", 1.0), (" cat", 1.0)]
    embeds = encode_clip(pipe, [segments], "cpu")[0]
    assert torch.equal(embeds, sd_ref(pipe, ["a <tok> cat"]))
    # all three vectors (positions 2..4, after BOS and "a") carry the segment's weight
    weighted = encode_clip(pipe, [[("a ", 1.0), ("<tok>", 1.5), (" cat", 1.0)]], "cpu")[0]
    ratio = (weighted[0] / embeds[0]).median(dim=-1).values
    assert torch.allclose(ratio[2:5], 1.5 * ratio[1].expand(3), rtol=1e-4)
    assert torch.allclose(ratio[5], ratio[1], rtol=1e-4)


def test_lora_scale_matches_diffusers_and_is_undone_even_on_error(tiny_sd, monkeypatch):
    from peft import LoraConfig, inject_adapter_in_model

    pipe = load_sd(tiny_sd)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), pipe.text_encoder)
    torch.manual_seed(0)
    for name, p in pipe.text_encoder.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.5)  # peft zero-inits B
    rows, prompts = [one("a photo of a red car")], ["a photo of a red car"]
    full = sd_ref(pipe, prompts)
    half = encode_clip(pipe, rows, "cpu", lora_scale=0.5)[0]
    assert not torch.equal(half, full) and torch.equal(half, sd_ref(pipe, prompts, lora_scale=0.5))

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(clip, "_encode_windows", boom)
    with pytest.raises(RuntimeError, match="boom"):
        encode_clip(pipe, rows, "cpu", lora_scale=0.5)
    monkeypatch.undo()
    assert torch.equal(encode_clip(pipe, rows, "cpu")[0], full)


def test_refuses_a_pipeline_without_a_text_encoder(sd, sdxl):
    from conftest import plain_of

    bare_sd = plain_of(sd)  # the same parts, no text encoder
    bare_xl = StableDiffusionXLPipeline(
        vae=sdxl.vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=sdxl.unet,
        scheduler=sdxl.scheduler,
    )
    for pipe in (bare_sd, bare_xl):
        with pytest.raises(EllaError, match="text encoder") as info:
            encode_clip(pipe, [one("a cat")], "cpu")
        assert "\n" not in str(info.value)
    with pytest.raises(InvalidArgumentError, match="rows_2"):
        encode_clip(sdxl, [one("a cat")], "cpu", rows_2=[one("a"), one("b")])
