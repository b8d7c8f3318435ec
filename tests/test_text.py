"""LLM text features: fixed and flexible modes, truncation, other LM families."""

from __future__ import annotations

import warnings

import pytest
import torch

from ella.errors import EllaError, MissingModelError
from ella.llm import load_llm
from ella.text import PromptTruncatedWarning, encode_text

PROMPTS = ["a red cat sitting on a blue chair", "a green lamp", "two yellow triangles next to a large square"]


def test_fixed_mode_is_the_release_padding(tiny_t5):
    import transformers

    model, tok = load_llm(tiny_t5)
    feats = encode_text(model, tok, PROMPTS, max_length=128)
    assert feats.hidden_states.shape == (3, 128, 16) and feats.attention_mask is None
    # independently: the T5 encoder on 128-padded ids, as the release's T5TextEmbedder does
    ref_model = transformers.T5EncoderModel.from_pretrained(tiny_t5)
    ids = tok(PROMPTS, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    ref = ref_model(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    assert torch.allclose(feats.hidden_states, ref, atol=1e-5)


def test_flexible_batch_equals_each_prompt_alone(tiny_t5):
    model, tok = load_llm(tiny_t5)
    feats = encode_text(model, tok, PROMPTS, flexible=True)
    lengths = feats.attention_mask.sum(1).tolist()
    assert feats.hidden_states.shape[1] == max(lengths) and len(set(lengths)) == 3
    for i, prompt in enumerate(PROMPTS):
        alone = encode_text(model, tok, [prompt], flexible=True)
        assert alone.hidden_states.shape[1] == lengths[i]
        assert torch.allclose(feats.hidden_states[i, : lengths[i]], alone.hidden_states[0], atol=1e-5)


def test_truncation_warns_with_the_number_of_dropped_tokens(tiny_t5):
    model, tok = load_llm(tiny_t5)
    long_prompt = " ".join(["a red cat sitting on a blue chair"] * 20)
    n = len(tok(long_prompt)["input_ids"])
    with pytest.warns(PromptTruncatedWarning, match=f"prompt 1 has {n} tokens; the last {n - 128} were dropped"):
        feats = encode_text(model, tok, ["short", long_prompt], flexible=True)
    assert feats.hidden_states.shape[1] == 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_text(model, tok, ["short"], max_length=128)  # no warning when nothing is dropped


def test_decoder_only_lm_and_hidden_layer(tmp_path, tiny_t5):
    """Any HF LM behind the same call: a tiny GPT-2 (no pad token) with an intermediate layer."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny_t5)
    config = transformers.GPT2Config(n_embd=24, n_layer=3, n_head=4, vocab_size=len(tok), n_positions=256)
    torch.manual_seed(0)
    transformers.GPT2Model(config).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    model, tok2 = load_llm(tmp_path / "gpt2")
    assert type(model).__name__ == "GPT2Model"
    last = encode_text(model, tok2, PROMPTS, flexible=True)
    layer1 = encode_text(model, tok2, PROMPTS, flexible=True, hidden_layer=1)
    assert last.hidden_states.shape[-1] == 24
    ids = tok2(PROMPTS[:1], return_tensors="pt")
    ref = model(**ids, output_hidden_states=True).hidden_states[1]
    n = ref.shape[1]
    assert torch.allclose(layer1.hidden_states[0, :n], ref[0], atol=1e-6)
    assert not torch.allclose(layer1.hidden_states, last.hidden_states)


def test_bad_inputs(tiny_t5, tmp_path):
    model, tok = load_llm(tiny_t5)
    with pytest.raises(EllaError, match="no prompts"):
        encode_text(model, tok, [])
    with pytest.raises(EllaError, match="prompt 1 is a int"):
        encode_text(model, tok, ["ok", 3])
    with pytest.raises(EllaError, match=f"could not load the LLM from {tmp_path}"):
        load_llm(tmp_path)  # an empty local dir is a local error, not "missing on the hub"
    with pytest.raises(MissingModelError, match="Missing LLM: 'nobody/no-such-llm'.*hf download nobody/no-such-llm"):
        load_llm("nobody/no-such-llm")
