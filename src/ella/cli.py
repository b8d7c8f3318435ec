"""``ella`` command line: argument parsing and printing only; the work is in the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from . import __version__
from .errors import EllaError
from .hub import DEFAULT_BASE, DEFAULT_ELLA_REPO, DEFAULT_LLM
from .llm import QUANT_LOGGERS
from .sample import DEFAULT_BATCH, DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_SIZE, DEFAULT_STEPS
from .schedulers import SCHEDULER_ALIASES
from .text import DEFAULT_MAX_LENGTH

#: Commands whose flags and work live in the shapes package (the toy world), not in the product.
SHAPES_COMMANDS = {
    "shapes": "the shapes world: a complete mini ELLA trained from scratch",
    "demo": "offline: the shipped mini ELLA draws dense prompts, each question marked",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``ella`` parser. ``argv`` tells which command will run: only the shapes world's own commands
    import ``ella.shapes`` (to add their flags), so ``ella generate`` never loads the toy world."""
    parser = argparse.ArgumentParser(
        prog="ella",
        description="ELLA: an LLM's language understanding for Stable Diffusion, through a small connector.",
    )
    parser.add_argument("--version", action="version", version=f"ella-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate images from prompts",
        description="Generate images; writes PNGs and a JSON sidecar per image with every setting. "
        "Defaults follow the official inference.py (DPM-Solver++, 50 steps, 512x512, guidance 12, seed 1001).",
    )
    gen.add_argument("prompt", nargs="+", help="one or more prompts (dense, detailed prompts are ELLA's strength)")
    gen.add_argument("--negative", default="", help="negative prompt (default: empty, as released)")
    gen.add_argument(
        "--no-prompt-weights",
        action="store_true",
        help="read (word:1.3) / [word] emphasis as before prompt weights existed: markup removed, no weights",
    )
    gen.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"CFG scale (default {DEFAULT_GUIDANCE}, shapes model 5; lower, e.g. 7, blurs less)",
    )
    gen.add_argument("--seed", type=int, default=DEFAULT_SEED, help="image k uses seed + k")
    gen.add_argument("--width", type=int, default=None, help=f"default {DEFAULT_SIZE} (shapes model: 64)")
    gen.add_argument("--height", type=int, default=None, help=f"default {DEFAULT_SIZE} (shapes model: 64)")
    gen.add_argument(
        "--model",
        default=None,
        help="'shapes' (the mini ELLA shipped in the package) or an exported shapes model dir; "
        "replaces --base/--ella/--llm",
    )
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"images per pipeline call (default {DEFAULT_BATCH}); each batch is saved as soon as it is done",
    )
    gen.add_argument("--out", default="ella-out", help="output directory (default: ./ella-out)")
    tools = gen.add_argument_group("community tools")
    tools.add_argument(
        "--mode",
        choices=("ella", "ella+clip"),
        default="ella",
        help="ella+clip: the base's CLIP tokens (77) beside ELLA's (64), so LoRA trigger words and "
        "textual inversions work",
    )
    tools.add_argument(
        "--clip-prompt",
        default=None,
        help="with --mode ella+clip: CLIP's own text (trigger words, tags, TI tokens; default: the prompt), "
        "while the LLM reads the prompt",
    )
    tools.add_argument("--negative-clip-prompt", default=None, help="with --mode ella+clip: CLIP's negative text")
    tools.add_argument(
        "--init-image", default=None, help="img2img: start from this image (resized to --width/--height)"
    )
    tools.add_argument(
        "--strength",
        type=float,
        default=None,
        help="img2img/inpainting: 1.0 = from noise, lower keeps more of --init-image (default 0.8)",
    )
    tools.add_argument("--mask", default=None, help="inpainting: white = repaint, black = keep (needs --init-image)")
    tools.add_argument("--controlnet", default=None, help="a diffusers ControlNet (dir or hub id)")
    tools.add_argument("--control-image", default=None, help="the ControlNet's input image (edges, depth, pose ...)")
    tools.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a diffusers/kohya LoRA .safetensors (or dir), repeatable; SCALE defaults to 1.0",
    )
    gen.add_argument(
        "--base-config",
        default=None,
        help="single-file --base only: diffusers dir or hub id with its "
        "component configs (default: inferred from the file, SD 1.5 for SD 1.x)",
    )
    add_model_flags(gen)
    speed = gen.add_argument_group("speed and memory")
    speed.add_argument(
        "--fast",
        action="store_true",
        help="compile the UNet, VAE decoder and LLM with CUDA graphs and fused QKV (the first image waits for "
        "the compile, cached for later runs; images equal up to fp16 rounding)",
    )
    speed.add_argument(
        "--low-vram",
        action="store_true",
        help="keep only the running model on the GPU (LLM, connector, UNet, VAE take turns; VAE sliced, and "
        "tiled above its native size); same images, one weight transfer per model per call",
    )
    speed.add_argument(
        "--llm-device", default=None, metavar="DEVICE", help="with --low-vram: 'cpu' keeps the LLM on the CPU"
    )
    add_bench_parser(sub)
    add_train_parsers(sub)
    add_serve_parser(sub)
    command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    for name, summary in SHAPES_COMMANDS.items():
        shapes_parser = sub.add_parser(name, help=summary)
        if name == command:
            from .shapes.cli import add_arguments

            add_arguments(name, shapes_parser)
    return parser


