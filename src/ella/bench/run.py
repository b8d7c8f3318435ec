"""``ella bench dpg generate | score | compare``: wiring the pieces together for the command line.

Both generate and score shard over processes when started with ``accelerate launch`` (one process
per GPU): generation writes disjoint files; scoring gathers the per-item records on the main
process, which aggregates and writes the report.

Every flag is checked before any model or VQA model loads: a typo costs one line, not a load.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from ..devices import check_device
from ..errors import EllaError, require
from ..loading import load_pipeline, load_plain_pipeline
from .data import Benchmark, benchmark_prompts, item_sort_key, load_benchmark
from .dpg import aggregate, find_image, score_items
from .generate import TILES, generate_grids, shard_items
from .report import compare as compare_results
from .report import load_result, to_markdown, write_report
from .vqa import CachedVQA, load_vqa

#: torch generators take seeds below 2**64, and tile k of every item uses seed + k.
MAX_SEED = 2**64 - TILES


def _state(device: str | None) -> PartialState:
    """This process's rank/world (from ``accelerate launch`` or ``torchrun``); CPU runs need ``cpu=True``
    for accelerate to see a multi-process CPU launch."""
    return PartialState(cpu=(device or "").startswith("cpu") or not torch.cuda.is_available())


def _folder_flag(flag: str, path: Path) -> None:
    """A folder we will write into must not be an existing file (``mkdir`` would fail after the work)."""
    if path.exists() and not path.is_dir():
        raise EllaError(f"{flag} {path} is a file; expected a folder (it is created if missing)")


def check_generate_args(args: argparse.Namespace) -> None:
    """Refuse flags that would silently do something else (``--limit -1`` drops the last item) or fail late."""
    if args.limit is not None and args.limit < 1:
        raise EllaError(f"--limit must be at least 1 (the first N items); got {args.limit}")
    if args.tile_size < 8 or args.tile_size % 8:
        raise EllaError(f"--tile-size must be a positive multiple of 8 (the VAE's downscale); got {args.tile_size}")
    if args.steps < 1:
        raise EllaError(f"--steps must be at least 1; got {args.steps}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise EllaError(f"--guidance must be a finite number >= 0; got {args.guidance}")
    if not 0 <= args.seed <= MAX_SEED:
        raise EllaError(
            f"--seed must be from 0 to 2**64 - {TILES} (tile k of every item uses seed + k); got {args.seed}"
        )
    _folder_flag("--out", Path(args.out))
    if args.device is not None:
        check_device(args.device)


def generate(args: argparse.Namespace) -> int:
    check_generate_args(args)
    prompts = benchmark_prompts(args.benchmark)
    if args.limit is not None:
        keep = sorted(prompts, key=item_sort_key)[: args.limit]
        prompts = {k: prompts[k] for k in keep}
    state = _state(args.device)
    device = args.device or str(state.device)
    if args.pipeline == "plain":
        pipe = load_plain_pipeline(args.base, device=device, dtype=args.dtype, scheduler=args.scheduler)
        models = {"pipeline": "plain", "base": str(args.base)}
    else:
        pipe = load_pipeline(
            args.base,
            args.ella,
            args.llm,
            device=device,
            dtype=args.dtype,
            llm_dtype=args.dtype,
            scheduler=args.scheduler,
            max_length=args.max_length,
            flexible=args.flexible,
            hidden_layer=args.llm_layer,
            llm_quantization=args.llm_quantization,
            llm_tokenizer=args.llm_tokenizer,
        )
        models = {
            "pipeline": "ella",
            "base": str(args.base),
            "ella": str(args.ella),
            "llm": str(args.llm),
            "llm_tokenizer": args.llm_tokenizer,
            "llm_quantization": args.llm_quantization,
            "llm_max_length": args.max_length,
            "llm_flexible": args.flexible,
            "llm_layer": args.llm_layer,
        }
    pipe.set_progress_bar_config(disable=True)
    settings = {
        "benchmark": args.benchmark,
        **models,
        "scheduler": type(pipe.scheduler).__name__,
        "dtype": str(pipe.unet.dtype),
        "base_seed": args.seed,
        "limit": args.limit,
    }
    call = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "negative_prompt": args.negative}
    written = generate_grids(
        pipe,
        prompts,
        args.out,
        settings=settings,
        base_seed=args.seed,
        tile_size=args.tile_size,
        call_kwargs=call,
        shard=(state.process_index, state.num_processes),
        is_main=state.is_main_process,
    )
    print(f"wrote {len(written)} grids to {args.out} (shard {state.process_index}/{state.num_processes})")
    return 0


def check_score_args(args: argparse.Namespace) -> Benchmark:
    """Everything ``score`` can refuse without a model: the folders, the chart's extra, the question file,
    and that the images folder holds at least one of the benchmark's grids. Returns the benchmark."""
    images = Path(args.images)
    if not images.exists():
        raise EllaError(f"images folder {images} does not exist; expected a folder of <item_id>.png 2x2 grids")
    if not images.is_dir():
        raise EllaError(f"{images} is a file; expected a folder of <item_id>.png 2x2 grids")
    if args.out:
        _folder_flag("--out", Path(args.out))
    else:
        _folder_flag("the report folder", images / "report")
    if args.cache:
        _folder_flag("--cache", Path(args.cache))
    require("matplotlib", "bench")  # the report's chart: known now, not after hours of VQA
    if args.device is not None:
        check_device(args.device)
    bench = load_benchmark(args.benchmark, args.csv, official_compat=args.official_compat)
    if not any(find_image(images, item_id) for item_id in bench.questions):
        example = sorted(bench.questions, key=item_sort_key)[0]
        raise EllaError(
            f"{images} holds none of the {len(bench.questions)} {bench.name} grids (e.g. {example}.png); "
            f"make them with `ella bench dpg generate --benchmark {bench.name} --out {images}`"
        )
    return bench


def score(args: argparse.Namespace) -> int:
    bench = check_score_args(args)
    images = Path(args.images)
    state = _state(args.device)
    vqa = CachedVQA(
        load_vqa(args.vqa, device=args.device or str(state.device)),
        Path(args.cache) if args.cache else images / ".vqa-cache",
        writer=f"rank{state.process_index}" if state.num_processes > 1 else "",
    )
    ids = shard_items(list(bench.questions), state.process_index, state.num_processes)
    items, errors = score_items(
        bench,
        images,
        vqa,
        official_compat=args.official_compat,
        tiles=args.tiles,
        item_ids=ids,
        progress=state.is_main_process,
    )
    all_items = {k: v for part in gather_object([items]) for k, v in part.items()}
    all_errors = [e for part in gather_object([errors]) for e in part]
    if not state.is_main_process:
        return 0
    result = aggregate(
        bench, all_items, sorted(all_errors, key=lambda e: e["item_id"]), official_compat=args.official_compat
    )
    result["settings"].update({"images": str(images), "vqa": vqa.name, "tiles": args.tiles})
    paths = write_report(result, Path(args.out) if args.out else images / "report")
    print(to_markdown(result))
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


def compare(args: argparse.Namespace) -> int:
    print(
        compare_results(
            load_result(args.a),
            load_result(args.b),
            names=(Path(args.a).parent.name or args.a, Path(args.b).parent.name or args.b),
        )
    )
    return 0
