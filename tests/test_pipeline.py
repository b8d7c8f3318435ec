"""EllaStableDiffusionPipeline end to end on tiny models, against the release's per-step wrapper."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from conftest import plain_of
from ella import EllaStableDiffusionPipeline
from ella.errors import EllaError
from ella.schedulers import make_scheduler
from ella.text import encode_text

PROMPT = "a red cat sitting on a blue chair next to a green lamp"
KW = dict(num_inference_steps=5, height=64, width=64, output_type="np")


def gen(seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed)]


class OfficialProxyUNet(torch.nn.Module):
    """The release's ELLAProxyUNet, re-implemented: the connector recomputed at every UNet call.

    ``lengths`` reproduces its flexible mode: each row sliced to its own length, run alone.
    """

    def __init__(self, connector, unet, lengths=None):
        super().__init__()
        self.connector, self.unet, self.config, self.lengths = connector, unet, unet.config, lengths

    dtype = property(lambda self: self.unet.dtype)
    device = property(lambda self: self.unet.device)

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        if self.lengths is None:
            cond = self.connector(encoder_hidden_states, timestep)
        else:
            cond = torch.cat(
                [self.connector(encoder_hidden_states[i : i + 1, :n], timestep) for i, n in enumerate(self.lengths)]
            )
        return self.unet(sample, timestep, encoder_hidden_states=cond, **kwargs)


def official_pipe(pipe, lengths=None) -> StableDiffusionPipeline:
    official = plain_of(pipe)
    official.unet = OfficialProxyUNet(pipe.connector, pipe.unet, lengths)
    return official


def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    return calls


def test_unet_stays_a_real_unet(pipe):
    assert type(pipe.unet) is UNet2DConditionModel
    assert pipe.text_encoder is None and pipe.llm is not None


def test_fixed_mode_equals_official_per_step_recompute(pipe):
    calls = count_calls(pipe.connector)
    ours = pipe(PROMPT, generator=gen(7), guidance_scale=7.0, **KW).images
    assert len(calls) == 1, "the connector must run once, batched over all timesteps"
    assert calls[0][0] == 5 * 2  # 5 timesteps x (positive, negative)

    feats = encode_text(pipe.llm, pipe.llm_tokenizer, [PROMPT, ""], max_length=128).hidden_states
    ref = official_pipe(pipe)(
        prompt_embeds=feats[:1], negative_prompt_embeds=feats[1:], generator=gen(7), guidance_scale=7.0, **KW
    ).images
    assert np.abs(ours - ref).max() <= 1e-5


def test_each_unet_call_gets_its_own_timesteps_condition(pipe):
    seen = []
    pipe.unet.register_forward_hook(  # a forward hook sees the kwargs after every pre-hook ran
        lambda m, args, kwargs, out: seen.append((args[1].clone(), kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True,
    )
    pipe(PROMPT, negative_prompt="blurry", generator=gen(1), **KW)
    feats = encode_text(pipe.llm, pipe.llm_tokenizer, ["blurry", PROMPT], max_length=128).hidden_states
    assert len(seen) == 5
    for t, cond in seen:
        ref = pipe.connector(feats, t)  # [negative, positive], recomputed for this step
        assert cond.shape == (2, 8, 32)
        assert torch.allclose(cond, ref, atol=1e-5)
    assert not torch.allclose(seen[0][1], seen[-1][1])  # the condition really changes with t


def test_flexible_mode_equals_official_per_prompt_loop(pipe):
    pipe.register_to_config(llm_flexible=True)
    ours = pipe(PROMPT, generator=gen(3), **KW).images
    pos = encode_text(pipe.llm, pipe.llm_tokenizer, [PROMPT], flexible=True).hidden_states
    neg = encode_text(pipe.llm, pipe.llm_tokenizer, [""], flexible=True).hidden_states
    n = pos.shape[1]
    neg_padded = torch.nn.functional.pad(neg, (0, 0, 0, n - neg.shape[1]))  # the release zero-pads
    ref = official_pipe(pipe, lengths=[neg.shape[1], n])(
        prompt_embeds=pos, negative_prompt_embeds=neg_padded, generator=gen(3), **KW
    ).images
    assert np.abs(ours - ref).max() <= 1e-5


def test_batch_rows_follow_their_prompts(pipe):
    """Each image of a batch equals that prompt generated alone with the same generator."""
    prompts = ["a red cat", "a green lamp on a table"]
    gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13, 14)]
    batch = pipe(prompts, negative_prompt=["blurry", "dark"], num_images_per_prompt=2, generator=gens, **KW).images
    assert batch.shape == (4, 64, 64, 3)
    alone = pipe(prompts[1], negative_prompt="dark", generator=[torch.Generator().manual_seed(14)], **KW).images
    assert np.abs(batch[3] - alone[0]).max() <= 1e-5
    assert np.abs(batch[0] - batch[3]).max() > 1e-3


def test_same_seed_same_bytes_and_negative_prompt_matters(pipe):
    a = pipe(PROMPT, generator=gen(5), num_inference_steps=3, height=64, width=64).images[0]
    b = pipe(PROMPT, generator=gen(5), num_inference_steps=3, height=64, width=64).images[0]
    assert a.tobytes() == b.tobytes()
    c = pipe(PROMPT, negative_prompt="a dog", generator=gen(5), num_inference_steps=3, height=64, width=64).images[0]
    assert a.tobytes() != c.tobytes()
    no_cfg = pipe(PROMPT, generator=gen(5), guidance_scale=1.0, **KW).images
    assert no_cfg.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "ddim", "lms", "unipc", "dpm++_karras", "pndm"])
def test_any_scheduler(pipe, name):
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    calls = count_calls(pipe.connector)
    out = pipe(PROMPT, generator=gen(2), **KW).images
    assert np.isfinite(out).all()
    assert len(calls) == 1  # every timestep the loop used was in the precomputed table


def test_unknown_scheduler(pipe):
    with pytest.raises(EllaError, match=r"unknown scheduler 'dpm\+\+\+'"):
        make_scheduler("dpm+++", pipe.scheduler.config)


def test_lora_loads_changes_output_and_unloads(pipe, tiny_sd, tmp_path):
    from tiny_models import write_tiny_lora

    write_tiny_lora(tiny_sd, tmp_path)
    before = pipe(PROMPT, generator=gen(9), **KW).images
    pipe.load_lora_weights(tmp_path)
    assert type(pipe.unet) is UNet2DConditionModel
    with_lora = pipe(PROMPT, generator=gen(9), **KW).images
    assert np.abs(with_lora - before).max() > 1e-3
    pipe.unload_lora_weights()
    after = pipe(PROMPT, generator=gen(9), **KW).images
    assert np.abs(after - before).max() <= 1e-6


def test_save_pretrained_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = EllaStableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.llm_max_length == 128 and type(loaded.scheduler) is type(pipe.scheduler)
    a = pipe(PROMPT, generator=gen(4), **KW).images
    b = loaded(PROMPT, generator=gen(4), **KW).images
    assert np.abs(a - b).max() <= 1e-6


def test_feature_dtype_warning(pipe):
    pipe._warned_feature_dtype = False
    with pytest.warns(UserWarning, match="trained on float16 LLM features, but the LLM runs in float32"):
        pipe(PROMPT, num_inference_steps=1, height=64, width=64, output_type="np")


def test_bad_inputs(pipe):
    with pytest.raises(EllaError, match="prompt 1 is empty"):
        pipe(["a cat", "  "], **KW)
    with pytest.raises(ValueError, match="divisible by 8"):
        pipe(PROMPT, num_inference_steps=2, height=60, width=64)
    with pytest.raises(EllaError, match="not CLIP `prompt_embeds`"):
        pipe(prompt_embeds=torch.zeros(1, 77, 32), **KW)
    with pytest.raises(EllaError, match="got 3 negative prompts for 2 prompts"):
        pipe(["a", "b"], negative_prompt=["x", "y", "z"], **KW)
    # the pipeline is still usable after refused calls: nothing half-installed
    assert pipe._ella_table is None
    assert not pipe.unet._forward_pre_hooks


def test_torch_compile_keeps_the_condition_feed(pipe):
    """``unet.compile()`` runs our hook inside the compiled call; it must not recompile per timestep."""
    eager = pipe(PROMPT, generator=gen(6), **KW).images
    pipe.unet.compile()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = pipe(PROMPT, generator=gen(6), **KW).images
            again = pipe(PROMPT, generator=gen(6), **KW).images
    finally:
        torch.compiler.reset()
    assert np.abs(compiled - eager).max() <= 1e-5
    assert np.array_equal(compiled, again)


def tiny_ip_adapter(unet, clip_dim: int = 12, seed: int = 0) -> dict:
    """An IP-Adapter state dict (the layout diffusers' ``load_ip_adapter`` reads) for the tiny UNet."""
    gen_ = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    sd = {
        "image_proj": {
            "proj.weight": torch.randn(4 * cross, clip_dim, generator=gen_) * 0.3,
            "proj.bias": torch.zeros(4 * cross),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        },
        "ip_adapter": {},
    }
    key = 1  # diffusers numbers cross-attention processors 1, 3, 5, ... in attn_processors order
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            for proj in ("to_k", "to_v"):
                shape = getattr(attn, proj).weight.shape
                sd["ip_adapter"][f"{key}.{proj}_ip.weight"] = torch.randn(shape, generator=gen_) * 0.3
            key += 2
    return sd


def test_ip_adapter_image_tokens_pass_beside_ours(pipe):
    plain = pipe(PROMPT, generator=gen(8), **KW).images
    pipe.load_ip_adapter(tiny_ip_adapter(pipe.unet), subfolder=None, weight_name=None, image_encoder_folder=None)
    assert type(pipe.unet) is UNet2DConditionModel
    image_embeds = [torch.cat([torch.zeros(1, 1, 12), torch.randn(1, 1, 12, generator=gen(0)[0])])]  # [neg, pos]
    with_image = pipe(PROMPT, ip_adapter_image_embeds=image_embeds, generator=gen(8), **KW).images
    assert np.abs(with_image - plain).max() > 1e-3
    pipe.set_ip_adapter_scale(0.0)  # image branch off: exactly the ELLA-only image again
    muted = pipe(PROMPT, ip_adapter_image_embeds=image_embeds, generator=gen(8), **KW).images
    assert np.abs(muted - plain).max() <= 1e-5


def test_mlp_variant_masks_padding_in_the_unet(pipe):
    """The MLP connector keeps the text length; in flexible mode the pads must be masked in the UNet."""
    from conftest import tiny_connector

    pipe.connector = tiny_connector(seed=12, variant="mlp")
    pipe.register_to_config(llm_flexible=True)
    prompts = ["a cat", "a red cat sitting on a blue chair next to a green lamp"]
    batch = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **KW).images
    alone = pipe(prompts[0], generator=gen(1), **KW).images  # no padding at all
    assert np.abs(batch[0] - alone[0]).max() <= 1e-5
