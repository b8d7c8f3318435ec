#!/usr/bin/env python
"""Training-throughput benchmark: the trainer's step on full-size SD1.5 + TSC + flan-t5-xl, random weights.

Every configuration runs the *trainer's own* step — ``ella.train.train.diffusion_loss`` (one random
timestep per sample, connector → frozen UNet → MSE), ``accelerator.backward``, gradient clipping,
AdamW step — under ``accelerate`` bf16 mixed precision, exactly as ``ella train`` does. What varies:

* ``naive``     — frozen UNet kept in fp32 under bf16 autocast, eager (the first trainer's loop, measured:
  116 samples/s at batch 64, 19% MFU, 72 GB);
* ``bf16``      — frozen UNet *stored* in bf16 (what ``ella train`` does: no per-op weight casts);
* ``+cl``       — and channels_last activations/weights (cuDNN's preferred conv layout);
* ``+compile``  — and ``torch.compile`` of the frozen UNet (``ella train --torch_compile``);
* inputs ``cached`` (latents + LLM features from ``ella cache``) or ``t5`` (features computed by a
  flan-t5-xl-size encoder every step; latents cached) or ``raw`` (VAE encode of 512² images too).

MFU uses the model FLOPs: 2 × 803 GFLOP per sample (UNet forward + input-gradient backward;
no weight gradients are computed for the frozen UNet), against the Hopper (H100/H200 SXM) dense bf16 peak of
989.4 TFLOP/s; the script also counts the UNet forward FLOPs itself (``torch.utils.flop_counter``)
and prints them, to check the 803. Samples/s is per GPU, steady state (after compile warm-up),
timed with CUDA syncs around ``--steps`` steps; peak memory is ``max_memory_allocated``.

Run (repo root; ``--tiny`` for a CPU smoke run)::

    PYTHONPATH=src python benchmarks/bench_train.py            # writes $OUT/bench_train.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import FLAN_T5_XL, SD15_SCHEDULER, SD15_UNET, SD15_VAE, TINY_T5, TINY_UNET, TINY_VAE

HOPPER_BF16_PEAK = 989.4e12
UNET_GFLOP_PER_SAMPLE = 2 * 803  # model FLOPs: forward + input-gradient backward


def build(args, device):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from ella import TimestepAwareSemanticConnector

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if args.tiny else SD15_UNET))
    connector = TimestepAwareSemanticConnector(
        **(
            dict(width=32, layers=2, heads=4, num_latents=8, input_dim=16, time_channel=32, time_embed_dim=32)
            if args.tiny
            else {}
        )
    )
    t5 = vae = None  # built only if a selected configuration reads them (T5-XL init takes a while)
    if needs(args, "t5") or needs(args, "raw"):
        t5 = T5EncoderModel(T5Config(**(TINY_T5 if args.tiny else FLAN_T5_XL))).eval().requires_grad_(False)
    if needs(args, "raw"):
        vae = AutoencoderKL(**(TINY_VAE if args.tiny else SD15_VAE)).eval().requires_grad_(False)
    sched = DDPMScheduler.from_config(SD15_SCHEDULER)
    return unet.eval().requires_grad_(False), connector.to(device), t5, vae, sched


def plan(args) -> list[tuple[str, dict]]:
    bf16 = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    b = 4 if args.tiny else 64
    return [
        ("naive", dict(batch=b, unet_dtype=torch.float32, channels_last=False, compile_unet=False, inputs="cached")),
        ("bf16", dict(batch=b, unet_dtype=bf16, channels_last=False, compile_unet=False, inputs="cached")),
        ("bf16+cl", dict(batch=b, unet_dtype=bf16, channels_last=True, compile_unet=False, inputs="cached")),
        ("bf16+cl+compile", dict(batch=b, unet_dtype=bf16, channels_last=True, compile_unet=True, inputs="cached")),
        (
            "bf16+cl+compile b128",
            dict(batch=2 * b, unet_dtype=bf16, channels_last=True, compile_unet=True, inputs="cached"),
        ),
        ("bf16+cl+compile t5", dict(batch=b, unet_dtype=bf16, channels_last=True, compile_unet=True, inputs="t5")),
        ("bf16+cl+compile raw", dict(batch=b, unet_dtype=bf16, channels_last=True, compile_unet=True, inputs="raw")),
        ("bf16+compile", dict(batch=b, unet_dtype=bf16, channels_last=False, compile_unet=True, inputs="cached")),
        (
            "bf16+cl+compile b96",
            dict(batch=3 * b // 2, unet_dtype=bf16, channels_last=True, compile_unet=True, inputs="cached"),
        ),
        (
            "bf16+cl+compile+fuseqkv",
            dict(batch=b, unet_dtype=bf16, channels_last=True, compile_unet=True, inputs="cached", fuse_qkv=True),
        ),
        (
            "bf16+cl+compile+fuseqkv+tuned",
            dict(batch=b, unet_dtype=bf16, channels_last=True, compile_unet=True, inputs="cached", tuned=True),
        ),
        (
            "bf16+compile+flash+tuned",
            dict(
                batch=b,
                unet_dtype=bf16,
                channels_last=False,
                compile_unet=True,
                inputs="cached",
                tuned=True,
                no_cudnn_attention=True,
            ),
        ),
        # `ella train --train_unet_lora 16`: the LoRA's weight gradients come on top (jointly with the connector,
        # and under a frozen connector)
        (
            "bf16+cl+compile lora16",
            dict(batch=b, unet_dtype=bf16, channels_last=True, compile_unet=True, inputs="cached", lora=16),
        ),
        (
            "bf16+cl+compile lora16 frozen-connector",
            dict(
                batch=b,
                unet_dtype=bf16,
                channels_last=True,
                compile_unet=True,
                inputs="cached",
                lora=16,
                freeze_connector=True,
            ),
        ),
    ]


def needs(args, inputs: str) -> bool:
    return any(kw["inputs"] == inputs for name, kw in plan(args) if not args.only or name in args.only)


def count_unet_gflop(unet, device, latent: int, cross: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 4, latent, latent, device=device, dtype=unet.dtype)
    cond = torch.randn(1, 64, cross, device=device, dtype=unet.dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.tensor([500], device=device), encoder_hidden_states=cond)
    return counter.get_total_flops() / 1e9


def run_config(
    name,
    models,
    args,
    device,
    *,
    batch,
    unet_dtype,
    channels_last,
    compile_unet,
    inputs,
    fuse_qkv=False,
    tuned=False,
    no_cudnn_attention=False,
    lora=None,
    freeze_connector=False,
):
    from accelerate import Accelerator

    from ella.train.models import Dims, add_unet_lora
    from ella.train.train import diffusion_loss

    unet0, connector0, t5, vae, sched = models
    unet = unet0.to(device, unet_dtype)
    lora_params = []
    if lora:  # on a copy: the other rows keep the plain frozen UNet
        import copy

        unet = copy.deepcopy(unet)
        lora_params = add_unet_lora(unet, lora, None)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if fuse_qkv:
        unet.fuse_qkv_projections()
    if no_cudnn_attention:  # torch picks cuDNN's SDPA on H100; try the flash-attention-2 kernels instead
        torch.backends.cuda.enable_cudnn_sdp(False)
    if tuned:  # diffusers' recommended inductor settings for SD UNets
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.epilogue_fusion = False
        inductor.coordinate_descent_check_all_directions = True
    unet_call = torch.compile(unet, dynamic=False) if compile_unet else unet
    torch.manual_seed(1)
    connector = type(connector0)(**connector0.config).to(device).train()
    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type != "cuda")
    if freeze_connector:
        connector.requires_grad_(False)
    trainable = [p for p in connector.parameters() if p.requires_grad] + lora_params
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    optimizer = accelerator.prepare(optimizer)
    if not freeze_connector:
        connector = accelerator.prepare(connector)
    for frozen in (t5, vae):
        if frozen is not None:
            frozen.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    res = 64 if args.tiny else 512
    latent = res // 8
    dims = Dims(connector0.config.input_dim, connector0.config.width, None, {})
    gen = torch.Generator(device).manual_seed(0)
    cached_latents = torch.randn(batch, 4, latent, latent, device=device)
    cached_feats = torch.randn(batch, 128, connector0.config.input_dim, device=device, dtype=torch.float16)
    ids = torch.randint(2, 32000 if not args.tiny else 100, (batch, 128), device=device)
    images = torch.rand(batch, 3, res, res, device=device) * 2 - 1

    def step():
        latents = cached_latents
        feats = cached_feats
        if inputs == "raw":
            with torch.no_grad():
                latents = vae.encode(images.to(vae.dtype)).latent_dist.mode().float() * 0.18215
        if inputs in ("t5", "raw"):
            with torch.no_grad():
                feats = t5(input_ids=ids).last_hidden_state
        if channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(connector):
            loss = diffusion_loss(connector, unet_call, sched, latents, feats, None, dims=dims, generator=gen)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        for _ in range(args.warmup):
            loss = step()
        sync()
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
    except torch.OutOfMemoryError:
        row = {"config": name, "batch": batch, "inputs": inputs, "error": "out of memory"}
        accelerator.print(json.dumps(row), flush=True)
        return row
    elapsed = time.perf_counter() - t0
    sps = batch * args.steps / elapsed
    row = {
        "config": name,
        "batch": batch,
        "inputs": inputs,
        "processes": accelerator.num_processes,
        "samples_per_s": round(sps, 1),
        "total_samples_per_s": round(sps * accelerator.num_processes, 1),
        "mfu": round(sps * UNET_GFLOP_PER_SAMPLE * 1e9 / HOPPER_BF16_PEAK, 4),
        "step_ms": round(1000 * elapsed / args.steps, 1),
        "warmup_s": round(warm_s, 1),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
        "loss_finite": bool(torch.isfinite(loss).item()),
    }
    accelerator.print(json.dumps(row), flush=True)
    if args.profile == name:
        profile_step(step, device)
    unet0.to(memory_format=torch.contiguous_format)
    return row


def profile_step(step, device) -> None:
    """Where a steady-state step's GPU time goes: the top kernels, and totals by kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(e.self_device_time_total for e in events)
    kinds: dict[str, float] = {}
    for e in events:
        n = e.key.lower()
        kind = (
            "attention"
            if any(k in n for k in ("flash", "fmha", "attention", "sdpa"))
            else "conv"
            if any(k in n for k in ("conv", "cudnn", "implicit", "dgrad", "wgrad", "xmma_fprop"))
            else "gemm"
            if any(k in n for k in ("gemm", "cutlass", "sm90", "nvjet", "matmul"))
            else "triton/fused"
            if "triton" in n
            else "norm"
            if "norm" in n
            else "other"
        )
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total
    print(
        "GPU time by kind (ms): "
        + ", ".join(f"{k} {v / 1000:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        + f"; total {total / 1000:.1f}",
        flush=True,
    )
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"  {e.self_device_time_total / 1000:8.1f} ms  x{e.count:<4} {e.key[:110]}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny architectures (CPU smoke run)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="run only these config names")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--profile", default=None, help="profile one step of this config")
    args = p.parse_args(argv)
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # torchrun --nproc_per_node N: the scaling run
    device = state.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    models = build(args, device)
    gflop = count_unet_gflop(models[0].to(device), device, 8 if args.tiny else 64, models[0].config.cross_attention_dim)
    state.print(f"UNet forward: {gflop:.1f} GFLOP per sample (counted); MFU uses 803", flush=True)
    suffix = f"_ddp{state.num_processes}" if state.num_processes > 1 else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "unet_fwd_gflop_counted": round(gflop, 1),
        "steps": args.steps,
        "warmup": args.warmup,
    }
    rows = []
    for name, kw in plan(args):
        if args.only and name not in args.only:
            continue
        rows.append(run_config(name, models, args, device, **kw))
        if state.is_main_process:  # after every row: a run cut short keeps what it measured
            (out / f"bench_train{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if not state.is_main_process:
        return 0
    lines = [
        f"device: {meta['device']}, torch {meta['torch']}, UNet fwd {gflop:.1f} GFLOP/sample (counted)",
        "",
        "| config | inputs | processes | batch/GPU | samples/s/GPU | total samples/s | MFU | step ms | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['inputs']} | | {r['batch']} | {r['error']} | | | | |")
        else:
            lines.append(
                f"| {r['config']} | {r['inputs']} | {r['processes']} | {r['batch']} | {r['samples_per_s']} | "
                f"{r['total_samples_per_s']} | {100 * r['mfu']:.1f}% | {r['step_ms']} | {r['peak_gb']} |"
            )
    (out / f"bench_train{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
