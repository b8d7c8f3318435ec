"""Encoder-only T5 checkpoints: a single ``.safetensors`` of encoder weights (both key styles) or an encoder-only
folder loads to exactly the features of the full model it came from; a damaged or foreign file is refused in
one line, from its header, before anything else loads."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from ella import load_pipeline
from ella.errors import EllaError, MissingModelError
from ella.llm import load_llm
from ella.text import encode_text

PROMPTS = ["a red cat sitting on a blue chair", "a green lamp", "two yellow triangles next to a large square"]


@pytest.fixture(scope="module")
def reference(tiny_t5):
    """The full tiny flan-T5 folder's encoder, its features and its encoder tensors (``T5EncoderModel`` names)."""
    model, tokenizer = load_llm(tiny_t5)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return encode_text(model, tokenizer, PROMPTS, flexible=True).hidden_states, state


def features(llm, **kwargs) -> torch.Tensor:
    model, tokenizer = load_llm(llm, **kwargs)
    return encode_text(model, tokenizer, PROMPTS, flexible=True).hidden_states


def bare(state: dict) -> dict:
    """A T5 stack's own names, as some encoder-only files have them: ``block.0...``, ``embed_tokens.weight``."""
    return {
        ("embed_tokens.weight" if k == "shared.weight" else k.removeprefix("encoder.")): v for k, v in state.items()
    }


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


@pytest.mark.parametrize("style", ["prefixed", "prefixed+tied copy", "bare"])
def test_single_file_loads_exactly(tmp_path, tiny_t5, reference, style):
    ref, state = reference
    if style == "prefixed+tied copy":
        state = {**state, "encoder.embed_tokens.weight": state["shared.weight"].clone()}
    elif style == "bare":
        state = bare(state)
    path = tmp_path / "t5-encoder.safetensors"
    save_file(state, str(path))
    assert torch.equal(features(path, tokenizer=tiny_t5), ref)


def test_fp16_file_loads_like_the_fp16_folder(tmp_path, tiny_t5, reference):
    """Encoder files are shared as saved from an fp16 load: fp16, except the FFN's ``wo``, which transformers
    keeps in fp32 (that is why the release's XL encoder is ~2.8 GB, not 2.4). Such a mixed file gives exactly
    the features of the folder it came from."""
    from transformers import T5EncoderModel

    T5EncoderModel.from_pretrained(tiny_t5, dtype=torch.float16).save_pretrained(tmp_path / "folder")
    state = load_file(str(tmp_path / "folder" / "model.safetensors"))
    assert {v.dtype for k, v in state.items() if k.endswith(".wo.weight")} == {torch.float32}
    assert state["shared.weight"].dtype == torch.float16
    save_file(state, str(tmp_path / "fp16.safetensors"))
    got = features(tmp_path / "fp16.safetensors", tokenizer=tiny_t5)
    assert torch.equal(got, features(tmp_path / "folder", tokenizer=tiny_t5))
    assert not torch.equal(got, reference[0])  # it really was rounded


def test_whole_t5_file_drops_its_decoder(tiny_t5, reference):
    """A full encoder-decoder file (the folder's own model.safetensors) works too: its decoder is not read."""
    assert any(k.startswith("decoder.") for k in load_file(str(tiny_t5 / "model.safetensors")))
    assert torch.equal(features(tiny_t5 / "model.safetensors", tokenizer=tiny_t5), reference[0])


def test_encoder_only_folder(tmp_path, tiny_t5, reference):
    """The release's layout (QQGYLab/ELLA models--google--flan-t5-xl--text_encoder): config + encoder weights
    + tokenizer files; and the same folder without tokenizer files, given one."""
    from transformers import AutoTokenizer, T5EncoderModel

    folder = tmp_path / "text_encoder"
    T5EncoderModel.from_pretrained(tiny_t5).save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith("decoder.") for k in weights)
    assert torch.equal(features(folder, tokenizer=tiny_t5), reference[0])
    with pytest.raises(EllaError, match="has no tokenizer files: pass the LLM's tokenizer") as err:
        load_llm(folder)  # the tiny vocabulary is not flan-T5's, so no default tokenizer fits
    one_line(err)
    AutoTokenizer.from_pretrained(tiny_t5).save_pretrained(folder)
    assert torch.equal(features(folder), reference[0])


