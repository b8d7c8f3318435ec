"""The base model's CLIP encoding for ``ella+clip`` mode, as AUTOMATIC1111's web UI does it.

Why: people bring prompts written for A1111 — ``(red:1.3)`` emphasis, ``BREAK``, prompts far beyond CLIP's 77
tokens — and diffusers' own ``encode_prompt`` truncates them at 77 tokens and ignores the weights. This module
reimplements A1111's behaviour on top of a diffusers SD / SDXL pipeline; it receives the weighted segments that
``ella.prompts.parse_weights`` makes and does not parse anything itself.

* Windows: CLIP only ever saw 77-token sequences (``BOS + 75 tokens + EOS``), so a long prompt is cut into windows of
  75 content tokens, each encoded on its own as ``[BOS] + tokens + [EOS] + pad``, and the windows' states are
  concatenated along the sequence: cross-attention takes any length. ``BREAK`` closes a window early. We cut at exactly
  75 tokens; A1111 moves the cut back to the last comma within a window's last 20 tokens, which we do not do.
* Emphasis: A1111's "original" method — scale each token's states by its weight, then rescale the whole window so
  that its mean is what it was. Without the restoration a weight would also shift the window's overall magnitude,
  which the UNet reads as a different (often washed-out) prompt; with it, weights only move emphasis between tokens.
  Rows whose weights are all 1.0 skip this, so they are bit-identical to diffusers' own encoding.
* Each window is encoded exactly as diffusers' ``encode_prompt`` encodes its one 77-token sequence (attention mask,
  clip skip, final layer norm, SDXL's penultimate layer and pooled output, LoRA scale, textual-inversion tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers.loaders import (
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import get_module_execution_device

from ..errors import EllaError, InvalidArgumentError

__all__ = ["encode_clip"]

#: One prompt: (text, weight) segments in order; weight ``None`` marks a ``BREAK``.
Segments = Sequence[tuple[str, float | None]]
#: A window's content: token ids and their weights (at most ``model_max_length - 2`` of each).
Window = tuple[list[int], list[float]]


def encode_clip(
    pipe,
    rows: Sequence[Segments],
    device: torch.device | str,
    *,
    rows_2: Sequence[Segments] | None = None,
    lora_scale: float | None = None,
    clip_skip: int | None = None,
    chunked: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Encode weighted prompts with ``pipe``'s CLIP text encoder(s), A1111-style (see the module docstring).

    ``rows`` holds one segment list per prompt; ``rows_2`` the segments for SDXL's ``text_encoder_2`` (default:
    ``rows``). ``chunked=False`` keeps diffusers' single 77-token window and truncates (``BREAK`` is then ignored).

    Returns ``(embeds, pooled, dropped)``: ``embeds`` is ``[len(rows), 77 * windows, width]``, every row as long as
    the longest (shorter rows are padded with windows of the empty prompt, as A1111 pads cond and uncond to one
    length); ``pooled`` is SDXL's ``text_encoder_2`` projected output of each row's first window (``None`` for SD);
    ``dropped`` is, per row, the text that ``chunked=False`` cut off ('' if none), for the caller's warning.
    """
    sdxl = hasattr(pipe, "text_encoder_2")
    encoders = [(pipe.tokenizer, pipe.text_encoder, rows)]
    if sdxl:
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2, rows if rows_2 is None else rows_2))
    encoders = [(tok, enc, r) for tok, enc, r in encoders if tok is not None and enc is not None]
    if not encoders:
        raise EllaError(
            "condition_mode 'ella+clip' needs the base model's CLIP text encoder and tokenizer, but this pipeline "
            "has none: load the base model with them, or use condition_mode 'ella'"
        )
    if not rows:
        raise InvalidArgumentError("encode_clip needs at least one prompt (rows is empty)")
    if rows_2 is not None and len(rows_2) != len(rows):
        raise InvalidArgumentError(f"rows_2 has {len(rows_2)} prompts but rows has {len(rows)}: give one per prompt")

    splits = [[_split(pipe, tok, row, chunked) for row in r] for tok, _, r in encoders]
    dropped = [
        next((tok.decode(split[i][1]) for (tok, _, _), split in zip(encoders, splits) if split[i][1]), "")
        for i in range(len(rows))
    ]
    count = max(len(windows) for split in splits for windows, _ in split)  # windows per row: the longest row's

    parts, pooled = [], None
    with _lora_scaled(pipe, [enc for _, enc, _ in encoders], lora_scale):
        for (tok, enc, _), split in zip(encoders, splits):
            states, pool = _encode_rows(tok, enc, split, count, sdxl, device, clip_skip)
            parts.append(states)
            if pooled is None and pool is not None:
                pooled = pool.to(device)
    embeds = torch.cat(parts, dim=-1)

    last = pipe.text_encoder_2 if sdxl else pipe.text_encoder
    unet = getattr(pipe, "unet", None)
    dtype = last.dtype if last is not None else unet.dtype if unet is not None else embeds.dtype
    return embeds.to(dtype=dtype, device=device), pooled, dropped


