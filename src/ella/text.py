"""LLM text features: turn prompts into ``[B, S, D]`` features + mask with any HF language model.

ELLA's LLM is frozen and runs once per prompt. The release uses Flan-T5-XL's encoder (last hidden
state, 2048-d) in fp16, and two length policies:

* **fixed** — pad (and truncate) every prompt to 128 tokens; the connector sees all 128 positions,
  pad positions included (that is what the released weights were trained and run with);
* **flexible** — no padding: each prompt at its own length. The release loops over prompts for
  this; we pad the batch and return a mask so the connector ignores the pad tokens instead.

Any encoder (BERT-like), encoder-decoder (T5 family: its encoder) or decoder-only LM works behind
the same call; ``hidden_layer`` picks an intermediate layer's states instead of the last.

Loading the LLM (hub ids, encoder-only T5 files, quantised weights) is :mod:`ella.llm`'s.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .devices import compute_device
from .errors import EllaError

DEFAULT_MAX_LENGTH = 128  # release fact: T5 features padded/truncated to 128 tokens


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the LLM's max length lost its tail."""


class PromptWeightsWarning(UserWarning):
    """A1111-style emphasis was removed from a prompt: an LLM reads words, not weights."""


# A1111 emphasis: (text:1.3) and (text) / ((text)) up-weight, [text] down-weights; \( \) \[ \] are literal.
_WEIGHTED = re.compile(r"(?<!\\)\(([^()]*?):\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*(?<!\\)\)")
_EMPHASIS = re.compile(r"(?<!\\)[()\[\]]")


def strip_prompt_weights(prompt: str) -> str:
    """``"a (red:1.3) car, ((sharp))"`` -> ``"a red car, sharp"``; escaped brackets become literal.

    ELLA's condition comes from an LLM reading the sentence; A1111 weights scale CLIP token
    embeddings, which have no counterpart in LLM features, and the markup itself would be read
    as text. So the markup is removed (with a :class:`PromptWeightsWarning`), not emulated.
    """
    text = prompt
    while True:  # innermost first: ((a:1.2) b:1.1)
        new = _WEIGHTED.sub(r"\1", text)
        if new == text:
            break
        text = new
    text = _EMPHASIS.sub("", text)
    return re.sub(r"\\([()\[\]])", r"\1", text)


@dataclass
class TextFeatures:
    """LLM features for a batch of prompts.

    ``attention_mask`` ([B, S], 1 = token) is what the *connector* must respect; it is None in
    fixed mode, where the release lets the connector attend to the pad positions too.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise EllaError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise EllaError(f"prompt {i} is a {type(p).__name__}, expected a string")
    return prompts


@dataclass
class Tokens:
    """A tokenized batch, made apart from the LLM so a training data loader can do it in its workers:
    tokenizing 512 captions twice takes ~0.1-0.3 s of CPU per step, which in the training process stalls
    the GPU (ids, mask and the untruncated lengths the truncation warning needs)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]


def tokenize(
    tokenizer, prompts: str | Sequence[str], *, max_length: int = DEFAULT_MAX_LENGTH, flexible: bool = False
) -> Tokens:
    """Prompts -> :class:`Tokens`, padded to ``max_length`` (fixed) or to the longest prompt (flexible)."""
    prompts = _check_prompts(prompts)
    if max_length < 1:
        raise EllaError(f"max_length must be at least 1, got {max_length}")
    full = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    tokens = tokenizer(
        prompts,
        padding="longest" if flexible else "max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return Tokens(tokens["input_ids"], tokens["attention_mask"], [len(ids) for ids in full])


def warn_truncated(prompts: Sequence[str], tokens: Tokens, max_length: int) -> None:
    """Silently dropping the end of a dense prompt is the classic "ELLA ignored half my prompt" bug."""
    for i, n in enumerate(tokens.lengths):
        if n > max_length:
            warnings.warn(
                f"prompt {i} has {n} tokens; the last {n - max_length} were dropped "
                f"(max_length={max_length}): {prompts[i][:60]!r}...",
                PromptTruncatedWarning,
                stacklevel=3,
            )


@torch.no_grad()
def encode_tokens(model, tokens: Tokens, *, flexible: bool = False, hidden_layer: int | None = None) -> TextFeatures:
    """:class:`Tokens` -> :class:`TextFeatures`, on the device the model computes on (its hooks' under offload)."""
    device = compute_device(model)
    mask = tokens.attention_mask.to(device)
    out = model(
        input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=hidden_layer is not None
    )
    states = out.last_hidden_state if hidden_layer is None else out.hidden_states[hidden_layer]
    return TextFeatures(states, mask if flexible else None)


def encode_text(
    model,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    flexible: bool = False,
    hidden_layer: int | None = None,
) -> TextFeatures:
    """Prompts -> :class:`TextFeatures` (fixed: ``[B, max_length, D]``, no mask; flexible: padded + mask).

    Prompts over ``max_length`` tokens are truncated with a :class:`PromptTruncatedWarning` that says
    how many tokens each lost.
    """
    prompts = _check_prompts(prompts)
    tokens = tokenize(tokenizer, prompts, max_length=max_length, flexible=flexible)
    warn_truncated(prompts, tokens, max_length)
    return encode_tokens(model, tokens, flexible=flexible, hidden_layer=hidden_layer)
