"""A quantised LLM (``quantization=`` int8 / fp8 / nf4, weight-only): close to the unquantised features, really
quantised, smaller in memory, and refused in one line — before any weights load — where it can't run.

The features are compared on a 64-wide T5 built here (T5-XL is 2048 wide): every linear layer's width is a
multiple of 32, which bitsandbytes' CPU kernel needs for nf4, and 64-element rows give per-row int8 / fp8
scales a realistic job (the shared 16-wide tiny T5 would make the scale overhead a quarter of the weight).
"""

from __future__ import annotations

import sys

import pytest
import torch
import transformers

from ella import load_pipeline
from ella.errors import EllaError, MissingExtraError
from ella.llm import check_quantization, load_llm, weight_bytes
from ella.text import encode_text
from tiny_models import build_tiny_t5_tokenizer

PROMPTS = [
    "a red cat sitting on a blue chair",
    "a green lamp",
    "two yellow triangles next to a large square",
    "a small blue circle above three red squares",
]

# Lowest per-token cosine similarity to the fp32 features over PROMPTS, with the 1 - cos measured on this
# seeded model (torch 2.13, torchao 0.18, bitsandbytes 0.50): int8 1.3e-4, fp8 1.8e-3, nf4 3.3e-2. Each bound
# allows 1 - cos 3-8x the measured one: weights, prompts and rounding are deterministic, so the margin is for
# other CPUs' kernels, not for chance. The ordering is the formats' resolution: int8 rounds each weight to
# 1/254 of its row's range, e4m3 keeps 3 mantissa bits (relative error up to 1/16), nf4 has 16 levels.
BOUNDS = {"int8": 0.999, "fp8": 0.99, "nf4": 0.9}
QUANTISED_TYPES = {"int8": "Int8Tensor", "fp8": "Float8Tensor", "nf4": "Params4bit"}


@pytest.fixture(scope="module")
def t5_64(tmp_path_factory):
    """A T5 encoder folder: d_model 64, 4 heads of 16, gated-GELU FFN of 128, 2 layers; the tiny tokenizer."""
    path = tmp_path_factory.mktemp("t5-64")
    tokenizer = build_tiny_t5_tokenizer(path)
    config = transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.T5EncoderModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(t5_64):
    model, tokenizer = load_llm(t5_64)
    return model, encode_text(model, tokenizer, PROMPTS, flexible=True)


def quantised_linears(model) -> dict[str, torch.nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if type(getattr(m, "weight", None)).__name__ in QUANTISED_TYPES.values()
    }


@pytest.mark.parametrize("quantization", ["int8", "fp8", "nf4"])
def test_features_close_to_unquantised_but_not_equal(t5_64, reference, quantization):
    _, ref = reference
    model, tokenizer = load_llm(t5_64, quantization=quantization)
    layers = quantised_linears(model)
    assert layers and {type(m.weight).__name__ for m in layers.values()} == {QUANTISED_TYPES[quantization]}
    feats = encode_text(model, tokenizer, PROMPTS, flexible=True)
    mask = feats.attention_mask.bool()
    assert torch.equal(mask, ref.attention_mask.bool())
    cos = torch.nn.functional.cosine_similarity(feats.hidden_states[mask], ref.hidden_states[mask], dim=-1)
    assert cos.min() > BOUNDS[quantization], cos.min()
    assert not torch.equal(feats.hidden_states, ref.hidden_states)  # it did quantise


@pytest.mark.parametrize("quantization, layer_ratio", [("int8", 0.27), ("fp8", 0.27), ("nf4", 0.15)])
def test_weight_memory_drops(t5_64, reference, quantization, layer_ratio):
    """Each quantised layer stores 1 byte (int8, fp8) or half a byte (nf4) per weight plus its scales, against
    4 in fp32 (int8/fp8: one fp32 scale per 64-weight row = 1/4 + 1/64; nf4: 1/8 + one scale per 64 weights).
    The embedding and norms stay in fp32 (bitsandbytes also keeps T5's FFN ``wo`` unquantised, as transformers
    keeps it in fp32), so the whole tiny model shrinks less: to under 62 %; T5-XL's are 5 % of its weights."""
    fp32, _ = reference
    model, _ = load_llm(t5_64, quantization=quantization)
    full = dict(fp32.named_modules())
    for name, layer in quantised_linears(model).items():
        assert weight_bytes(layer) <= layer_ratio * weight_bytes(full[name]), name
    assert weight_bytes(model) < 0.62 * weight_bytes(fp32)


def test_unknown_or_unsupported_refused_in_one_line_before_loading(tiny_sd, tiny_ella_file):
    cases = [
        (dict(quantization="int4"), "unknown LLM quantization 'int4'; use one of int8, fp8, nf4"),
        (dict(quantization="int8", device="mps"), "runs on cpu and cuda, not mps"),
        (dict(quantization="fp8", device="xpu:0"), "runs on cpu and cuda, not xpu"),
    ]
    for kwargs, message in cases:
        # a path that doesn't exist: the quantization must be refused before the model is even looked for
        with pytest.raises(EllaError, match=message) as err:
            load_llm("./no-such-llm", **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(EllaError, match="unknown LLM quantization 'nf3'") as err:
        load_pipeline("./no-base", "./no-ella.safetensors", "./no-llm", device="cpu", llm_quantization="nf3")
    assert "\n" not in str(err.value)
    check_quantization(None, "mps")  # no quantization: nothing to refuse


def test_nf4_on_cpu_refuses_widths_its_kernel_cannot_pack(tiny_t5):
    """bitsandbytes' CPU 4-bit kernel packs output rows in blocks of 32; the shared tiny T5's are 16 wide."""
    with pytest.raises(EllaError, match="multiple of 32 .* has 16: use int8 or fp8") as err:
        load_llm(tiny_t5, quantization="nf4")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("quantization, module", [("int8", "torchao"), ("nf4", "bitsandbytes")])
def test_missing_extra_is_named(monkeypatch, quantization, module):
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: `import` fails as if not installed
    with pytest.raises(MissingExtraError, match=rf"needs '{module}'.*pip install 'ella-diffusion\[quant\]'") as err:
        load_llm("./no-such-llm", quantization=quantization)
    assert "\n" not in str(err.value)


def test_pipeline_with_int8_llm(tiny_sd, tiny_ella_file, tiny_t5):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the connector's "trained on fp16 features" notice
        pipe = load_pipeline(tiny_sd, tiny_ella_file, tiny_t5, device="cpu", dtype="float32", llm_quantization="int8")
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a red cat", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert type(pipe.llm.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.as_tensor(image)).all()
