#!/usr/bin/env python
"""Fast and low-VRAM ELLA inference against tuned plain diffusers SD1.5, all in one run.

Rows (full-size SD1.5 UNet/VAE, CLIP ViT-L, Flan-T5-XL encoder and the released connector's
architecture, RANDOM weights built by ``bench_inference.build_models``; the timings depend on shapes,
not values):

* ``plain`` / ``ours``                 -- eager, as ``bench_inference.py`` measures them;
* ``plain-compiled``                   -- ``pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")``:
  what most users do (and the fastest of the plain rows in the 2026-11-27 measurements);
* ``plain-fast``                       -- :func:`ella.pipelines.fast.enable_fast_inference` on the *plain*
  pipeline: the same expert recipe (fused QKV, channels-last, inductor flags, compiled UNet + VAE decoder
  with CUDA graphs) that ``ours-fast`` gets, so ours-fast / plain-fast isolates what ELLA itself costs;
* ``ours-fast``                        -- ``EllaStableDiffusionPipeline.enable_fast_inference()``;
* ``ours-low-vram``                    -- ``pipe.enable_low_vram()`` (only the active model on the GPU);
* ``ours-low-vram-llm-cpu``            -- ``pipe.enable_low_vram(llm_device="cpu")`` (the T5 runs on the CPU);
* ``ours-llm-int8``                    -- ours eager with the T5 loaded by ``ella.llm.load_llm(quantization="int8")``
  (torchao weight-only int8; skipped with a note when torchao is missing);
* ``official``                         -- the release's per-step proxy UNet (``bench_inference.OfficialProxyUNet``).

Each compiled row has its own copies of the modules (compiling and fusing change them in place).
Peak memory is measured as the growth of ``torch.cuda.max_memory_allocated`` over what was allocated
before the call, so rows that share a GPU with other rows' weights still report their own peak; for
``ours-low-vram`` that is everything it needs, its weights included (they live on the CPU between uses).
Also reported: the first call of each compiled row (compiling, from whatever the cache held), the
fast image's max pixel difference and PSNR against the eager image of the same seed, and a *warm start*:
a fresh process that builds the same models and times its first fast image with the compile cache
this run filled.

    PYTHONPATH=src python benchmarks/bench_fast.py                 # one GPU, writes $OUT or ./bench-out
    python benchmarks/bench_fast.py --tiny --device cpu --dtype float32 --steps 2 --repeats 1 --no-warm-start
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inference as B  # the model builders and timing helpers of the main benchmark
from ella.errors import EllaError
from ella.io import atomic_path

T0 = time.perf_counter()
CONFIGS = (
    "plain",
    "ours",
    "official",
    "ours-llm-int8",
    "ours-low-vram",
    "ours-low-vram-llm-cpu",
    "plain-compiled",
    "plain-fast",
    "ours-fast",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=None, help="default 512 (64 with --tiny)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--mode", default="reduce-overhead", help="compile mode of the fast rows")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--no-warm-start", action="store_true")
    p.add_argument("--warm-start-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, default=460.0, help="repeats shrink (to >= 1) to fit")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 512)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = set(args.configs) - set(CONFIGS)
    if bad:
        p.error(f"unknown configs {sorted(bad)}; choose from {', '.join(CONFIGS)}")
    return args


def copies(m: dict, names: tuple[str, ...], device) -> dict:
    """Independent copies of ``names`` on ``device`` (compiling, fusing and offload hooks change modules)."""
    return {n: copy.deepcopy(m[n]).to(device) for n in names}


def build(m: dict, args, device) -> dict:
    """Every requested row, as ``name -> constructor``: each row is built just before its first call, so that
    enable_fast_inference's process-wide inductor flags are not yet set when plain-compiled compiles."""
    from diffusers import StableDiffusionPipeline

    import ella

    def plain_pipe(unet, vae, clip):
        return StableDiffusionPipeline(
            vae=vae,
            unet=unet,
            text_encoder=clip,
            tokenizer=m["clip_tok"],
            scheduler=copy.deepcopy(m["scheduler"]),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def ours_pipe(unet, vae, t5, connector):
        return ella.EllaStableDiffusionPipeline(
            vae=vae,
            unet=unet,
            text_encoder=None,
            tokenizer=None,
            scheduler=copy.deepcopy(m["scheduler"]),
            connector=connector,
            llm=t5,
            llm_tokenizer=m["t5_tok"],
        )

    def low_vram(llm_device=None):  # its models start on the CPU, copies so that the hooks touch no other row
        c = copies(m, ("unet", "vae", "t5", "connector"), "cpu")
        pipe = ours_pipe(c["unet"], c["vae"], c["t5"], c["connector"])
        pipe.enable_low_vram(device=device, llm_device=llm_device)
        return pipe

    def official():  # the release: T5 of the prompts and of "" (fixed, 128 tokens), the connector at every step
        from ella.text import encode_text

        pipe = plain_pipe(m["unet"], m["vae"], None)
        pipe.unet = B.OfficialProxyUNet(m["connector"], m["unet"])

        def run(prompt, **kwargs):
            pos = encode_text(m["t5"], m["t5_tok"], prompt, max_length=128).hidden_states
            neg = encode_text(m["t5"], m["t5_tok"], [""], max_length=128).hidden_states.expand(len(prompt), -1, -1)
            return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, **kwargs)

        run.set_progress_bar_config = pipe.set_progress_bar_config
        return run

    def llm_int8():  # the T5 saved as a folder and loaded back the way --llm-quantization int8 loads it
        import tempfile

        from ella.llm import load_llm

        with tempfile.TemporaryDirectory(prefix="bench-fast-t5-") as tmp:
            m["t5"].save_pretrained(tmp)
            m["t5_tok"].save_pretrained(tmp)
            t5, _ = load_llm(tmp, dtype=m["t5"].dtype, device=device, quantization="int8")
        return ours_pipe(m["unet"], m["vae"], t5, m["connector"])

    def plain_compiled():
        c = copies(m, ("unet",), device)
        pipe = plain_pipe(c["unet"], m["vae"], m["clip"])
        pipe.unet = torch.compile(pipe.unet, mode=args.mode)
        return pipe

    def plain_fast():
        c = copies(m, ("unet", "vae"), device)
        pipe = plain_pipe(c["unet"], c["vae"], m["clip"])
        ella.pipelines.fast.enable_fast_inference(pipe, mode=args.mode)
        return pipe

    def ours_fast():
        c = copies(m, ("unet", "vae", "t5", "connector"), device)
        pipe = ours_pipe(c["unet"], c["vae"], c["t5"], c["connector"])
        pipe.enable_fast_inference(mode=args.mode)
        return pipe

    makers = {
        "plain": lambda: plain_pipe(m["unet"], m["vae"], m["clip"]),
        "ours": lambda: ours_pipe(m["unet"], m["vae"], m["t5"], m["connector"]),
        "official": official,
        "ours-llm-int8": llm_int8,
        "ours-low-vram": low_vram,
        "ours-low-vram-llm-cpu": lambda: low_vram("cpu"),
        "plain-compiled": plain_compiled,
        "plain-fast": plain_fast,
        "ours-fast": ours_fast,
    }
    return {name: makers[name] for name in args.configs}


