"""The condition feed, judged by what the UNet and ControlNet receive.

At every call that carries placeholder embeds, the module must receive ``connector(llm(text), t)``
for that call's timestep ``t`` and each sample's text; every other call passes through untouched;
nothing stays hooked after a generation, also one that raised; and diffusers' model CPU offload
(accelerate hooks on the same modules) gives the same images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image
from torch import nn

from conftest import UNET_DIM, rebuild, tiny_connector
from ella.conditioning import ConditionFeed, ConditionTable, placeholder_embeds
from ella.errors import EllaError
from ella.pipelines import (
    EllaStableDiffusionControlNetPipeline,
    EllaStableDiffusionImg2ImgPipeline,
)
from ella.text import TextFeatures, encode_text

PROMPT = "a red cat sitting on a blue chair next to a green lamp"
KW = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}


def gen(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def record(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(timestep, encoder_hidden_states) of every call, as the module's forward received them."""
    seen = []
    module.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[1].clone(), kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True,
    )
    return seen


def reference(pipe, texts: list[str], t) -> torch.Tensor:
    """The condition recomputed from scratch: the LLM on ``texts`` (one per sample), the connector at ``t``."""
    feats = encode_text(pipe.llm, pipe.llm_tokenizer, texts, max_length=128).hidden_states
    return pipe.connector(feats, t)


def random_image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8))


@pytest.fixture()
def controlnet_pipe(pipe):
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    with torch.no_grad():  # its zero-initialised output convs would make it a no-op
        for name, p in controlnet.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                p.normal_(0, 0.1)
    return rebuild(pipe, EllaStableDiffusionControlNetPipeline, controlnet=controlnet)


# ------------------------------------------------------------------------------------- the feed alone


class Recorder(nn.Module):
    """Stands in for a UNet: keeps what each call received, after the feed's pre-hook."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, encoder_attention_mask=None):
        self.calls.append((timestep, encoder_hidden_states, added_cond_kwargs, encoder_attention_mask))
        return sample


def tiny_table(connector, schedule, mask=None, pooled=False) -> tuple[torch.Tensor, ConditionTable]:
    torch.manual_seed(0)
    feats = TextFeatures(torch.randn(3, 6, 16), mask)
    return feats.hidden_states, ConditionTable(connector, feats, timesteps=lambda: schedule, pooled=pooled)


def refuse_host_reads(monkeypatch) -> None:
    """From here on, reading a tensor's value on the host (what waits for a GPU) raises."""

    def refuse(*_):
        raise AssertionError("the feed read a tensor's value on the host")

    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_each_call_gets_its_timesteps_condition_without_a_host_sync(monkeypatch):
    connector = tiny_connector(seed=1)
    schedule = torch.tensor([999.0, 666.0, 333.0])
    states, table = tiny_table(connector, schedule)
    rows = torch.tensor([2, 2, 0, 0])  # CFG: negatives then positives, two images per prompt
    placeholder = placeholder_embeds(rows, "cpu")
    unet = Recorder()
    table.precompute()  # once per generation: reads the schedule (one sync)
    with ConditionFeed(lambda: table).install([unet, None]):
        refuse_host_reads(monkeypatch)
        for t in schedule:  # as the diffusers loop: by keyword, and positionally
            unet(torch.zeros(4), t, encoder_hidden_states=placeholder)
            unet(torch.zeros(4), t, placeholder)
        unet(torch.zeros(4), schedule[1].expand(4), placeholder)  # a loop that expands t to the batch
        monkeypatch.undo()
    for (t, cond, _, mask), expected_t in zip(unet.calls, [*np.repeat(schedule.numpy(), 2), 666.0]):
        assert float(t.reshape(-1)[0]) == expected_t and mask is None
        assert torch.allclose(cond, connector(states[rows], expected_t), atol=1e-5)


def test_per_sample_timesteps_and_off_schedule_timesteps_get_their_own_condition():
    connector = tiny_connector(seed=1)
    states, table = tiny_table(connector, torch.tensor([999.0, 500.0]))
    rows = torch.tensor([0, 1, 2])
    unet = Recorder()
    per_sample = torch.tensor([999.0, 123.5, 500.0])  # one sample off the schedule
    with ConditionFeed(lambda: table).install([unet]):
        unet(torch.zeros(3), per_sample, placeholder_embeds(rows, "cpu"))
        unet(torch.zeros(3), 77.25, placeholder_embeds(rows, "cpu"))  # a custom loop's own number
        with pytest.raises(EllaError, match="2 timesteps for 3 samples"):
            unet(torch.zeros(3), per_sample[:2], placeholder_embeds(rows, "cpu"))
    expected = torch.cat([connector(states[rows[i : i + 1]], float(t)) for i, t in enumerate(per_sample)])
    assert torch.allclose(unet.calls[0][1], expected, atol=1e-5)
    assert torch.allclose(unet.calls[1][1], connector(states[rows], 77.25), atol=1e-5)