def test_folder_missing_encoder_weights_refused(tmp_path, tiny_t5, reference):
    """transformers would fill missing weights with random numbers and only log it; we refuse."""
    folder = tmp_path / "bare-folder"
    folder.mkdir()
    shutil.copy(tiny_t5 / "config.json", folder)
    save_file(bare(reference[1]), str(folder / "model.safetensors"))
    with pytest.raises(EllaError, match=r"of the T5 encoder's weights are not in its checkpoint .*pass the \.safet"):
        load_llm(folder, tokenizer=tiny_t5)


def test_single_file_through_load_pipeline(tmp_path, tiny_sd, tiny_ella_file, tiny_t5, reference):
    path = tmp_path / "encoder.safetensors"
    save_file(reference[1], str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_pipeline(
            tiny_sd, tiny_ella_file, path, device="cpu", dtype="float32", llm_tokenizer=tiny_t5, hidden_layer=-1
        )
    got = encode_text(pipe.llm, pipe.llm_tokenizer, PROMPTS, flexible=True).hidden_states
    assert torch.equal(got, reference[0])
    with pytest.raises(EllaError, match="--llm-layer 5: .* has 2 layers"):  # the layer count comes from the header
        load_pipeline(tiny_sd, tiny_ella_file, path, device="cpu", llm_tokenizer=tiny_t5, hidden_layer=5)


def test_default_tokenizer_missing_offline_names_the_download(tmp_path, reference):
    path = tmp_path / "encoder.safetensors"
    save_file(reference[1], str(path))
    with pytest.raises(MissingModelError) as err:
        load_llm(path)  # flan-t5-xl's tokenizer, which no test has: HF_HUB_OFFLINE=1 and an empty cache
    message = one_line(err)
    assert "Missing LLM tokenizer: 'google/flan-t5-xl'" in message
    assert 'hf download google/flan-t5-xl --include "*.json" --include "*.model"' in message
    assert "--llm-tokenizer DIR" in message


def test_damaged_or_foreign_files_refused_from_the_header(tmp_path, tiny_ella_file, reference):
    state = reference[1]
    damaged = {
        "truncated": None,
        "missing tensor": {k: v for k, v in state.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"},
        "extra tensor": {**state, "encoder.block.0.layer.0.SelfAttention.scale_weight": torch.ones(1)},
        "misshapen": {**state, "encoder.final_layer_norm.weight": torch.ones(15)},
    }
    expected = {
        "foreign": "is not a T5 encoder checkpoint: no shared.weight, encoder.block.0.layer.0.SelfAttention.q.weight",
        "truncated": r"is not a readable \.safetensors file \(.*\); download it again",
        "missing tensor": r"is not a complete T5 encoder .*: tensors 1 missing \(e\.g\. encoder\.block\.1\.layer\.1",
        "extra tensor": r"tensors 1 unexpected \(e\.g\. encoder\.block\.0\.layer\.0\.SelfAttention\.scale_weight\)",
        "misshapen": r"tensors 1 misshapen \(e\.g\. encoder\.final_layer_norm\.weight is \[15\], not \[16\]\)",
    }
    for name, message in expected.items():
        path = tmp_path / f"{name.replace(' ', '-')}.safetensors"
        if name == "foreign":
            shutil.copy(tiny_ella_file, path)  # an ELLA connector, not a T5
        elif name == "truncated":
            save_file(state, str(path))
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            save_file(damaged[name], str(path))
        # a tokenizer that can't be found: the file must be refused first, before the tokenizer is looked for
        with pytest.raises(EllaError, match=message) as err:
            load_llm(path, tokenizer="nobody/no-such-tokenizer")
        assert not isinstance(err.value, MissingModelError)
        one_line(err)
