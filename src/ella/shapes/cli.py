"""The shapes world's commands (``ella shapes reproduce``, ``ella demo``, ``ella generate --model shapes``).

Their flags and defaults live here, beside the world they belong to; ``ella.cli`` imports this module
only when one of these commands runs, so the product's commands never load the toy world.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace

from ..errors import EllaError
from ..sample import SampleSettings, generate_to_dir
from . import models as M
from .recipe import STAGES, Recipe, reproduce

#: ``ella generate --model shapes`` defaults: the size the model was trained at, and the guidance its
#: shapes-DPG scores were measured with.
GUIDANCE = 5.0
#: ``ella generate`` flags that choose real-model parts; the shapes model has its own, fixed.
PRODUCT_ONLY = {
    "init_image": "--init-image",
    "mask": "--mask",
    "controlnet": "--controlnet",
    "control_image": "--control-image",
    "lora": "--lora",
    "base_config": "--base-config",
}


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The flags of ``ella shapes`` / ``ella demo`` (``ella.cli`` calls this only for those commands)."""
    if command == "demo":
        parser.description = (
            "Draws a few held-out shapes-world prompts with the mini model shipped in the package "
            "(no download) and writes one PNG with each question's PASS/FAIL."
        )
        parser.add_argument("--out", default="ella-demo.png")
        parser.add_argument("--model", default=None, help="an exported shapes model dir (default: the packaged one)")
        parser.add_argument("--items", type=int, default=4)
        parser.add_argument("--seed", type=int, default=7)
        parser.add_argument("--steps", type=int, default=25)
        parser.add_argument(
            "--kind", choices=("ella", "base"), default="ella", help="base: the weak-encoder model alone"
        )
        return
    actions = parser.add_subparsers(dest="shapes", metavar="ACTION", required=True)
    rep = actions.add_parser(
        "reproduce",
        help="retrain everything (world, VAE, base UNet, connectors) and score it; resumable",
        description="Every stage writes under --out and is skipped when its output exists, so the same command "
        "resumes an interrupted run. --smoke: a CPU-sized run of every stage (seconds).",
    )
    rep.add_argument("--smoke", action="store_true")
    rep.add_argument("--until", default="eval", choices=STAGES, help="stop after this stage")
    for f in fields(Recipe):
        if f.name == "variants":
            rep.add_argument("--variants", nargs="+", default=None, help=f"default: {' '.join(f.default)}")
        else:
            kind = _yes_no if isinstance(f.default, bool) else float if f.default is None else type(f.default)
            rep.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f"default: {f.default!r}")


def _yes_no(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return run_demo_command(args)
    recipe = Recipe.smoke(args.out or "shapes-smoke") if args.smoke else Recipe()
    given = {f.name: getattr(args, f.name) for f in fields(Recipe) if getattr(args, f.name, None) is not None}
    if "variants" in given:
        given["variants"] = tuple(given["variants"])
    result = reproduce(replace(recipe, **given), until=args.until)
    scores = {k: round(v["overall"], 2) for k, v in result.get("scores", {}).items()}
    print(json.dumps({"scores": scores, "seconds": result["seconds"]}, indent=2))
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.items < 1 or args.steps < 1:
        raise EllaError("--items and --steps must be at least 1")
    result = run_demo(args.out, model=args.model, items=args.items, seed=args.seed, steps=args.steps, kind=args.kind)
    print(
        f"{result['out']}: {result['questions_passed']}/{result['questions']} questions pass "
        f"({result['seconds_per_image']} s per image)"
    )
    return 0


def generate(args: argparse.Namespace, settings: dict) -> int:
    """``ella generate --model shapes|DIR``: the mini model, at the size it was trained for."""
    from .ship import load_shapes_pipeline

    given = [flag for name, flag in PRODUCT_ONLY.items() if getattr(args, name, None)]
    if given:
        raise EllaError(
            f"{', '.join(given)} cannot be used with --model (the shapes model is a fixed text-to-image "
            "pipeline); drop them or use --base/--ella/--llm"
        )
    defaults = {"guidance": GUIDANCE, "width": M.RESOLUTION, "height": M.RESOLUTION}
    settings = SampleSettings(**{**settings, **{k: v for k, v in defaults.items() if settings.get(k) is None}})
    settings.validate()
    pipe = load_shapes_pipeline(None if args.model == "shapes" else args.model, device=args.device or "cpu")
    for path in generate_to_dir(pipe, args.prompt, settings, args.out, {"model": args.model}):
        print(path)
    return 0