def test_pooled_embedding_and_mlp_mask_are_fed_beside_the_tokens():
    connector = tiny_connector(seed=3, variant="mlp", pooled_dim=5)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]])
    schedule = torch.tensor([900.0, 100.0])
    states, table = tiny_table(connector, schedule, mask=mask, pooled=True)
    rows = torch.tensor([2, 1])
    time_ids = torch.ones(2, 6)
    added = {"text_embeds": placeholder_embeds(rows, "cpu").view(-1, 1).expand(-1, 5), "time_ids": time_ids}
    unet = Recorder()
    with ConditionFeed(lambda: table).install([unet]):
        unet(torch.zeros(2), schedule[1], placeholder_embeds(rows, "cpu"), added_cond_kwargs=added)
    _, cond, got_added, got_mask = unet.calls[0]
    tokens = connector(states[rows], 100.0, attention_mask=mask[rows])
    assert torch.allclose(cond, tokens, atol=1e-5)
    assert torch.allclose(got_added["text_embeds"], connector.pool(tokens, mask[rows]), atol=1e-5)
    assert got_added["time_ids"] is time_ids
    assert torch.equal(got_mask, mask[rows])


def test_other_calls_pass_untouched_and_remove_unhooks_also_after_an_error():
    connector = tiny_connector(seed=1)
    _, table = tiny_table(connector, torch.tensor([10.0]))
    unet, real = Recorder(), torch.randn(2, 77, UNET_DIM)
    placeholder = placeholder_embeds(torch.tensor([0, 1]), "cpu")
    current = None
    feed = ConditionFeed(lambda: current)
    with pytest.raises(RuntimeError, match="boom"), feed.install([unet]):
        unet(torch.zeros(2), 10.0, encoder_hidden_states=real)  # real embeds: not ours
        unet(torch.zeros(2), 10.0, encoder_hidden_states=placeholder)  # no table yet (before encode_prompt)
        current = table
        unet(torch.zeros(2), 10.0, encoder_hidden_states=real)
        raise RuntimeError("boom")
    assert [c[1] is given for c, given in zip(unet.calls, [real, placeholder, real])] == [True] * 3  # untouched
    assert not unet._forward_pre_hooks
    unet(torch.zeros(2), 10.0, encoder_hidden_states=placeholder)
    assert unet.calls[-1][1] is placeholder
    feed.remove()  # idempotent


# ----------------------------------------------------------------------------------- through pipelines


@pytest.mark.parametrize("guess_mode", [False, True])
def test_unet_and_controlnet_get_each_samples_condition_with_cfg_and_repeats(controlnet_pipe, guess_mode):
    p = controlnet_pipe
    to_unet, to_controlnet = record(p.unet), record(p.controlnet)
    prompts, negatives = ["a red cat", PROMPT], ["blurry", ""]
    p(
        prompts,
        negative_prompt=negatives,
        image=random_image(0),
        num_images_per_prompt=2,
        guess_mode=guess_mode,
        generator=gen(1, 2, 3, 4),
        **KW,
    )
    positives = [text for text in prompts for _ in range(2)]
    samples = [text for text in negatives for _ in range(2)] + positives  # the loop's CFG batch order
    assert [float(t) for t, _ in to_unet] == [float(t) for t in p.scheduler.timesteps]
    assert len(to_controlnet) == len(to_unet) == 3
    for (t, cond), (t_c, cond_c) in zip(to_unet, to_controlnet):
        assert float(t_c) == float(t)
        assert torch.allclose(cond, reference(p, samples, t), atol=1e-5)
        assert torch.equal(cond_c, cond[4:] if guess_mode else cond)  # guess mode: the positive half only
    assert not p.unet._forward_pre_hooks and not p.controlnet._forward_pre_hooks