def call(pipe, prompts: list[str], args, device) -> np.ndarray:
    gen = torch.Generator(device=device).manual_seed(B.SEED)
    return pipe(
        prompt=prompts,
        generator=gen,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        output_type="np",
    ).images


def timed(pipe, prompts, args, device) -> tuple[float, np.ndarray]:
    B.sync(device)
    t = time.perf_counter()
    images = call(pipe, prompts, args, device)
    B.sync(device)
    return time.perf_counter() - t, images


def peak_of(pipe, prompts, args, device) -> int | None:
    """Bytes the call needs beyond what was allocated before it (its own weights, for an offloaded pipeline)."""
    if device.type != "cuda":
        return None
    B.sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call(pipe, prompts, args, device)
    B.sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def warm_start(args) -> dict:
    """A fresh process: build the models, enable fast mode, time its first image (the compile cache is warm now)."""
    cmd = [sys.executable, __file__, "--warm-start-child", "--steps", str(args.steps), "--size", str(args.size)]
    cmd += ["--device", str(args.device or "cuda"), "--dtype", args.dtype, "--mode", args.mode]
    cmd += ["--tiny"] if args.tiny else []
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    record = {"process_wall_s": round(time.perf_counter() - t, 2), "returncode": done.returncode}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        record.update(json.loads(lines[-1]))
    else:
        record["stderr_tail"] = done.stderr[-2000:]
    return record


