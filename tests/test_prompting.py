"""Prompting as the community does: emphasis weights on the LLM side, prompt editing over steps, long prompts.

Each step's condition is checked against an independent reference: ``connector(llm(the prompt active at that
step), t)``, computed apart from the pipeline's table; weights against the softmax they are defined to produce.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from conftest import gen, rebuild, record, tiny_connector
from ella.connector import weighted_key_bias
from ella.errors import EllaError
from ella.pipelines import EllaStableDiffusionControlNetPipeline, EllaStableDiffusionImg2ImgPipeline
from ella.pipelines.prompting import plan_prompts
from ella.prompts import prompt_schedule
from ella.text import PromptTruncatedWarning, encode_text, tokenize

KW = {"num_inference_steps": 5, "output_type": "np", "height": 64, "width": 64}


def reference(pipe, texts: list[str], t, spans=None) -> torch.Tensor:
    feats = encode_text(pipe.llm, pipe.llm_tokenizer, texts, max_length=128, weights=spans)
    return pipe.connector(feats.hidden_states, t, text_weights=feats.token_weights)


# ------------------------------------------------------------------------------------------ weights: connector


def test_weight_bias_multiplies_each_weighted_keys_attention_by_its_weight():
    """The definition, checked on the first block's attention probabilities against softmax(logits) re-weighted
    by hand: p_w(j) = w_j p(j) / sum_k w_k p(k). The mass on the weighted tokens rises with the weight."""
    torch.manual_seed(0)
    connector = tiny_connector(seed=3).eval()
    text = torch.randn(1, 6, connector.config.input_dim)
    block = connector.connector.perceiver_blocks[0]
    probs = []

    def spy(module, args, kwargs, out):
        q, k, v = args
        probs.append(
            torch.nn.functional.multi_head_attention_forward(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), module.embed_dim, module.num_heads,
                module.in_proj_weight, module.in_proj_bias, None, None, False, 0.0,
                module.out_proj.weight, module.out_proj.bias, training=False,
                key_padding_mask=kwargs.get("key_padding_mask"), need_weights=True, average_attn_weights=False,
            )[1]
        )  # fmt: skip

    block.attn.register_forward_hook(spy, with_kwargs=True)
    masses = {}
    for w in (1.0, 0.5, 2.0, 4.0):
        weights = torch.ones(1, 6)
        weights[0, 2:4] = w
        probs.clear()
        connector(text, 500, text_weights=weights)
        p = probs[0]  # [1, heads, latents, latents + 6]: the first block
        if w == 1.0:
            plain = p
        masses[w] = p[..., -6:][..., 2:4].sum(-1).mean().item()
        if w != 1.0:
            keys = torch.ones(p.shape[-1])
            keys[-6 + 2 : -6 + 4] = w
            expected = plain * keys / (plain * keys).sum(-1, keepdim=True)
            assert torch.allclose(p, expected, atol=1e-6)
    ordered = [masses[w] for w in sorted(masses)]
    assert ordered == sorted(ordered) and ordered[0] < ordered[-1]


def test_weights_none_and_all_ones_agree_and_bad_weights_are_refused():
    connector = tiny_connector(seed=3).eval()
    text = torch.randn(2, 5, connector.config.input_dim)
    plain = connector(text, 300)
    assert torch.allclose(connector(text, 300, text_weights=torch.ones(2, 5)), plain, atol=1e-6)
    for bad in (torch.zeros(2, 5), torch.full((2, 5), float("nan"))):
        with pytest.raises(ValueError, match="finite and positive"):
            weighted_key_bias(bad, 4, None, torch.float32)
    with pytest.raises(ValueError, match="text_weights must be"):
        connector(text, 300, text_weights=torch.ones(2, 4))


def test_mlp_connector_weighs_its_output_tokens_and_keeps_the_mean():
    connector = tiny_connector(seed=3, variant="mlp").eval()
    text = torch.randn(1, 5, connector.config.input_dim)
    plain = connector(text, 0)
    weights = torch.ones(1, 5)
    weights[0, 1] = 2.0
    out = connector(text, 0, text_weights=weights)
    ratio = out / plain
    assert torch.allclose(ratio[0, 1], 2 * ratio[0, 0], rtol=1e-4)
    assert torch.allclose(out.mean(), plain.mean(), atol=1e-6)


# ---------------------------------------------------------------------------------------- weights: text + pipe


def test_token_weights_follow_the_character_spans_and_leave_the_ids_alone(pipe):
    text = "a red cat sitting on a blue chair"
    start = text.index("blue")
    plain = tokenize(pipe.llm_tokenizer, [text], max_length=16)
    tokens = tokenize(pipe.llm_tokenizer, [text], max_length=16, weights=[[(start, start + 4, 1.5)]])
    assert torch.equal(tokens.input_ids, plain.input_ids)
    blue = pipe.llm_tokenizer("blue", add_special_tokens=False)["input_ids"]
    hit = [j for j, i in enumerate(tokens.input_ids[0].tolist()) if i in blue]
    assert hit and all(tokens.weights[0, j] == 1.5 for j in hit)
    assert int((tokens.weights != 1).sum()) == len(hit)


def test_weight_one_is_the_same_image_as_no_markup_and_a_weight_changes_it(pipe):
    plain = pipe("a red cat on a blue chair", generator=gen(8), **KW).images
    ones = pipe("a (red:1.0) cat on a (blue:1) chair", generator=gen(8), **KW).images
    assert np.array_equal(plain, ones)
    weighted = pipe("a (red:1.5) cat on a blue chair", generator=gen(8), **KW).images
    assert not np.array_equal(plain, weighted)


def test_the_unet_gets_the_weighted_condition(pipe):
    seen = record(pipe.unet)
    pipe("a (red:1.8) cat on a [blue] chair", generator=gen(2), guidance_scale=1.0, **KW)
    text = "a red cat on a blue chair"
    spans = [[(2, 5, 1.8), (15, 19, 1 / 1.1)]]
    for t, cond in seen:
        assert torch.allclose(cond, reference(pipe, [text], t, spans), atol=1e-5)
        assert not torch.allclose(cond, reference(pipe, [text], t), atol=1e-3)


def test_prompt_weights_off_strips_the_markup_as_before(pipe):
    from ella.prompts import PromptWeightsWarning

    plain = pipe("a red cat on a blue chair", generator=gen(8), **KW).images
    with pytest.warns(PromptWeightsWarning, match="removed the markup"):
        off = pipe("a (red:1.3) cat on a [blue] chair", generator=gen(8), prompt_weights=False, **KW).images
    assert np.array_equal(plain, off)


# ---------------------------------------------------------------------------------------------- prompt editing


def active(prompt: str, steps: int) -> list[str]:
    return prompt_schedule(prompt, steps)


@pytest.mark.parametrize(
    "prompt",
    ["[a red cat:a blue dog:0.5] on a chair", "a [red|green] cat on a [blue:yellow:2] chair"],
)
def test_each_step_gets_the_condition_of_the_prompt_active_then_with_cfg_and_a_batch(pipe, prompt):
    seen = record(pipe.unet)
    other = "a green lamp"
    pipe([prompt, other], negative_prompt=["[blurry:dark:3]", ""], generator=gen(1) + gen(2), **KW)
    assert len(seen) == 5
    for step, (t, cond) in enumerate(seen):
        texts = [active("[blurry:dark:3]", 5)[step], "", active(prompt, 5)[step], other]  # CFG: negatives first
        assert torch.allclose(cond, reference(pipe, texts, t), atol=1e-5), (step, texts)
    assert active(prompt, 5)[0] != active(prompt, 5)[-1]


def test_img2img_counts_the_steps_it_runs(pipe):
    """strength 0.6 of 5 steps runs 3; "[a:b:0.5]" is a for int(0.5 * 3) = 1 step, then b."""
    p = rebuild(pipe, EllaStableDiffusionImg2ImgPipeline)
    seen = record(p.unet)
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    prompt = "[a red cat:a blue dog:0.5]"
    p(prompt, image=init, strength=0.6, generator=gen(4), guidance_scale=1.0, num_inference_steps=5, output_type="np")
    assert len(seen) == 3
    for step, (t, cond) in enumerate(seen):
        assert torch.allclose(cond, reference(p, [active(prompt, 3)[step]], t), atol=1e-5)
    assert active(prompt, 3) == ["a red cat", "a blue dog", "a blue dog"]


def test_controlnet_follows_the_edited_prompt_with_the_unet(pipe):
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    p = rebuild(pipe, EllaStableDiffusionControlNetPipeline, controlnet=controlnet)
    to_unet, to_controlnet = record(p.unet), record(p.controlnet)
    control = Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8))
    prompt = "a [red|blue] cat"
    p(prompt, image=control, generator=gen(6), **KW)
    for step, ((t_c, cond_c), (_, cond_u)) in enumerate(zip(to_controlnet, to_unet)):
        assert torch.equal(cond_c, cond_u)
        assert torch.allclose(cond_c, reference(p, ["", active(prompt, 5)[step]], t_c), atol=1e-5)


def test_one_connector_call_per_generation_with_editing(pipe):
    calls = []
    pipe.connector.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    pipe("a [red|green|blue] cat", generator=gen(3), **KW)
    assert len(calls) == 1 and calls[0] == 5 * 2  # 5 timesteps x 2 slots (prompt, negative)


def test_plan_without_editing_is_the_identity_table():
    plan = plan_prompts(["a cat", "a dog", "a cat", ""], None)
    assert plan.slot_of == [0, 1, 0, 2] and plan.llm_texts == ["a cat", "a dog", ""] and plan.schedule is None
    edited = plan_prompts(["[a cat:a dog:0.5]", ""], None)
    assert edited.llm_texts == ["a cat", "a dog", ""]
    assert edited.schedule(4).llm.tolist() == [[0, 0, 1, 1], [2, 2, 2, 2]]


# ------------------------------------------------------------------------------------------------ long prompts


def long_prompt(words: int = 300) -> str:
    vocab = ["a", "red", "cat", "sitting", "on", "a", "blue", "chair", "next", "to", "a", "green", "lamp"]
    return " ".join(vocab[i % len(vocab)] for i in range(words))


def test_truncation_warning_names_the_dropped_words(pipe):
    text = long_prompt(140) + " zebra"
    with pytest.warns(PromptTruncatedWarning, match="zebra|<unk>") as caught:
        encode_text(pipe.llm, pipe.llm_tokenizer, [text], max_length=128)
    assert "max_length=128" in str(caught[0].message)


def test_max_length_none_keeps_a_300_token_prompt_whole_end_to_end(pipe):
    text = long_prompt(300)
    n = len(pipe.llm_tokenizer(text)["input_ids"])
    assert n > 300
    pipe.register_to_config(llm_max_length=None)
    seen = record(pipe.unet)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        image = pipe(text, generator=gen(5), guidance_scale=1.0, **KW).images
    assert np.isfinite(image).all()
    feats = encode_text(pipe.llm, pipe.llm_tokenizer, [text], max_length=None)
    assert feats.hidden_states.shape[1] == n and feats.attention_mask is not None
    for t, cond in seen:
        assert torch.allclose(
            cond, pipe.connector(feats.hidden_states, t, attention_mask=feats.attention_mask), atol=1e-5
        )


def test_bad_prompt_options_are_refused_in_one_line(pipe):
    with pytest.raises(EllaError, match="condition_mode='ella\\+clip'"):
        pipe("a cat", clip_prompt="a cat, tag", **KW)
    with pytest.raises(EllaError, match="prompt_weights must be True or False"):
        pipe("a cat", prompt_weights="yes", **KW)


# ---------------------------------------------------------------------------------- ella+clip: CLIP's own prompt


@pytest.fixture()
def clip_pipe(pipe, tiny_sd):
    from ella.pipelines import EllaStableDiffusionPipeline

    return rebuild(pipe, EllaStableDiffusionPipeline, clip_dir=tiny_sd, condition_mode="ella+clip")


def test_clip_prompt_goes_to_clip_and_the_prompt_to_the_llm(clip_pipe):
    seen = record(clip_pipe.unet)
    prompt, tags = "a red cat sitting on a chair", "green lamp, blue chair"
    clip_pipe(prompt, clip_prompt=tags, negative_clip_prompt="blurry", generator=gen(1), **KW)
    clip = clip_pipe.clip_embeds(["blurry", tags], "cpu")  # CFG: negative first
    for t, cond in seen:
        assert torch.allclose(cond[:, :77], clip, atol=1e-6)
        assert torch.allclose(cond[:, 77:], reference(clip_pipe, ["", prompt], t), atol=1e-5)


def test_a_long_clip_prompt_is_read_in_75_token_windows_not_cut(clip_pipe):
    seen = record(clip_pipe.unet)
    tags = long_prompt(200)  # 200 words the tiny CLIP knows: 3 windows
    clip_pipe("a red cat", clip_prompt=tags, generator=gen(1), guidance_scale=1.0, **KW)
    n = len(clip_pipe.tokenizer(tags, add_special_tokens=False)["input_ids"])
    windows = -(-n // 75)
    assert windows >= 3
    for _, cond in seen:
        assert cond.shape[1] == 77 * windows + clip_pipe.connector.config.num_latents
        assert torch.allclose(cond[:, : 77 * windows], clip_pipe.clip_embeds([tags], "cpu"), atol=1e-6)


def test_prompt_editing_in_the_clip_prompt_follows_the_steps(clip_pipe):
    seen = record(clip_pipe.unet)
    tags = "[red cat:blue chair:0.5]"
    clip_pipe("a cat", clip_prompt=tags, generator=gen(1), guidance_scale=1.0, **KW)
    for step, (_, cond) in enumerate(seen):
        assert torch.allclose(cond[:, :77], clip_pipe.clip_embeds([active(tags, 5)[step]], "cpu"), atol=1e-6)


def test_generate_records_the_clip_prompt_and_refuses_it_without_ella_clip(
    run_cli, tiny_sd, tiny_ella_file, tiny_t5, tmp_path
):
    import json

    from conftest import assert_refused

    models = ["--base", str(tiny_sd), "--ella", str(tiny_ella_file), "--llm", str(tiny_t5), "--device", "cpu"]
    small = ["--steps", "2", "--width", "64", "--height", "64"]
    code, _, err = run_cli("generate", "a cat", "--clip-prompt", "tags", "--out", str(tmp_path / "a"), *models)
    assert_refused(code, err, "--clip-prompt", "--mode ella+clip")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    out = tmp_path / "b"
    flags = ["--mode", "ella+clip", "--clip-prompt", "green lamp", "--negative-clip-prompt", "blurry"]
    code, _, err = run_cli(
        "generate", "a (red:1.4) cat", *flags, "--no-prompt-weights", "--out", str(out), *models, *small
    )
    assert code == 0, err
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["clip_prompt"] == "green lamp" and sidecar["negative_clip_prompt"] == "blurry"
    assert sidecar["prompt_weights"] is False and sidecar["prompt"] == "a (red:1.4) cat"
    code, _, err = run_cli(
        "generate", long_prompt(200), "--max-length", "none", "--out", str(tmp_path / "d"), *models, *small
    )
    assert code == 0, err
    assert json.loads(next((tmp_path / "d").glob("*.json")).read_text())["llm_max_length"] is None
    with pytest.raises(SystemExit) as refused:  # argparse's own refusal: usage + one error line
        run_cli("generate", "a cat", "--max-length", "0", "--out", str(tmp_path / "c"), *models)
    assert refused.value.code == 2