#: The model flags' defaults. They are parsed as None and filled in by ``model_defaults`` so that a command
#: can tell a flag the user gave from one left at its default (``generate --model shapes`` refuses the former).
MODEL_DEFAULTS = {
    "base": DEFAULT_BASE,
    "ella": DEFAULT_ELLA_REPO,
    "llm": DEFAULT_LLM,
    "dtype": "auto",
    "max_length": DEFAULT_MAX_LENGTH,
    "scheduler": "dpm++",
}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help=f"diffusers dir, hub id or single .safetensors/.ckpt file (default: {DEFAULT_BASE})")
    p.add_argument(
        "--ella", help=f"official .safetensors, save_pretrained dir, or hub id (default: {DEFAULT_ELLA_REPO})"
    )
    p.add_argument(
        "--llm",
        help=f"any HF encoder / T5 / decoder-only LM, dir or hub id, or a single .safetensors of T5 encoder weights "
        f"(default: {DEFAULT_LLM})",
    )
    p.add_argument(
        "--llm-tokenizer",
        default=None,
        help="tokenizer folder or hub id for an --llm without one, e.g. a single .safetensors "
        "(default: google/flan-t5-xl)",
    )
    p.add_argument(
        "--llm-quantization",
        default=None,
        metavar="{int8,fp8,nf4}",
        help="quantise the LLM's weights as they load: int8/fp8 (torchao) or nf4 (bitsandbytes); "
        "needs ella-diffusion[quant]",
    )
    p.add_argument(
        "--llm-layer",
        type=llm_layers_value,
        default=None,
        help="hidden layer(s) to read: -2, or -1,-6,-12 (concatenated; default: the last, or the connector's own)",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", help="auto (fp16 on CUDA, fp32 on CPU; the default), float16, bfloat16, float32")
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--max-length",
        type=max_length_value,
        help=f"fixed mode: pad to this many LLM tokens (default: {DEFAULT_MAX_LENGTH}); 'none': each prompt whole",
    )
    length.add_argument("--flexible", action="store_true", help="flexible mode: each prompt at its own length")
    p.add_argument("--scheduler", help=f"{', '.join(SCHEDULER_ALIASES)} or a diffusers class name (default: dpm++)")


def llm_layers_value(text: str) -> int | list[int]:
    """``--llm-layer``: one layer index, or several separated by commas (their states concatenated)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer index or a comma-separated list, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def max_length_value(text: str) -> int | str:
    """``--max-length``: a whole number of tokens >= 1, or ``none`` (no truncation)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 token (or 'none'), got {value}")
    return value