def _split(pipe, tokenizer, row: Segments, chunked: bool) -> tuple[list[Window], list[int]]:
    """``row``'s windows of content tokens (with their weights), and the token ids ``chunked=False`` cuts off.

    Each segment is tokenized on its own, without BOS/EOS, after the textual-inversion conversion that diffusers'
    ``encode_prompt`` applies (a multi-vector token becomes its N tokens, each with the segment's weight).
    """
    size = tokenizer.model_max_length - 2  # 75: a window also holds BOS and EOS
    # Going past 77 tokens is the point here: mark transformers' once-per-tokenizer "longer than the maximum ...
    # will result in indexing errors" warning (which tokenize() in maybe_convert_prompt would print) as given.
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    windows: list[Window] = [([], [])]
    for text, weight in row:
        if weight is None:  # BREAK: close a non-empty window (and nothing at all in one-window mode)
            if chunked and windows[-1][0]:
                windows.append(([], []))
            continue
        if isinstance(pipe, TextualInversionLoaderMixin):
            text = pipe.maybe_convert_prompt(text, tokenizer)
        for token in tokenizer(text, add_special_tokens=False, truncation=False).input_ids:
            if chunked and len(windows[-1][0]) == size:
                windows.append(([], []))
            windows[-1][0].append(token)
            windows[-1][1].append(float(weight))
    if len(windows) > 1 and not windows[-1][0]:
        windows.pop()  # a BREAK at the end opens no window
    if chunked:
        return windows, []
    ids, weights = windows[0]
    return [(ids[:size], weights[:size])], ids[size:]


def _encode_rows(tokenizer, encoder, split, count: int, sdxl: bool, device, clip_skip: int | None):
    """One encoder's ``[rows, 77 * count, width]`` states (emphasis applied) and, if it has one, its pooled output.

    All windows of all rows go through the encoder in one batch, followed by the empty prompt's window when a row
    needs padding to ``count`` windows.
    """
    windows = [window for row, _ in split for window in row]
    if any(len(row) < count for row, _ in split):
        windows.append(([], []))
    length = tokenizer.model_max_length
    ids, mask, weights = [], [], []
    for content, w in windows:
        pad = length - len(content) - 2
        ids.append([tokenizer.bos_token_id, *content, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        mask.append([1] * (len(content) + 2) + [0] * pad)
        weights.append([1.0, *w] + [1.0] * (pad + 1))
    states, pool = _encode_windows(encoder, torch.tensor(ids), torch.tensor(mask), sdxl, device, clip_skip)
    weights_t = torch.tensor(weights, device=states.device)

    out, firsts, start = [], [], 0
    for row, _ in split:
        z, w = states[start : start + len(row)], weights_t[start : start + len(row)]
        if bool((w != 1.0).any()):
            z = _emphasis(z, w)
        z = torch.cat([z, states[-1:].expand(count - len(row), -1, -1)])
        out.append(z.reshape(-1, z.shape[-1]))
        firsts.append(start)
        start += len(row)
    return torch.stack(out), None if pool is None else pool[firsts]


def _encode_windows(encoder, ids: torch.Tensor, mask: torch.Tensor, sdxl: bool, device, clip_skip: int | None):
    """``[n, 77, width]`` states of ``n`` 77-token windows, exactly as diffusers' ``encode_prompt`` computes them.

    SD (``StableDiffusionPipeline.encode_prompt``): the attention mask only if the encoder's config asks for it;
    the last layer, or ``clip_skip`` layers earlier through the final layer norm. SDXL
    (``StableDiffusionXLPipeline.encode_prompt``): the penultimate layer (``clip_skip`` more layers earlier), no
    layer norm, and the output's first item as pooled embedding when it is 2-D (``text_encoder_2``'s projection).
    """
    if sdxl:
        out = encoder(ids.to(get_module_execution_device(encoder)), output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None
        return out.hidden_states[-(2 if clip_skip is None else clip_skip + 2)], pooled
    attention_mask = mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
    if clip_skip is None:
        return encoder(ids.to(device), attention_mask=attention_mask)[0], None
    states = encoder(ids.to(device), attention_mask=attention_mask, output_hidden_states=True)[-1][-(clip_skip + 1)]
    # transformers 5's CLIPTextModel holds final_layer_norm itself; 4.x (which diffusers' code assumes) in text_model
    return getattr(encoder, "text_model", encoder).final_layer_norm(states), None


def _emphasis(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111's "original" emphasis on windows ``z`` ``[k, 77, width]`` with per-position weights ``w`` ``[k, 77]``.

    Each window's mean (in float32) is restored after weighting, so that emphasis redistributes attention between
    tokens instead of changing the prompt's overall strength. A1111 restores the mean over a batch of windows; we do
    it per window, so a prompt's encoding does not depend on what it is batched with. On SDXL this runs on each
    encoder's states separately, as A1111 does (``rows_2`` may carry other weights than ``rows``).
    """
    z32 = z.float()
    before = z32.mean(dim=(1, 2), keepdim=True)
    z32 = z32 * w[:, :, None]
    return (z32 * (before / z32.mean(dim=(1, 2), keepdim=True))).to(z.dtype)


@contextmanager
def _lora_scaled(pipe, encoders: list, scale: float | None) -> Iterator[None]:
    """The text encoders' LoRA layers at ``scale`` for the duration, as diffusers' ``encode_prompt`` sets them.

    diffusers sets ``pipe._lora_scale`` and scales the PEFT layers before encoding and unscales them after; here the
    unscaling also happens when encoding fails, so an error cannot leave the pipeline's LoRA at the wrong strength.
    Without the PEFT backend diffusers cannot load LoRA weights at all, so there is nothing to scale.
    """
    if scale is None or not isinstance(pipe, (StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin)):
        yield
        return
    pipe._lora_scale = scale
    scaled = []
    try:
        for encoder in encoders if USE_PEFT_BACKEND else []:
            scale_lora_layers(encoder, scale)
            scaled.append(encoder)
        yield
    finally:
        for encoder in scaled:
            unscale_lora_layers(encoder, scale)
