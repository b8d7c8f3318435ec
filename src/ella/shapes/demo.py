"""``ella demo``: the shipped mini ELLA draws a few dense prompts, and the oracle marks every question.

One row per prompt: the image (enlarged, nearest-neighbour so pixels stay honest) beside the prompt
and its question graph, each question PASS (green) or FAIL (red) as the shapes-DPG judge sees it.
Runs offline on a CPU in seconds.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_path

SCALE = 3  # 64 px -> 192 px
LINE = 14
TEXT_WIDTH = 560


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
    from .evaluate import EVAL_SEED_OFFSET
    from .oracle import ShapesOracle
    from .questions import shapes_benchmark
    from .ship import load_shapes_pipeline

    t0 = time.perf_counter()
    pipe = load_shapes_pipeline(model, kind=kind)
    benchmark, _ = shapes_benchmark(items, seed + EVAL_SEED_OFFSET, n_objects=None)
    oracle = ShapesOracle()
    rows, t_gen = [], time.perf_counter()
    for i, (item_id, prompt) in enumerate(benchmark.prompts.items()):
        image = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(seed + i),
        ).images[0]
        marks = [(q.question, oracle(image, q.question) == "yes") for q in benchmark.questions[item_id]]
        rows.append((image, prompt, marks))
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
    side = 64 * SCALE
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
