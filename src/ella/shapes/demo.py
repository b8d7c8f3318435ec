"""``ella demo``: the shipped mini ELLA draws a few dense prompts, and the oracle marks every question.

One row per prompt: the image (enlarged, nearest-neighbour so pixels stay honest) beside the prompt
and its question graph, each question PASS (green) or FAIL (red) as the shapes-DPG judge sees it.
The prompts cycle through the kinds the model is scored on — training-style wording, wording it never
saw in training, terse tags, and an under-specified prompt (only what it states is asked) — so the
sheet shows language understanding, not one template. Runs offline on a CPU in seconds.
"""

from __future__ import annotations

import math
import os
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import EllaError
from ..io import atomic_path, file_in_the_way
from ..sample import MAX_SEED
from . import models as M
from .captions import prompt_for
from .evaluate import EVAL_KINDS, EVAL_SEED_OFFSET
from .language import warn_unknown_words
from .oracle import ShapesOracle
from .questions import questions
from .ship import load_shapes_pipeline
from .world import scene_for

SCALE = 3  # 64 px -> 192 px
LINE = 14
TEXT_WIDTH = 560
MAX_ITEMS = 100  # one sheet: a row per prompt, about 300 px each
MAX_STEPS = M.SCHEDULER_CONFIG["num_train_timesteps"]  # DDIM can't take more steps than the schedule has


def check_demo_args(out: str | Path, *, items: int, seed: int, steps: int, guidance: float, kind: str) -> Path:
    """Every ``ella demo`` value, checked in one line each before the model loads; returns the output path."""
    if isinstance(items, bool) or not isinstance(items, int) or not 1 <= items <= MAX_ITEMS:
        raise EllaError(f"--items must be an integer in [1, {MAX_ITEMS}] (one sheet); got {items!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise EllaError(f"--steps must be an integer in [1, {MAX_STEPS}]; got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - items:
        raise EllaError(f"--seed must be in [0, 2**64) with room for one seed per item (seed + i); got {seed!r}")
    if not math.isfinite(guidance) or guidance < 0:
        raise EllaError(f"guidance must be a finite number >= 0; got {guidance}")
    if kind not in ("ella", "base"):
        raise EllaError(f"unknown shapes model kind {kind!r}; use ella or base")
    out = Path(out).expanduser()
    if out.is_dir():
        raise EllaError(f"--out {out} is a directory; give the PNG file to write (e.g. {out / 'ella-demo.png'})")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise EllaError(f"--out {out} is under {blocker}, which is a file; give a PNG path in a directory")
    folder = next(p for p in out.parents if p.exists())
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EllaError(f"--out {out}: {folder} is not writable; pick a path you can write to")
    return out


def run_demo(
    out: str | Path = "ella-demo.png",
    *,
    model: str | Path | None = None,
    items: int = 4,
    seed: int = 7,
    steps: int = 25,
    guidance: float = 5.0,
    kind: str = "ella",
) -> dict:
    """Draw ``items`` held-out prompts and write the PASS/FAIL sheet to ``out``; returns the counts and timing."""
    out = check_demo_args(out, items=items, seed=seed, steps=steps, guidance=guidance, kind=kind)
    t0 = time.perf_counter()
    pipe = load_shapes_pipeline(model, kind=kind)
    oracle = ShapesOracle()
    rows, t_gen = [], time.perf_counter()
    for i in range(items):
        prompt_kind = EVAL_KINDS[i % len(EVAL_KINDS)]
        caption = prompt_for(seed + EVAL_SEED_OFFSET, i, prompt_kind)
        prompt = caption.text
        warn_unknown_words([prompt])
        image = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=M.RESOLUTION,
            width=M.RESOLUTION,
            generator=torch.Generator().manual_seed(seed + i),
        ).images[0]
        asked = questions(scene_for(seed + EVAL_SEED_OFFSET, i), caption.specified)
        marks = [(q.question, oracle(image, q.question) == "yes") for q in asked]
        rows.append((image, f"[{prompt_kind}] {prompt}", marks))
    per_image = (time.perf_counter() - t_gen) / max(1, items)
    sheet = compose(rows)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    passed = sum(ok for _, _, marks in rows for _, ok in marks)
    total = sum(len(marks) for _, _, marks in rows)
    return {
        "out": str(out),
        "questions_passed": passed,
        "questions": total,
        "seconds_per_image": round(per_image, 2),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def compose(rows: list[tuple[Image.Image, str, list[tuple[str, bool]]]]) -> Image.Image:
    font = ImageFont.load_default()
    side = M.RESOLUTION * SCALE
    blocks = []
    for image, prompt, marks in rows:
        lines = [(text, "black") for text in textwrap.wrap(prompt, 90)] + [("", "black")]
        lines += [(f"{'PASS' if ok else 'FAIL'}  {q}", (20, 140, 40) if ok else (200, 30, 30)) for q, ok in marks]
        blocks.append((image, lines, max(side, LINE * len(lines)) + 12))
    sheet = Image.new("RGB", (side + TEXT_WIDTH + 24, sum(h for _, _, h in blocks)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for image, lines, height in blocks:
        sheet.paste(image.resize((side, side), Image.NEAREST), (6, y + 6))
        for k, (text, colour) in enumerate(lines):
            draw.text((side + 18, y + 6 + k * LINE), text, fill=colour, font=font)
        y += height
        draw.line([(0, y - 1), (sheet.width, y - 1)], fill=(220, 220, 220))
    return sheet
