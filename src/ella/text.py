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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .devices import compute_device
from .errors import EllaError

DEFAULT_MAX_LENGTH = 128  # release fact: T5 features padded/truncated to 128 tokens


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the LLM's max length lost its tail."""


@dataclass
class TextFeatures:
    """LLM features for a batch of prompts.

    ``attention_mask`` ([B, S], 1 = token) is what the *connector* must respect; it is None in
    fixed mode, where the release lets the connector attend to the pad positions too.
    ``token_weights`` ([B, S], 1 = unchanged) carries prompt emphasis to the connector
    (:func:`ella.connector.weighted_key_bias`); None when no prompt of the batch has any.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]


#: ``(start, end, weight)`` character spans of a prompt whose tokens are emphasised (:mod:`ella.prompts`).
WeightSpans = Sequence[tuple[int, int, float]]


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
    the GPU (ids, mask and the untruncated lengths the truncation warning needs). ``dropped``: per prompt,
    the words truncation cut (empty when none); ``weights``: per-token emphasis, or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]
    dropped: list[str] | None = None
    weights: torch.Tensor | None = None


def tokenize(
    tokenizer,
    prompts: str | Sequence[str],
    *,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    flexible: bool = False,
    weights: Sequence[WeightSpans] | None = None,
) -> Tokens:
    """Prompts -> :class:`Tokens`, padded to ``max_length`` (fixed) or to the longest prompt (flexible).

    ``max_length=None`` keeps every prompt whole (padded to the longest; the caller must then mask the
    padding, since its amount depends on the batch). ``weights``: per prompt, the character spans of
    emphasised text; each token takes the weight of the span holding its first character (read off a
    fast tokenizer's offsets, so the ids are exactly those of the unweighted text).
    """
    prompts = _check_prompts(prompts)
    if max_length is not None and max_length < 1:
        raise EllaError(f"max_length must be at least 1 (or None: the whole prompt), got {max_length}")
    full = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    spans = weights is not None and any(weights)
    if spans and not getattr(tokenizer, "is_fast", False):
        raise EllaError(
            f"prompt weights need a fast tokenizer (character offsets); {type(tokenizer).__name__} is not one: "
            "drop the (word:1.2) markup or pass prompt_weights=False"
        )
    tokens = tokenizer(
        prompts,
        padding="longest" if flexible or max_length is None else "max_length",
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
        return_offsets_mapping=bool(spans),
    )
    out = Tokens(tokens["input_ids"], tokens["attention_mask"], [len(ids) for ids in full])
    if max_length is not None and any(n > max_length for n in out.lengths):
        special = set(tokenizer.all_special_ids)
        out.dropped = []
        for ids, kept in zip(full, out.input_ids.tolist()):
            content, kept_content = [t for t in ids if t not in special], [t for t in kept if t not in special]
            out.dropped.append(tokenizer.decode(content[len(kept_content) :]).strip())
    if spans:
        out.weights = torch.ones(out.input_ids.shape, dtype=torch.float32)
        for i, (offsets, row) in enumerate(zip(tokens["offset_mapping"].tolist(), weights)):
            for j, (start, end) in enumerate(offsets):
                if end > start:  # special and pad tokens have empty offsets: weight 1
                    out.weights[i, j] = next((w for a, b, w in row if a <= start < b), 1.0)
    return out


def warn_truncated(prompts: Sequence[str], tokens: Tokens, max_length: int | None) -> None:
    """Silently dropping the end of a dense prompt is the classic "ELLA ignored half my prompt" bug."""
    if max_length is None:
        return
    for i, n in enumerate(tokens.lengths):
        if n > max_length:
            lost = tokens.dropped[i] if tokens.dropped else ""
            warnings.warn(
                f"prompt {i} has {n} tokens; the last {n - max_length} were dropped "
                f"(max_length={max_length}, or None for the whole prompt): {lost[:200]!r}",
                PromptTruncatedWarning,
                stacklevel=3,
            )


#: Which hidden states to read: None (the last layer), one index, or several (their states concatenated).
Layers = int | Sequence[int] | None


def layer_count(hidden_layer: Layers) -> int:
    """How many layers' states the features concatenate (their width is this times the LLM's hidden size)."""
    return len(hidden_layer) if isinstance(hidden_layer, Sequence) else 1


def select_hidden_states(out, hidden_layer: Layers) -> torch.Tensor:
    """The features a connector reads from a model output (run with ``output_hidden_states`` unless
    ``hidden_layer`` is None): the last hidden state, one layer's, or several layers' side by side."""
    if hidden_layer is None:
        return out.last_hidden_state
    if isinstance(hidden_layer, Sequence):
        return torch.cat([out.hidden_states[i] for i in hidden_layer], dim=-1)
    return out.hidden_states[hidden_layer]


@torch.no_grad()
def encode_tokens(model, tokens: Tokens, *, flexible: bool = False, hidden_layer: Layers = None) -> TextFeatures:
    """:class:`Tokens` -> :class:`TextFeatures`, on the device the model computes on (its hooks' under offload).

    Several layers (``hidden_layer=[-1, -6, -12]``, as Playground v3 and Lumina read their LLMs) are concatenated
    along the feature dimension: the connector's input projection then learns its own mix of them, per channel,
    which contains any weighted sum of the layers as a special case.
    """
    device = compute_device(model)
    mask = tokens.attention_mask.to(device)
    out = model(
        input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=hidden_layer is not None
    )
    states = select_hidden_states(out, hidden_layer)
    weights = None if tokens.weights is None else tokens.weights.to(device)
    return TextFeatures(states, mask if flexible else None, weights)


def encode_text(
    model,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    flexible: bool = False,
    hidden_layer: Layers = None,
    weights: Sequence[WeightSpans] | None = None,
) -> TextFeatures:
    """Prompts -> :class:`TextFeatures` (fixed: ``[B, max_length, D]``, no mask; flexible: padded + mask).

    Prompts over ``max_length`` tokens are truncated with a :class:`PromptTruncatedWarning` that names
    the words each lost. ``max_length=None``: whole prompts, padded to the longest and masked (flexible).
    ``weights``: see :func:`tokenize`.
    """
    prompts = _check_prompts(prompts)
    flexible = flexible or max_length is None
    tokens = tokenize(tokenizer, prompts, max_length=max_length, flexible=flexible, weights=weights)
    warn_truncated(prompts, tokens, max_length)
    return encode_tokens(model, tokens, flexible=flexible, hidden_layer=hidden_layer)
