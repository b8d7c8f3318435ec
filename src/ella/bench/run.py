"""``ella bench dpg generate | score | compare``: wiring the pieces together for the command line.

Both generate and score shard over processes when started with ``accelerate launch`` (one process
per GPU): generation writes disjoint files; scoring gathers the per-item records on the main
process, which aggregates and writes the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import EllaError


def _state(device: str | None):
    """This process's rank/world (from ``accelerate launch`` or ``torchrun``); CPU runs need ``cpu=True``
    for accelerate to see a multi-process CPU launch."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=(device or "").startswith("cpu") or not torch.cuda.is_available())


def generate(args: argparse.Namespace) -> int:
    from ..loading import load_pipeline, load_plain_pipeline
    from .data import benchmark_prompts, item_sort_key
    from .generate import generate_grids

    if args.tile_size % 8:
        raise EllaError(f"--tile-size must be a multiple of 8; got {args.tile_size}")
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
        )
        models = {
            "pipeline": "ella",
            "base": str(args.base),
            "ella": str(args.ella),
            "llm": str(args.llm),
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


def score(args: argparse.Namespace) -> int:
    from accelerate.utils import gather_object

    from .data import load_benchmark
    from .dpg import aggregate, score_items
    from .generate import shard_items
    from .report import to_markdown, write_report
    from .vqa import CachedVQA, load_vqa

    images = Path(args.images)
    if not images.is_dir():
        raise EllaError(f"{images} is not a folder of <item_id>.png grids")
    bench = load_benchmark(args.benchmark, args.csv, official_compat=args.official_compat)
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
    from .report import compare as compare_results
    from .report import load_result

    print(
        compare_results(
            load_result(args.a),
            load_result(args.b),
            names=(Path(args.a).parent.name or args.a, Path(args.b).parent.name or args.b),
        )
    )
    return 0
