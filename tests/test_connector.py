"""The connector against an independent functional reference, the release's key layout, and its I/O."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_connector
from ella import TimestepAwareSemanticConnector
from ella.connector import CheckpointMismatchError

# ------------------------------------------------------------------------------------- reference


def ref_sinusoid(t: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """cos half first, frequency shift 0, max period 10000 — written out from the formula.

    The release computes it in fp32 whatever the model's dtype, so the reference does too.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype) / half)
    angles = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).double()


def ref_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, heads: int, mask: torch.Tensor | None = None):
    """The released TSC from its state dict with plain tensor algebra (no nn modules), in fp64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    lin = lambda h, name: h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
    silu = lambda h: h * torch.sigmoid(h)
    T = lin(
        silu(lin(ref_sinusoid(t, sd["time_embedding.linear_1.weight"].shape[1]), "time_embedding.linear_1")),
        "time_embedding.linear_2",
    )  # [B, D_t]

    def adaln(h, name):
        shift, scale = lin(silu(T), name).unsqueeze(1).chunk(2, dim=-1)
        mu = h.mean(-1, keepdim=True)
        var = h.var(-1, keepdim=True, unbiased=False)
        return (h - mu) / torch.sqrt(var + 1e-6) * (1 + scale) + shift

    B = x.shape[0]
    latents = sd["connector.latents"][None].repeat(B, 1, 1) + lin(silu(T), "connector.time_aware_linear")[:, None]
    text = lin(x, "connector.proj_in")
    width = latents.shape[-1]
    hd = width // heads
    i = 0
    while f"connector.perceiver_blocks.{i}.attn.in_proj_weight" in sd:
        p = f"connector.perceiver_blocks.{i}."
        q_in = adaln(latents, p + "ln_1.linear")
        kv_in = torch.cat([q_in, adaln(text, p + "ln_2.linear")], dim=1)
        w, b = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
        q = q_in @ w[:width].T + b[:width]
        k = kv_in @ w[width : 2 * width].T + b[width : 2 * width]
        v = kv_in @ w[2 * width :].T + b[2 * width :]
        split = lambda h: h.view(B, -1, heads, hd).transpose(1, 2)
        logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd)
        if mask is not None:
            keep = torch.cat([torch.ones(B, latents.shape[1]), mask.double()], dim=1).bool()
            logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
        attn = (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, -1, width)
        latents = latents + lin(attn, p + "attn.out_proj")
        h = lin(adaln(latents, p + "ln_ff.linear"), p + "mlp.c_fc")
        latents = latents + lin(torch.relu(h) ** 2, p + "mlp.c_proj")
        i += 1
    return latents


# ------------------------------------------------------------------------------------------ tests


def released_keys(layers: int = 6) -> list[str]:
    keys = [f"time_embedding.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
    keys += [
        "connector.latents",
        "connector.time_aware_linear.weight",
        "connector.time_aware_linear.bias",
        "connector.proj_in.weight",
        "connector.proj_in.bias",
    ]
    block = [
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ]
    block += [f"{ln}.linear.{p}" for ln in ("ln_1", "ln_2", "ln_ff") for p in ("weight", "bias")]
    keys += [f"connector.perceiver_blocks.{i}.{k}" for i in range(layers) for k in block]
    return keys


def test_default_config_is_the_release_layout():
    model = TimestepAwareSemanticConnector()
    sd = model.state_dict()
    assert sorted(sd) == sorted(released_keys())
    assert len(sd) == 93
    assert sum(v.numel() for v in sd.values()) == 66_820_608
    assert sd["connector.proj_in.weight"].shape == (768, 2048)
    assert sd["connector.perceiver_blocks.0.attn.in_proj_weight"].shape == (3 * 768, 768)
    assert sd["connector.perceiver_blocks.3.ln_ff.linear.weight"].shape == (2 * 768, 768)
    assert sd["time_embedding.linear_1.weight"].shape == (768, 320)
    # AdaLN projections start at zero (release init), so a fresh TSC is a plain-LayerNorm resampler
    assert not sd["connector.perceiver_blocks.5.ln_2.linear.weight"].any()


@pytest.mark.parametrize("timesteps", [torch.tensor(981), torch.tensor([3, 999, 500]), 250, 17.5, [1.0, 2.0, 3.0]])
def test_matches_independent_reference(timesteps):
    torch.manual_seed(0)
    model = tiny_connector(seed=3).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).expand(3)
    out = model(x, timesteps)
    ref = ref_forward(model.state_dict(), x, t, heads=4)
    assert out.shape == (3, 8, 32)
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-9), (out - ref).abs().max()


def test_timestep_matters_and_is_cast_like_the_release():
    model = tiny_connector(seed=4)
    x = torch.randn(2, 5, 16)
    assert not torch.allclose(model(x, 10), model(x, 900))
    # fp32 sinusoid cast to the input dtype: fp64 input gets the fp32-rounded features, as released
    emb = model.time_proj(torch.tensor([999]))
    assert emb.dtype == torch.float32
    assert torch.allclose(emb.double(), ref_sinusoid(torch.tensor([999]), 32), atol=1e-6)
    assert torch.allclose(emb.double(), ref_sinusoid(torch.tensor([999]), 32, torch.float64), atol=1e-3)


def test_mask_equals_per_prompt_runs():
    """The release runs flexible-length prompts one by one; one masked, padded batch must agree."""
    torch.manual_seed(1)
    model = tiny_connector(seed=5)
    lengths = [5, 9, 2]
    prompts = [torch.randn(1, n, 16) for n in lengths]
    batch = torch.randn(3, 9, 16) * 100  # garbage in the pad positions must not leak in
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        batch[i, :n] = p[0]
        mask[i, :n] = 1
    t = torch.tensor([999, 500, 1])
    batched = model(batch, t, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model(p, t[i])
        assert torch.allclose(batched[i], alone[0], atol=1e-5), (batched[i] - alone[0]).abs().max()
    ref = ref_forward(model.state_dict(), batch, t, heads=4, mask=mask)
    assert torch.allclose(batched.double(), ref, atol=1e-5)


def test_single_file_roundtrip_reads_config_from_shapes(tmp_path):
    from safetensors.torch import save_file

    model = tiny_connector(seed=6)
    path = tmp_path / "c.safetensors"
    save_file(dict(model.state_dict()), str(path))  # like the release: tensors only, no config metadata
    loaded = TimestepAwareSemanticConnector.from_single_file(path, heads=4)
    for key in ("width", "layers", "num_latents", "input_dim", "time_channel", "time_embed_dim"):
        assert loaded.config[key] == model.config[key]
    assert loaded.config.text_feature_dtype == "float16"  # release weights saw fp16 T5 features
    x = torch.randn(2, 4, 16)
    assert torch.equal(loaded(x, 321), model(x, 321))


def test_single_file_carries_our_config_for_every_variant(tmp_path):
    """Files we write restore non-default variants, head counts and the SDXL pooling head from one file."""
    x = torch.randn(2, 6, 16)
    for variant in ("tsc_adaln_zero", "resampler", "mlp"):
        model = tiny_connector(seed=8, variant=variant, heads=2, pooled_dim=12)
        model.save_single_file(tmp_path / f"{variant}.safetensors")
        loaded = TimestepAwareSemanticConnector.from_single_file(tmp_path / f"{variant}.safetensors")
        assert (loaded.config.variant, loaded.config.heads, loaded.config.pooled_dim) == (variant, 2, 12)
        out = model(x, 40)
        assert torch.equal(loaded(x, 40), out)
        assert torch.equal(loaded.pool(out), model.pool(out))
        assert model.pool(out).shape == (2, 12)


def test_pooled_dim_is_read_from_release_style_files(tmp_path):
    from safetensors.torch import save_file

    model = tiny_connector(seed=9, pooled_dim=20)
    save_file(dict(model.state_dict()), str(tmp_path / "c.safetensors"))
    loaded = TimestepAwareSemanticConnector.from_single_file(tmp_path / "c.safetensors", heads=4)
    assert loaded.config.pooled_dim == 20
    with pytest.raises(ValueError, match="no pooling head"):
        tiny_connector().pool(torch.randn(1, 8, 32))


def test_save_pretrained_roundtrip_every_variant(tmp_path):
    x = torch.randn(2, 6, 16)
    for variant in ("tsc", "tsc_adaln_zero", "resampler", "mlp"):
        model = tiny_connector(seed=7, variant=variant)
        model.save_pretrained(tmp_path / variant)
        loaded = TimestepAwareSemanticConnector.from_pretrained(tmp_path / variant)
        assert loaded.config.variant == variant
        assert torch.equal(loaded(x, 40), model(x, 40))


def test_wrong_checkpoint_lists_every_mismatch(tmp_path):
    model = tiny_connector(seed=8)
    sd = model.state_dict()
    sd["connector.perceiver_blocks.1.mlp.c_fc.weight"] = torch.zeros(5, 5)
    del sd["connector.perceiver_blocks.0.attn.out_proj.bias"]
    sd["connector.proj_out.weight"] = torch.zeros(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        model.load_checked_state_dict(sd, source="bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "1 missing: connector.perceiver_blocks.0.attn.out_proj.bias" in msg
    assert "1 unexpected: connector.proj_out.weight" in msg
    assert "connector.perceiver_blocks.1.mlp.c_fc.weight: (5, 5) in bad.safetensors, (128, 32) in model" in msg
    # nothing was half-loaded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_checkpoint_of_another_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(CheckpointMismatchError, match="not an ELLA TSC checkpoint: tensor 'connector.proj_in.weight'"):
        TimestepAwareSemanticConnector.from_single_file(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointMismatchError, match="not a readable safetensors file"):
        TimestepAwareSemanticConnector.from_single_file(tmp_path / "junk.safetensors")


def test_variants_behave_as_their_names_say():
    x = torch.randn(2, 6, 16)
    # Resampler ablation: no timestep input at all
    resampler = tiny_connector(seed=9, variant="resampler")
    assert "time_embedding.linear_1.weight" not in resampler.state_dict()
    assert torch.equal(resampler(x, 1), resampler(x, 999))
    # AdaLN-Zero: residual gates start at zero, so every block is the identity at init
    zero = TimestepAwareSemanticConnector(
        width=32,
        layers=2,
        heads=4,
        num_latents=8,
        input_dim=16,
        time_channel=32,
        time_embed_dim=24,
        variant="tsc_adaln_zero",
    )
    T = zero.embed_timesteps(500, 2, torch.float32)
    start = zero.connector.latents + zero.connector.time_aware_linear(torch.nn.functional.silu(T))[:, None]
    assert torch.allclose(zero(x, 500), start, atol=1e-6)
    # MLP: one output token per text token, no timestep
    mlp = tiny_connector(seed=10, variant="mlp")
    assert mlp(x, 3).shape == (2, 6, 32) and mlp.output_follows_text


def test_bad_inputs_have_clear_errors():
    model = tiny_connector()
    with pytest.raises(ValueError, match=r"text_features must be \[batch, tokens, 16\]; got \(2, 5, 8\)"):
        model(torch.randn(2, 5, 8), 1)
    with pytest.raises(ValueError, match="got 3 timesteps for a batch of 2"):
        model(torch.randn(2, 5, 16), [1, 2, 3])
    with pytest.raises(ValueError, match="timestep-aware"):
        model(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.randn(2, 5, 16), 1, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="unknown connector variant 'perceiver'"):
        TimestepAwareSemanticConnector(variant="perceiver")