def test_img2img_partial_schedule_with_cfg(pipe):
    p = rebuild(pipe, EllaStableDiffusionImg2ImgPipeline)
    seen = record(p.unet)
    p(
        PROMPT,
        negative_prompt="dark",
        image=random_image(1),
        strength=0.5,
        num_images_per_prompt=2,
        generator=gen(5, 6),
        num_inference_steps=4,
        output_type="np",
    )
    assert [float(t) for t, _ in seen] == [float(t) for t in p.scheduler.timesteps[2:]]
    for t, cond in seen:
        assert torch.allclose(cond, reference(p, ["dark", "dark", PROMPT, PROMPT], t), atol=1e-5)


def test_a_callers_own_unet_calls_during_a_generation(pipe):
    """Inside the loop, a custom caller's placeholder call at an off-schedule timestep gets that timestep's
    condition, and a call with real embeds is left exactly as it would be without ELLA."""
    real = torch.randn(2, 77, UNET_DIM, generator=torch.Generator().manual_seed(0))
    probes = {}

    def probe(p, i, t, kw):
        if i == 1:
            latents = torch.cat([kw["latents"]] * 2)
            probes["latents"] = latents
            probes["placeholder"] = p.unet(latents, torch.tensor(123.5), kw["prompt_embeds"]).sample
            probes["real"] = p.unet(latents, t, encoder_hidden_states=real).sample
            probes["t"] = t
        return {}

    pipe(
        PROMPT,
        generator=gen(2),
        callback_on_step_end=probe,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        **KW,
    )
    latents, t = probes["latents"], probes["t"]
    assert torch.equal(probes["real"], pipe.unet(latents, t, encoder_hidden_states=real).sample)
    expected = pipe.unet(latents, 123.5, encoder_hidden_states=reference(pipe, ["", PROMPT], 123.5)).sample
    assert torch.allclose(probes["placeholder"], expected, atol=1e-5)


def test_nothing_stays_hooked_when_a_generation_raises(pipe):
    before = pipe(PROMPT, generator=gen(3), **KW).images

    def fail(p, i, t, kw):
        raise RuntimeError("stopped by the user")

    with pytest.raises(RuntimeError, match="stopped by the user"):
        pipe(PROMPT, generator=gen(3), callback_on_step_end=fail, **KW)
    assert not pipe.unet._forward_pre_hooks and pipe._ella_table is None
    assert np.array_equal(pipe(PROMPT, generator=gen(3), **KW).images, before)


# --------------------------------------------------------------------------------------- CPU offload


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
@pytest.mark.parametrize("variant", ["tsc", "mlp"])
def test_model_cpu_offload_gives_the_same_images(controlnet_pipe, device, variant):
    """diffusers' model offload puts accelerate hooks on the UNet, ControlNet, connector and LLM. Our
    pre-hook runs first (before ``forward``, which accelerate wraps), so accelerate's hook sees the
    condition, not the placeholder, and moves it like any other input. ``device="cpu"`` runs the
    same hooks on a machine without an accelerator. The MLP variant, in flexible mode with prompts of
    two lengths, adds the text mask (UNet only: diffusers' ControlNet takes none)."""
    p = controlnet_pipe
    if variant == "mlp":
        p.connector = tiny_connector(seed=12, variant="mlp")
        p.register_to_config(llm_flexible=True)
    prompts = ["a cat", PROMPT]
    call = dict(negative_prompt="blurry", image=random_image(4), **KW)
    plain = p.to(device)(prompts, generator=gen(7, 8), **call).images
    p.enable_model_cpu_offload(device=device)
    try:
        for name in ("unet", "controlnet", "connector", "llm"):
            assert hasattr(getattr(p, name), "_hf_hook"), name
        offload_saw = []
        unet_hook = p.unet._hf_hook
        pre_forward = unet_hook.pre_forward
        unet_hook.pre_forward = lambda module, *args, **kwargs: (
            offload_saw.append(kwargs["encoder_hidden_states"].shape),
            pre_forward(module, *args, **kwargs),
        )[1]
        offloaded = p(prompts, generator=gen(7, 8), **call).images
    finally:
        p.remove_all_hooks()
    longest = encode_text(p.llm, p.llm_tokenizer, [PROMPT], flexible=True).hidden_states.shape[1]
    tokens = 8 if variant == "tsc" else longest  # the MLP connector keeps the (padded) text length
    assert offload_saw == [(4, tokens, UNET_DIM)] * 3
    assert np.abs(offloaded - plain).max() <= (0 if device == "cpu" else 1e-6)
    assert not p.unet._forward_pre_hooks and not p.controlnet._forward_pre_hooks
