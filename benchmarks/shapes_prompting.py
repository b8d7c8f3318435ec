#!/usr/bin/env python
"""Prompting features in the shapes world, where an oracle can say what each image got right.

Three parts, all with the shipped shapes model (MiniLM + its TSC), held-out evaluation scenes, CPU-friendly:

* **weights**: in 4-object scenes, the colour word of one object is up-weighted, ``a (blue:W) cross``, for
  several ``W``; measured per ``W``: that object's colour question (the shapes-DPG oracle), every question of
  the scene (what it costs the rest), and the share of the image's pixels in that colour;
* **editing**: ``[a red square:a blue circle:W]`` for several switch points ``W`` (a picture grid);
* **long prompts**: a prompt whose last object lies past 128 LLM tokens, at ``max_length=128`` (cut, with the
  warning naming the dropped words) and ``max_length=None`` (whole); a picture pair, and the oracle's verdict.

    PYTHONPATH=src python benchmarks/shapes_prompting.py --out benchmarks/shapes      # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ella.io import atomic_path
from ella.shapes import models as M
from ella.shapes.captions import prompt_for
from ella.shapes.evaluate import EVAL_SEED_OFFSET
from ella.shapes.oracle import ShapesOracle
from ella.shapes.questions import questions
from ella.shapes.ship import load_shapes_pipeline
from ella.shapes.world import COLOURS, scene_for

SCALE = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out", help="folder for the JSON and the pictures")
    p.add_argument("--items", type=int, default=96, help="4-object scenes in the weights experiment")
    p.add_argument("--weights", default="1.0,1.5,2.0,3.0", help="the first is the reference")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def draw(pipe, prompts: list[str], seeds: list[int], args) -> list[Image.Image]:
    images = []
    for i in range(0, len(prompts), args.batch):
        chunk = prompts[i : i + args.batch]
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + args.batch]]
        images += pipe(
            chunk, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens, height=64, width=64
        ).images
    return images


def colour_share(image: Image.Image, colour: str, tolerance: float = 60.0) -> float:
    rgb = np.asarray(image.convert("RGB"), np.float32)
    return float((np.linalg.norm(rgb - np.array(COLOURS[colour], np.float32), axis=-1) < tolerance).mean())


def weights_experiment(pipe, oracle, args) -> dict:
    """Per weight: the weighted object's colour pass rate, all questions' pass rate, and its colour's pixel share."""
    weights = [float(w) for w in args.weights.split(",")]
    items = []
    for i in range(10 * args.items):
        if len(items) == args.items:
            break
        seed = EVAL_SEED_OFFSET + args.seed
        caption, scene = prompt_for(seed, i, "train", n_objects=4), scene_for(seed, i, 4)
        groups = scene.groups()
        for g in groups:  # the first group whose colour word names it alone and appears once
            if (
                sum(h.colour == g.colour for h in groups) == 1
                and len(re.findall(rf"\b{g.colour}\b", caption.text)) == 1
            ):
                asked = questions(scene, caption.specified)
                mine = [
                    q.question for q in asked if oracle.parse(q.question) == ("colour", {"a": g.shape, "v": g.colour})
                ]
                if mine:
                    items.append((caption.text, g, [q.question for q in asked], mine[0], i))
                break
    rows, drawn, passed, shares = {}, {}, {}, {}
    for w in weights:
        prompts = [re.sub(rf"\b{g.colour}\b", f"({g.colour}:{w:g})", text) for text, g, *_ in items]
        images = draw(pipe, prompts, [args.seed + k for k in range(len(items))], args)
        own = [oracle(img, q) == "yes" for img, (_, _, _, q, _) in zip(images, items)]
        every = [oracle(img, q) == "yes" for img, (_, _, qs, _, _) in zip(images, items) for q in qs]
        share = [colour_share(img, g.colour) for img, (_, g, *_) in zip(images, items)]
        rows[f"{w:g}"] = {
            "weighted_colour_pass": round(100 * float(np.mean(own)), 1),
            "all_questions_pass": round(100 * float(np.mean(every)), 1),
            "colour_pixel_share": round(100 * float(np.mean(share)), 2),
        }
        drawn[w], passed[w], shares[w] = images, own, share
        print(f"weight {w:g}: {json.dumps(rows[f'{w:g}'])}", flush=True)
    # the picture: the scene whose weighted colour gained the most pixels from the first weight to the last
    low, high = weights[0], weights[-1]
    k = int(np.argmax(np.array(shares[high]) - np.array(shares[low])))
    example = [(drawn[w][k], f"({items[k][1].colour}:{w:g})") for w in weights]
    fixed = sum(not passed[low][j] and passed[high][j] for j in range(len(items)))
    broken = sum(passed[low][j] and not passed[high][j] for j in range(len(items)))
    return {
        "items": len(items),
        "n_objects": 4,
        "by_weight": rows,
        f"fixed_at_{high:g}": fixed,
        f"broken_at_{high:g}": broken,
        "example_prompt": items[k][0],
        "_example": example,
    }


def editing_grid(pipe, args) -> tuple[list, str]:
    template = "background white; large [red square:blue circle:{w}], center"
    whens = ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    prompts = [template.format(w=w) for w in whens]
    images = draw(pipe, prompts, [args.seed] * len(prompts), args)
    return [(img, f"when {w}") for img, w in zip(images, whens)], template


def long_prompt(pipe, oracle, args) -> dict:
    filler = " ".join(["The background is white."] * 30)  # 30 x 5 = 150 tokens that say nothing new
    prompt = f"{filler} A large red square is in the center."
    n = len(pipe.llm_tokenizer(prompt)["input_ids"])
    out = {"prompt_tokens": n, "question": "Is the square red?"}
    cells = []
    for max_length in (128, None):
        pipe.register_to_config(llm_max_length=max_length)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (image,) = draw(pipe, [prompt], [args.seed], args)
        name = "128" if max_length else "none"
        out[f"max_length_{name}"] = {
            "square_red": oracle(image, "Is the square red?"),
            "warning": next((str(w.message) for w in caught if "dropped" in str(w.message)), None),
        }
        cells.append((image, f"max_length={max_length}"))
    pipe.register_to_config(llm_max_length=M.LLM_MAX_LENGTH)
    return out, cells


def strip(cells: list[tuple[Image.Image, str]], title: str, path: Path) -> None:
    """Images in a row, each enlarged (nearest) with its label under it, the title above."""
    side = 64 * SCALE
    sheet = Image.new("RGB", (len(cells) * (side + 8) + 8, side + 48), "white")
    pen = ImageDraw.Draw(sheet)
    pen.text((8, 4), title[:160], fill="black")
    for k, (img, label) in enumerate(cells):
        x = 8 + k * (side + 8)
        sheet.paste(img.resize((side, side), Image.NEAREST), (x, 20))
        pen.text((x, 24 + side), label, fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = load_shapes_pipeline()
    oracle = ShapesOracle()
    weights = weights_experiment(pipe, oracle, args)
    strip(weights.pop("_example"), weights["example_prompt"][:150], out / "prompting-weights.png")
    edits, template = editing_grid(pipe, args)
    strip(edits, template, out / "prompting-editing.png")
    long, cells = long_prompt(pipe, oracle, args)
    strip(
        cells, "30 x 'The background is white.' then 'A large red square is in the center.'", out / "prompting-long.png"
    )
    report = {
        "command": " ".join(sys.argv),
        "model": "shipped shapes TSC (MiniLM)",
        "steps": args.steps,
        "guidance": args.guidance,
        "weights": weights,
        "editing_template": template,
        "long_prompt": long,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    with atomic_path(out / "prompting.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