def model_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the model flags the user left out with :data:`MODEL_DEFAULTS`."""
    for name, value in MODEL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: DPG-Bench and DSG-1k")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    dpg = bench_sub.add_parser("dpg", help="DPG-Bench / DSG-1k: generate grids, score them with a VQA model, compare")
    dpg_sub = dpg.add_subparsers(dest="action", metavar="ACTION", required=True)

    gen = dpg_sub.add_parser(
        "generate",
        help="one 2x2 grid <item_id>.png per prompt (resumable; shard with `accelerate launch`)",
        description="Tile k uses seed + k. Finished items are skipped; run under `accelerate launch` to shard.",
    )
    gen.add_argument("--out", required=True, help="image folder (a manifest.json is written beside the images)")
    gen.add_argument("--benchmark", default="dpg", choices=["dpg", "dsg1k"])
    gen.add_argument("--pipeline", default="ella", choices=["ella", "plain"], help="ours, or plain diffusers SD")
    gen.add_argument("--seed", type=int, default=0, help="tile k of every item uses seed + k")
    gen.add_argument("--tile-size", type=int, default=512)
    gen.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    gen.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    gen.add_argument("--negative", default="")
    gen.add_argument("--limit", type=int, default=None, help="only the first N items (smoke runs)")
    add_model_flags(gen)

    score = dpg_sub.add_parser("score", help="score a grid folder with the official protocol (fixed defects)")
    score.add_argument("images", help="folder of <item_id>.png 2x2 grids")
    score.add_argument("--csv", default=None, help="dpg_bench.csv (DPG-Bench; DSG-1k's file is packaged)")
    score.add_argument("--benchmark", default="dpg", choices=["dpg", "dsg1k"])
    score.add_argument("--vqa", default="mplug", help="mplug (official), blip[:ID], vlm:ID, mplug:ID")
    score.add_argument("--official-compat", action="store_true", help="reproduce the official script's defects")
    score.add_argument("--tiles", type=int, default=4, choices=[1, 2, 3, 4], help="tiles per grid to score")
    score.add_argument("--cache", default=None, help="VQA answer cache folder (default: IMAGES/.vqa-cache)")
    score.add_argument("--out", default=None, help="report folder (default: IMAGES/report)")
    score.add_argument("--device", default=None)

    cmp = dpg_sub.add_parser("compare", help="two report.json files side by side, with deltas")
    cmp.add_argument("a")
    cmp.add_argument("b")


def add_train_parsers(sub) -> None:
    from .train.config import add_train_flags

    train = sub.add_parser(
        "train",
        help="train an ELLA connector (multi-GPU: accelerate launch -m ella.cli train ...)",
        description="Train a connector between a frozen LLM and a frozen SD1.5/SDXL-style UNet. Every key of "
        "--config run.yaml is also a flag; flags win. Defaults are the paper's recipe.",
    )
    add_train_flags(train)
    cache = sub.add_parser(
        "cache",
        help="precompute VAE latents (and optionally LLM features) for training",
        description="Encode a dataset once so training skips the VAE (and with --features the LLM). "
        "Point `ella train --train_data_dir` at the output directory. A re-run resumes an interrupted job and "
        "rewrites only missing or damaged shards. Several processes (GPUs) split the shards: "
        "`torchrun --nproc_per_node N -m ella.cli cache ...` or `accelerate launch -m ella.cli cache ...`; "
        "the files are the same whatever N.",
    )
    cache.add_argument("--output", required=True, help="cache directory to write")
    cache.add_argument(
        "--format",
        choices=("safetensors", "webdataset"),
        default="safetensors",
        help="safetensors (default): random access, so training shuffles exactly per epoch; webdataset: .tar "
        "shards streamed in a per-epoch shard order, for object stores, slow disks and sets too big for random "
        "access",
    )
    for name in ("train_data_dir", "dataset_name"):
        cache.add_argument(f"--{name}", default=None)
    cache.add_argument("--image_column", default="image")
    cache.add_argument("--caption_column", default="text")
    cache.add_argument("--dataset_split", default="train")
    cache.add_argument("--pretrained_model_name_or_path", default=DEFAULT_BASE, help="base whose VAE encodes")
    cache.add_argument("--resolution", type=int, default=512)
    cache.add_argument("--center_crop", action="store_true")
    cache.add_argument("--random_flip", action="store_true")
    cache.add_argument("--features", action="store_true", help="also cache LLM features (512 KB/sample for T5-XL)")
    cache.add_argument("--llm_name_or_path", default=DEFAULT_LLM)
    cache.add_argument("--llm_max_length", type=int, default=DEFAULT_MAX_LENGTH)
    cache.add_argument("--batch_size", type=int, default=16)
    cache.add_argument(
        "--shard_size",
        type=int,
        default=1024,
        help="source samples per shard (unreadable ones leave it shorter); a tar source keeps one shard per input tar",
    )
    cache.add_argument("--dataloader_num_workers", type=int, default=2)
    cache.add_argument("--device", default=None)
    cache.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), bfloat16, float32")
    cache.add_argument("--seed", type=int, default=0, help="seeds random crops/flips (fixed once cached)")


def add_serve_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="a web app (gradio) for generating: offline with the shipped shapes model by default",
        description="Starts a gradio app on --host:--port. With no --base/--ella/--llm it serves the real SD1.5 "
        "models when they are in the HF cache, else the shapes model shipped in the package. Needs the [serve] "
        "extra. Scripts call its /generate endpoint with gradio_client.",
    )
    serve.add_argument("--model", default=None, help="'shapes' or a shapes model dir (default: see above)")
    serve.add_argument("--base", default=None, help=f"diffusers dir or hub id (real models; default {DEFAULT_BASE})")
    serve.add_argument("--ella", default=None, help=f"ELLA weights (default {DEFAULT_ELLA_REPO})")
    serve.add_argument("--llm", default=None, help=f"the LLM (default {DEFAULT_LLM})")
    serve.add_argument("--controlnet", default=None, help="a diffusers ControlNet, offered as an input on the page")
    serve.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if available; shapes: cpu)")
    serve.add_argument("--dtype", default=None, help="auto, float16, bfloat16, float32")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--out", default="ella-serve-out", help="where images + sidecars are written (a folder each)")
    serve.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA the page can switch on per request (repeatable; real models)",
    )
    serve.add_argument("--fast", action="store_true", help="compiled inference (see ella generate --fast)")
    serve.add_argument("--low-vram", action="store_true", help="only the running model on the GPU")


def cmd_serve(args: argparse.Namespace) -> int:
    """Everything is checked before any model loads; then the server runs until Ctrl-C / SIGTERM."""
    import importlib.util

    from .devices import check_device
    from .hub import DEFAULT_ELLA_FILE, in_cache
    from .sample import check_out_dir

    if importlib.util.find_spec("gradio") is None:
        raise EllaError("ella serve needs gradio: pip install 'ella-diffusion[serve]'")
    if not 1 <= args.port <= 65535:
        raise EllaError(f"--port must be in 1..65535; got {args.port}")
    if args.fast and args.low_vram:
        raise EllaError("--fast and --low-vram do not combine (see ella generate --help)")
    if args.fast and args.lora:
        raise EllaError("--fast fuses the attention weights, so LoRAs could not be switched per request; drop one")
    from .sample import check_loras

    check_loras(args.lora)
    real = [args.base, args.ella, args.llm]
    if args.model is not None and any(real):
        raise EllaError("--model replaces --base/--ella/--llm; give one or the other")
    check_device(args.device)
    check_out_dir(args.out)
    model = args.model
    if model is None and not any(real):
        cached = (
            in_cache(DEFAULT_BASE, "model_index.json")
            and in_cache(f"{DEFAULT_ELLA_REPO}/{DEFAULT_ELLA_FILE}", DEFAULT_ELLA_FILE)
            and in_cache(DEFAULT_LLM, "config.json")
        )
        model = None if cached else "shapes"
    from .serve.app import serve
    from .serve.backend import Backend

    backend = Backend(
        model=model,
        base=args.base or DEFAULT_BASE,
        ella=args.ella or DEFAULT_ELLA_REPO,
        llm=args.llm or DEFAULT_LLM,
        device=args.device,
        dtype=args.dtype,
        out=args.out,
        controlnet=args.controlnet,
        loras=args.lora,
        fast=args.fast,
        low_vram=args.low_vram,
    )
    serve(backend, host=args.host, port=args.port)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import config_from_args
    from .train.train import main as train_main

    config = config_from_args(args)
    out = train_main(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch, say it once
        print(out / "ella.safetensors")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .train.cache import cache_command

    summary = cache_command(args)
    if summary:  # rank 0 of a multi-process job says it once
        print(summary)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .devices import check_device
    from .loading import load_pipeline
    from .sample import SampleSettings, check_loras, check_out_dir, generate_to_dir, kind_for, load_loras, read_inputs
    from .schedulers import scheduler_class

    for i, prompt in enumerate(args.prompt):
        if not prompt.strip():
            raise EllaError(f"prompt {i} is empty: describe the image")
    check_device(args.device)
    check_out_dir(args.out)
    offload_device = check_speed_flags(args)
    given = dict(
        negative_prompt=args.negative,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        seed=args.seed,
        num_images=args.num_images,
        strength=args.strength,
        condition_mode=args.mode,
        batch_size=args.batch_size,
        clip_prompt=args.clip_prompt,
        negative_clip_prompt=args.negative_clip_prompt,
        prompt_weights=not args.no_prompt_weights,
    )
    if args.model is not None:  # the shapes world's mini model: its own defaults and checks
        from .shapes.cli import generate as generate_shapes

        return generate_shapes(args, given)
    model_defaults(args)
    if args.strength is not None and not args.init_image:
        raise EllaError("--strength applies to img2img/inpainting: give --init-image too, or drop --strength")
    settings = SampleSettings(
        **{
            **given,
            "guidance": DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
            "width": DEFAULT_SIZE if args.width is None else args.width,
            "height": DEFAULT_SIZE if args.height is None else args.height,
            "strength": args.strength if args.strength is not None else (0.8 if args.init_image else None),
        }
    )
    # Everything the user typed is checked here, before loading gigabytes of weights.
    settings.validate(len(args.prompt))
    check_out_dir(args.out, len(args.prompt) * settings.num_images, settings.width, settings.height)
    scheduler_class(args.scheduler)
    loras = check_loras(args.lora)
    kind = kind_for(args.init_image, args.mask, args.controlnet, args.control_image)
    inputs = read_inputs(kind, args.init_image, args.mask, args.control_image, settings.width, settings.height)
    device, dtype = args.device, args.dtype
    if offload_device is not None:  # load on the CPU in the GPU's dtype: loading onto the GPU would hit the full peak
        from .devices import resolve_dtype

        device, dtype = "cpu", resolve_dtype(args.dtype, str(offload_device))
    pipe = load_pipeline(
        args.base,
        args.ella,
        args.llm,
        device=device,
        dtype=dtype,
        llm_dtype=dtype,
        scheduler=args.scheduler,
        max_length=None if args.max_length == "none" else args.max_length,
        flexible=args.flexible,
        hidden_layer=args.llm_layer,
        base_config=args.base_config,
        kind=kind,
        mode=args.mode,
        controlnet=args.controlnet,
        llm_quantization=args.llm_quantization,
        llm_tokenizer=args.llm_tokenizer,
    )
    sources = {
        "base": str(args.base),
        "ella": str(args.ella),
        "llm": str(args.llm),
        "llm_tokenizer": args.llm_tokenizer,
        "llm_quantization": args.llm_quantization,
        "kind": kind,
        "controlnet": args.controlnet,
        "lora": load_loras(pipe, loras),
    }
    if args.fast:  # after the LoRAs: fusing QKV bakes in the attention weights present now
        pipe.enable_fast_inference()
    if offload_device is not None:
        pipe.enable_low_vram(device=offload_device, llm_device=args.llm_device)
    generate_to_dir(pipe, args.prompt, settings, args.out, sources, inputs, on_saved=print)
    return 0


def check_speed_flags(args: argparse.Namespace):
    """``--fast`` / ``--low-vram`` / ``--llm-device``: refuse combinations that cannot work, before loading.

    Returns the device the models take turns on under ``--low-vram`` (a ``torch.device``), else None."""
    if args.llm_device is not None and not args.low_vram:
        raise EllaError("--llm-device applies with --low-vram: add --low-vram, or drop --llm-device")
    if args.fast and args.low_vram:
        raise EllaError(
            "--fast and --low-vram do not combine: CUDA graphs keep the weights at fixed GPU addresses, "
            "low-VRAM mode moves them every call; pick one"
        )
    if not args.low_vram or args.model is not None:  # the shapes model refuses --low-vram itself
        return None
    from .pipelines.memory import check_low_vram

    offload_device, _ = check_low_vram(args.device, args.llm_device)
    if offload_device.type == "cpu":
        raise EllaError("--low-vram saves GPU memory; on the CPU, drop it")
    return offload_device


def cmd_bench(args: argparse.Namespace) -> int:
    if args.action == "generate":
        model_defaults(args)
    from .bench import run as bench_run

    return {"generate": bench_run.generate, "score": bench_run.score, "compare": bench_run.compare}[args.action](args)


def quiet_libraries() -> None:
    """Library chatter (deprecations, loading bars, optional-backend notices) is not for CLI users;
    our own warnings print as one ``ella: warning:`` line each; the sampling progress bar stays."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.formatwarning = lambda message, *args, **kwargs: f"ella: warning: {message}\n"
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    # the variables below only act on a library not imported yet; a shapes command imported both to build its flags
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    # before anything imports transformers or diffusers: their import-time notices are not for CLI users
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in QUANT_LOGGERS:  # diffusers imports torchao / bitsandbytes when installed, and they log at import
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    quiet_libraries()
    try:
        if args.command == "bench":
            return cmd_bench(args)
        if args.command in SHAPES_COMMANDS:
            from .shapes.cli import run

            return run(args)
        commands = {"generate": cmd_generate, "train": cmd_train, "cache": cmd_cache, "serve": cmd_serve}
        return commands[args.command](args)
    except EllaError as err:
        print(f"ella: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what finished is on disk (each batch is saved as it completes)
        print("ella: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
