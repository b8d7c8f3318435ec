"""From the prompts a user passes to what the condition table reads: rows, token weights and per-step slots.

A call hands the pipeline one LLM prompt per image (plus the negatives under CFG) and, in ``ella+clip`` mode, a
CLIP prompt each (by default the same text; SDXL's second CLIP may get its own, ``prompt_2``). Three things
happen to those strings, all decided here before any model runs:

* **slots**: identical (LLM prompt, CLIP prompt) pairs share one slot; the loop's placeholder carries slot ids;
* **rows**: prompt editing (``[a:b:0.5]``, ``[a|b]``, :mod:`ella.prompts`) turns a prompt into the few texts it can
  take at any step (its *variants*); each distinct variant is one LLM row (its emphasis markup parsed into token
  weights) and each distinct CLIP variant one CLIP row, so every text is encoded once per call;
* **schedule**: once the loop's step count is known (the table asks at its first lookup), each slot's row at each
  step is the variant A1111's scheduling makes active then.

Without editing and with one CLIP text per LLM text, slot ``i`` is row ``i`` at every step: ``schedule`` is None
and the table computes exactly what it computed before prompt editing existed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product

import torch

from ..conditioning import SlotRows
from ..prompts import parse_weights, plain_text, prompt_schedule, prompt_variants, strip_prompt_weights, weight_spans
from ..text import WeightSpans

Segments = list[tuple[str, float | None]]
#: A slot's CLIP text: (first CLIP's, second CLIP's or None = the same).
ClipKey = tuple[str, str | None]


@dataclass
class PromptPlan:
    """Everything the pipeline encodes for one call (see the module docstring)."""

    slot_of: list[int]  # per prompt given (positives, then negatives): its slot
    llm_texts: list[str]  # per LLM row: the text the LLM reads (markup removed)
    llm_spans: list[WeightSpans]  # per LLM row: emphasised character spans (empty: none)
    clip_rows: list[tuple[Segments, Segments]] = field(default_factory=list)  # per CLIP row: (first, second) CLIP
    schedule: Callable[[int], SlotRows] | None = None
    stripped: tuple[str, str] | None = None  # with weights off: the first prompt whose markup was removed

    @property
    def weighted(self) -> bool:
        return any(self.llm_spans)

    def first_clip_rows(self) -> torch.Tensor:
        """Each slot's CLIP row at the first step (SDXL takes one pooled CLIP embedding for the whole loop).
        Asked before the step count is known: a fraction ``when`` is read on a long schedule (1,000 steps)."""
        if self.schedule is None:
            return torch.arange(max(self.slot_of) + 1)
        rows = self.schedule(1000)
        return (rows.llm if rows.clip is None else rows.clip)[:, 0]


def plan_prompts(llm: list[str], clip: list[ClipKey] | None, *, weights: bool = True) -> PromptPlan:
    """Slots, rows and the step schedule for ``llm`` prompts (and their ``clip`` texts in ``ella+clip`` mode).

    ``weights=False`` is the behaviour before prompt weights existed: emphasis markup is removed from the text
    (``plan.stripped`` names the first prompt it changed, for the caller's warning) and nothing is weighted.
    Prompt editing applies either way: its brackets are not emphasis.
    """
    keys = list(zip(llm, clip if clip is not None else [None] * len(llm)))
    slot_ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    slots = list(slot_ids)
    slot_of = [slot_ids[k] for k in keys]

    stripped: list[tuple[str, str]] = []

    def segments(text: str) -> Segments:
        if weights:
            return parse_weights(text)
        clean = strip_prompt_weights(text)
        if clean != text:
            stripped.append((text, clean))
        return [(clean, 1.0)]

    llm_row: dict[str, int] = {}
    llm_texts, llm_spans = [], []
    for text, _ in slots:
        for variant in prompt_variants(text):
            if variant not in llm_row:
                segs = segments(variant)
                llm_row[variant] = len(llm_texts)
                llm_texts.append(plain_text(segs))
                llm_spans.append(weight_spans(segs) if weights else [])

    clip_row: dict[tuple[str, str | None], int] = {}
    clip_rows: list[tuple[Segments, Segments]] = []
    if clip is not None:
        for _, (first, second) in slots:
            seconds = prompt_variants(second) if second is not None else [None]
            for pair in product(prompt_variants(first), seconds):
                if pair not in clip_row:
                    clip_row[pair] = len(clip_rows)
                    a, b = pair
                    clip_rows.append((segments(a), segments(b) if b is not None else segments(a)))

    identity = len(llm_row) == len(slots) and all(llm_row.get(text) == i for i, (text, _) in enumerate(slots))
    if clip is not None:
        identity = identity and all(clip_row.get((c, c2)) == i for i, (_, (c, c2)) in enumerate(slots))

    def schedule(steps: int) -> SlotRows:
        llm_rows = [[llm_row[v] for v in prompt_schedule(text, steps)] for text, _ in slots]
        if clip is None:
            return SlotRows(torch.tensor(llm_rows, dtype=torch.long))
        clip_rows_per_step = []
        for _, (first, second) in slots:
            seconds = prompt_schedule(second, steps) if second is not None else [None] * steps
            clip_rows_per_step.append([clip_row[pair] for pair in zip(prompt_schedule(first, steps), seconds)])
        return SlotRows(torch.tensor(llm_rows, dtype=torch.long), torch.tensor(clip_rows_per_step, dtype=torch.long))

    return PromptPlan(
        slot_of=slot_of,
        llm_texts=llm_texts,
        llm_spans=llm_spans,
        clip_rows=clip_rows,
        schedule=None if identity else schedule,
        stripped=stripped[0] if stripped else None,
    )
