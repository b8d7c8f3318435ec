"""The shapes world's commands (``ella shapes reproduce``, ``ella demo``, ``ella generate --model shapes``).

Their flags and defaults live here, beside the world they belong to; ``ella.cli`` imports this module
only when one of these commands runs, so the product's commands never load the toy world.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from dataclasses import fields, replace

from ..errors import EllaError
from ..sample import SampleSettings, generate_to_dir
from . import models as M
from .demo import run_demo
from .language import warn_unknown_words
from .recipe import STAGES, Recipe, reproduce
from .ship import load_shapes_pipeline

#: ``ella generate --model shapes`` defaults: the size the model was trained at, and the guidance its
#: shapes-DPG scores were measured with.
GUIDANCE = 5.0
#: ``ella generate`` flags the fixed shapes model has no use for: it is one text-to-image pipeline with its
#: own base, connector, LLM (MiniLM at 128 tokens), scheduler and precision. ``ella.cli`` leaves each of
#: these None/False/[] unless the user gave it, so a given one is refused rather than silently ignored.
PRODUCT_ONLY = {
    "init_image": "--init-image",
    "strength": "--strength",
    "mask": "--mask",
    "controlnet": "--controlnet",
    "control_image": "--control-image",
    "lora": "--lora",
    "base_config": "--base-config",
    "base": "--base",
    "ella": "--ella",
    "llm": "--llm",
    "llm_layer": "--llm-layer",
    "llm_tokenizer": "--llm-tokenizer",
    "llm_quantization": "--llm-quantization",
    "scheduler": "--scheduler",
    "dtype": "--dtype",
    "max_length": "--max-length",
    "flexible": "--flexible",
    "fast": "--fast",  # compiling costs a minute; the shapes model draws an image in ~1.5 s on a CPU
    "low_vram": "--low-vram",  # 28 MB of weights: nothing to save
    "llm_device": "--llm-device",
}


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The flags of ``ella shapes`` / ``ella demo`` (``ella.cli`` calls this only for those commands)."""
    if command == "demo":
        parser.description = (
            "Draws a few held-out shapes-world prompts with the mini model shipped in the package "
            "(no download) and writes one PNG with each question's PASS/FAIL."
        )
        parser.add_argument("--out", default="ella-demo.png", help="the PNG to write (default: ella-demo.png)")
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
        "resumes an interrupted run. --smoke: a CPU-sized run of every stage (seconds). On several GPUs: "
        "torchrun --nproc_per_node N -m ella.cli shapes reproduce ... (every stage data-parallel; batches are global).",
    )
    rep.add_argument("--smoke", action="store_true")
    rep.add_argument("--until", default="eval", choices=STAGES, help="stop after this stage")
    # Every flag parses as None unless given, so the smoke recipe's values stand where no flag overrides them.
    hints = typing.get_type_hints(Recipe)
    for f in fields(Recipe):
        flag, kind = f"--{f.name.replace('_', '-')}", _flag_type(hints[f.name])
        if kind is tuple:
            item = typing.get_args(_required(hints[f.name]))[0]  # tuple[int, ...] -> int
            default = "none" if f.default is None else " ".join(map(str, f.default))
            rep.add_argument(flag, nargs="+", type=item, default=None, help=f"default: {default}")
        else:
            rep.add_argument(flag, type=kind, default=None, help=f"default: {DEFAULT_HELP.get(f.name, f.default)}")


#: How the defaults that are decided at run time read in ``--help``.
DEFAULT_HELP = {
    "device": "auto (cuda if this machine has a GPU, else cpu)",
    "compile": "auto (on with CUDA, off on CPU)",
    "stop_at": "none (run every step)",
}


def _flag_type(hint) -> typing.Callable[[str], object] | type:
    """The parser for a Recipe field's annotation (``bool | None`` -> true/false, ``float | None`` -> float ...)."""
    kind = _required(hint)
    if typing.get_origin(kind) is tuple:
        return tuple
    return _yes_no if kind is bool else kind


def _required(hint):
    """``X | None`` -> ``X``; any other annotation as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    (kind,) = args
    return kind


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
    hints = typing.get_type_hints(Recipe)
    for name in given:
        if _flag_type(hints[name]) is tuple:  # argparse gives lists
            given[name] = tuple(given[name])
    result = reproduce(replace(recipe, **given), until=args.until)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch, say it once
        scores = {k: round(v["overall"], 2) for k, v in result.get("scores", {}).items()}
        print(json.dumps({"scores": scores, "seconds": result["seconds"]}, indent=2))
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    result = run_demo(args.out, model=args.model, items=args.items, seed=args.seed, steps=args.steps, kind=args.kind)
    print(
        f"{result['out']}: {result['questions_passed']}/{result['questions']} questions pass "
        f"({result['seconds_per_image']} s per image)"
    )
    return 0


def check_generate_flags(args: argparse.Namespace) -> None:
    """Refuse, in one line, every flag of ``ella generate`` that the fixed shapes model would ignore."""
    given = [flag for name, flag in PRODUCT_ONLY.items() if _given(getattr(args, name, None))]
    if getattr(args, "mode", "ella") != "ella":
        given.append(f"--mode {args.mode}")
    if given:
        raise EllaError(
            f"{', '.join(given)} cannot be used with --model (the shapes model is a fixed text-to-image pipeline "
            "with its own base, connector, LLM, scheduler and precision); drop them, or drop --model to use "
            "the released ELLA"
        )
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and value != M.RESOLUTION:
            raise EllaError(
                f"{flag} {value}: the shapes model draws only the {M.RESOLUTION}x{M.RESOLUTION} images it was "
                f"trained on; drop {flag} (or pass {M.RESOLUTION})"
            )


def _given(value: object) -> bool:
    """Whether the user gave a flag the parser leaves None / False / [] otherwise (``--strength 0`` counts)."""
    return value is not None and value is not False and not (isinstance(value, list) and not value)


def generate(args: argparse.Namespace, settings: dict) -> int:
    """``ella generate --model shapes|DIR``: the mini model, at the size it was trained for."""
    check_generate_flags(args)
    defaults = {"guidance": GUIDANCE, "width": M.RESOLUTION, "height": M.RESOLUTION}
    settings = SampleSettings(**{**settings, **{k: v for k, v in defaults.items() if settings.get(k) is None}})
    settings.validate(len(args.prompt))
    warn_unknown_words(args.prompt)
    pipe = load_shapes_pipeline(None if args.model == "shapes" else args.model, device=args.device or "cpu")
    generate_to_dir(pipe, args.prompt, settings, args.out, {"model": args.model}, on_saved=print)
    return 0