def child(args) -> int:
    device = torch.device(args.device or "cuda")
    dtype = B.parse_dtype(args.dtype, device)
    args.configs = ["ours-fast"]
    t = time.perf_counter()
    m = B.build_models(args, device, dtype, [])
    built = time.perf_counter() - t
    pipe = build(m, args, device)["ours-fast"]()
    pipe.set_progress_bar_config(disable=True)
    first, _ = timed(pipe, [B.PROMPTS[0]], args, device)
    second, _ = timed(pipe, [B.PROMPTS[0]], args, device)
    print(
        json.dumps(
            {"build_models_s": round(built, 2), "first_image_s": round(first, 2), "second_image_s": round(second, 3)}
        )
    )
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.warm_start_child:
        return child(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = B.parse_dtype(args.dtype, device)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    notes: list[str] = []
    m = B.build_models(args, device, dtype, notes)
    makers = build(m, args, device)
    rows: dict = {}

    results: dict[tuple[str, int], dict] = {}
    reference: dict[tuple[str, int], np.ndarray] = {}
    for batch in args.batches:
        prompts = [B.PROMPTS[j % len(B.PROMPTS)] for j in range(batch)]
        for name, make in makers.items():
            if name not in rows:
                try:
                    rows[name] = make()
                except EllaError as err:  # e.g. the [quant] extra is missing on this machine
                    notes.append(f"{name}: skipped, {err}")
                    B.log(f"{name}: skipped, {err}")
                    makers = {k: v for k, v in makers.items() if k != name}
                    continue
                rows[name].set_progress_bar_config(disable=True)
            pipe = rows[name]
            first, images = timed(pipe, prompts, args, device)  # compiles, for the compiled rows
            second, _ = timed(pipe, prompts, args, device)
            row = {"config": name, "batch": batch, "first_call_s": round(first, 2), "second_call_s": round(second, 3)}
            row["peak_bytes"] = peak_of(pipe, prompts, args, device)
            row["finite"] = bool(np.isfinite(images).all())
            reference[name, batch] = images
            results[name, batch] = row
            B.log(f"{name:15s} batch {batch}: first {first:.2f} s, second {second:.3f} s, peak {row['peak_bytes']}")
            summarise(results, reference, args)  # written after every row: a run cut off keeps what it measured
            write(args, device, dtype, results, notes + ["partial: first and second calls only"], None, quiet=True)

    round_s = sum(r["second_call_s"] for r in results.values())
    left = args.budget_s - (time.perf_counter() - T0) - (0 if args.no_warm_start else 60)
    repeats = max(1, min(args.repeats, int(left // max(round_s, 1e-9))))
    if repeats < args.repeats:
        notes.append(f"repeats reduced from {args.repeats} to {repeats} to fit --budget-s {args.budget_s:g}")
    for rep in range(repeats):
        for batch in args.batches:
            prompts = [B.PROMPTS[j % len(B.PROMPTS)] for j in range(batch)]
            names = list(rows)
            for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotating order
                dt, _ = timed(rows[name], prompts, args, device)
                results[name, batch].setdefault("times_s", []).append(round(dt, 4))

    summarise(results, reference, args)
    warm = None if args.no_warm_start or "ours-fast" not in rows else warm_start(args)
    write(args, device, dtype, results, notes, warm)
    return 0


def summarise(results: dict, reference: dict, args) -> None:
    """Per row: s/image (median of the timed calls, else the second call), ratios, and the fast rows' image error."""
    for (name, batch), row in results.items():
        times = row.get("times_s") or [row["second_call_s"]]
        row["s_per_image"] = statistics.median(times) / batch
        row["best_s_per_image"] = min(times) / batch
        for base in ("plain", "plain-compiled", "plain-fast", "ours"):
            if (base, batch) in results and base != name:
                other = results[base, batch].get("times_s") or [results[base, batch]["second_call_s"]]
                row[f"ratio_vs_{base}"] = statistics.median(times) / statistics.median(other)
    pairs = (("ours-fast", "ours"), ("plain-fast", "plain"), ("ours-low-vram", "ours"), ("ours-llm-int8", "ours"))
    pairs += (("ours-low-vram-llm-cpu", "ours"),)
    for fast, eager in pairs:
        for batch in args.batches:
            if (fast, batch) in reference and (eager, batch) in reference:
                a, b = reference[fast, batch], reference[eager, batch]
                results[fast, batch]["max_pixel_diff_255"] = float(np.abs(a - b).max() * 255)
                results[fast, batch]["psnr_db_vs_eager"] = psnr(a, b)


def write(args, device, dtype, results: dict, notes: list[str], warm: dict | None, quiet: bool = False) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"# Fast / low-VRAM ELLA inference ({name}, {str(dtype).replace('torch.', '')}, {args.size}x{args.size}, "
        f"{args.steps} steps DPM-Solver++, CFG {args.guidance}, compile mode {args.mode}"
        f"{', TINY' if args.tiny else ''})",
        "",
        "| config | batch | s/image | best | vs plain | vs plain-compiled | vs plain-fast | peak GB | first call s "
        "| max px diff vs eager | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(r, key):
        return f"{r[key]:.3f}x" if key in r else "-"

    for r in results.values():
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 1e9:.2f}"
        diff = f"{r['max_pixel_diff_255']:.1f}" if "max_pixel_diff_255" in r else "-"
        db = f"{r['psnr_db_vs_eager']:.1f}" if "psnr_db_vs_eager" in r else "-"
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['s_per_image']:.3f} | {r['best_s_per_image']:.3f} | "
            f"{ratio(r, 'ratio_vs_plain')} | {ratio(r, 'ratio_vs_plain-compiled')} | {ratio(r, 'ratio_vs_plain-fast')} "
            f"| {peak} | {r['first_call_s']:.1f} | {diff} | {db} |"
        )
    if warm:
        lines += ["", f"Warm start (fresh process, compile cache from this run): {json.dumps(warm)}"]
    lines += [f"Note: {n}" for n in notes]
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "bench_fast.md") as tmp:
        tmp.write_text(table + "\n")
    payload = {
        "device": name,
        "torch": torch.__version__,
        "argv": sys.argv,
        "settings": {k: getattr(args, k) for k in ("steps", "batches", "size", "guidance", "mode", "tiny")},
        "results": list(results.values()),
        "warm_start": warm,
        "notes": notes,
        "total_wall_s": round(time.perf_counter() - T0, 1),
    }
    with atomic_path(out / "bench_fast.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if not quiet:
        print("\n" + table, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
