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
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import FLAN_T5_XL, SD15_SCHEDULER, SD15_UNET, SD15_VAE, TINY_T5, TINY_UNET, TINY_VAE

#: A 7B-class decoder-only LLM (Llama-2-7B's shape) for the online-features rows: the issue's `--llm_fsdp` case.
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
TINY_LLAMA = dict(LLAMA_7B, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=100)  # fmt: skip
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
    t5 = vae = llama = None  # built only if a selected configuration reads them (T5-XL init takes a while)
    if needs(args, "llm7b"):  # a Llama-2-7B-shaped decoder, random, built on the GPU in bf16 (seconds, not minutes)
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(**(TINY_LLAMA if args.tiny else LLAMA_7B))
        with torch.device(device):
            llama = LlamaModel(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        llama.eval().requires_grad_(False)
    if needs(args, "t5") or needs(args, "raw"):
        t5 = T5EncoderModel(T5Config(**(TINY_T5 if args.tiny else FLAN_T5_XL))).eval().requires_grad_(False)
    if needs(args, "raw"):
        vae = AutoencoderKL(**(TINY_VAE if args.tiny else SD15_VAE)).eval().requires_grad_(False)
    sched = DDPMScheduler.from_config(SD15_SCHEDULER)
    return unet.eval().requires_grad_(False), connector.to(device), t5, vae, sched, llama


def plan(args) -> list[tuple[str, dict]]:
    bf16 = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    b = 4 if args.tiny else 64
    base = dict(batch=b, unet_dtype=bf16, channels_last=False, compile_unet=True, inputs="cached")
    cl = dict(base, channels_last=True)
    return [
        ("naive", dict(base, unet_dtype=torch.float32, compile_unet=False)),
        ("bf16", dict(base, compile_unet=False)),
        ("bf16+cl", dict(cl, compile_unet=False)),
        ("bf16+cl+compile", cl),
        ("bf16+cl+compile b128", dict(cl, batch=2 * b)),
        ("bf16+cl+compile t5", dict(cl, inputs="t5")),
        ("bf16+cl+compile raw", dict(cl, inputs="raw")),
        ("bf16+compile", base),  # `ella train --torch_compile` of the first trainer (compile scope: the UNet)
        ("bf16+cl+compile b96", dict(cl, batch=3 * b // 2)),
        ("bf16+cl+compile+fuseqkv", dict(cl, fuse_qkv=True)),
        ("bf16+cl+compile+fuseqkv+tuned", dict(cl, tuned=True)),
        ("bf16+compile+flash+tuned", dict(base, tuned=True, attention="flash")),
        # `ella train --train_unet_lora 16`: the LoRA's weight gradients come on top (jointly with the connector,
        # and under a frozen connector)
        ("bf16+cl+compile lora16", dict(cl, lora=16)),
        ("bf16+cl+compile lora16 frozen-connector", dict(cl, lora=16, freeze_connector=True)),
        # Training v2 levers (ella.train.speed), each alone on top of "bf16+compile", then together
        ("step", dict(base, scope="step")),  # --compile_scope step: connector, casts, UNet and loss in one graph
        ("flash", dict(base, attention="flash")),  # --attention_backend flash (FlashAttention-2 kernels)
        ("efficient", dict(base, attention="efficient")),  # --attention_backend efficient (CUTLASS kernels)
        ("pad64", dict(base, pad_heads=64)),  # head dim 40 zero-padded to 64 (exact: the scale stays 1/sqrt(40))
        ("step+flash", dict(base, scope="step", attention="flash")),
        ("step+efficient", dict(base, scope="step", attention="efficient")),
        ("step+cl", dict(cl, scope="step")),  # channels_last: no NCHW<->NHWC conversions around cuDNN's convs
        ("fp8", dict(base, fp8=True)),  # --fp8_unet: torchao float8 (tensorwise) for the UNet's large linears
        ("step+fp8", dict(base, scope="step", fp8=True)),
        ("cudagraphs", dict(base, mode="reduce-overhead")),  # --compile_mode reduce-overhead
        ("b128", dict(base, batch=2 * b)),
        ("b128 step", dict(base, batch=2 * b, scope="step")),
        # A 7B decoder-only LLM's features computed in every step (no cache), replicated or (under torchrun)
        # sharded over the processes with --llm_fsdp's FSDP2
        ("step llm7b", dict(base, scope="step", inputs="llm7b")),
        ("step llm7b fsdp", dict(base, scope="step", inputs="llm7b", fsdp=True)),
        # 300-step loss curves (same seed, same data, same noise): does a lever change what is learnt?
        ("curve bf16", dict(base, steps=300)),
        ("curve fp8", dict(base, fp8=True, steps=300)),
        ("curve step", dict(base, scope="step", steps=300)),
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
    attention="auto",
    lora=None,
    freeze_connector=False,
    scope="unet",
    mode="default",
    fp8=False,
    pad_heads=None,
    steps=None,
    fsdp=False,
):
    import copy

    from accelerate import Accelerator

    from ella.train import speed
    from ella.train.models import Dims, add_unet_lora
    from ella.train.sharding import is_sharded, shard_llm
    from ella.train.train import diffusion_loss

    torch._dynamo.reset()  # a fresh compile per row: dynamo's cache is keyed on the UNet's code, not on its settings
    unet0, connector0, t5, vae, sched, llama = models
    unet = unet0.to(device, unet_dtype)
    if lora or fp8 or pad_heads:  # on a copy: the other rows keep the plain frozen UNet
        unet = copy.deepcopy(unet)
    lora_params = add_unet_lora(unet, lora, None) if lora else []
    converted = speed.fp8_unet(unet) if fp8 else []
    if pad_heads:
        unet.set_attn_processor(PaddedHeads(pad_heads))
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if fuse_qkv:
        unet.fuse_qkv_projections()
    speed.set_attention_backend(attention)
    if tuned:  # diffusers' recommended inductor settings for SD UNets
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.epilogue_fusion = False
        inductor.coordinate_descent_check_all_directions = True
    # the trainer's two compile scopes (ella.train.speed.COMPILE_SCOPES): the UNet alone, or the whole loss
    unet_call = speed.compiled(unet, mode) if compile_unet and scope == "unet" else unet
    loss_fn = speed.compiled(diffusion_loss, mode) if compile_unet and scope == "step" else diffusion_loss
    torch.manual_seed(1)
    llm_width = llama.config.hidden_size if inputs == "llm7b" else connector0.config.input_dim
    connector = type(connector0)(**{**connector0.config, "input_dim": llm_width}).to(device).train()
    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type != "cuda")
    if freeze_connector:
        connector.requires_grad_(False)
    trainable = [p for p in connector.parameters() if p.requires_grad] + lora_params
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    optimizer = accelerator.prepare(optimizer)
    if not freeze_connector:
        connector = accelerator.prepare(connector)
    llm = llama if inputs == "llm7b" else t5
    for frozen in (t5, vae):
        if frozen is not None:
            frozen.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if fsdp:  # every process holds 1/N of the LLM's weights; its forward all-gathers one block at a time
        if accelerator.num_processes == 1:
            row = {"config": name, "batch": batch, "inputs": inputs, "error": "needs torchrun (several processes)"}
            accelerator.print(json.dumps(row), flush=True)
            return row
        llm = llama if is_sharded(llama) else shard_llm(llama, device=device)  # in place: later rows see it sharded
    res = 64 if args.tiny else 512
    latent = res // 8
    dims = Dims(connector0.config.input_dim, connector0.config.width, None, {})
    gen = torch.Generator(device).manual_seed(0)
    # A fixed little dataset of 8 batches, cycled: the loss curves of the 300-step rows fall as the connector
    # learns it, and every row reads the same data with the same noise and timesteps (same generator seed).
    data_gen = torch.Generator(device).manual_seed(1234)
    n_data = 8
    cached_latents = torch.randn(n_data, batch, 4, latent, latent, device=device, generator=data_gen)
    cached_feats = torch.randn(n_data, batch, 128, connector0.config.input_dim, device=device, generator=data_gen).to(
        torch.float16
    )
    ids = torch.randint(2, 32000 if not args.tiny else 100, (batch, 128), device=device)
    images = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    counter = [0]

    def step():
        i = counter[0] % n_data
        counter[0] += 1
        latents = cached_latents[i]
        feats = cached_feats[i]
        if inputs == "raw":
            with torch.no_grad():
                latents = vae.encode(images.to(vae.dtype)).latent_dist.mode().float() * 0.18215
        if inputs in ("t5", "raw", "llm7b"):
            with torch.no_grad():
                feats = llm(input_ids=ids).last_hidden_state
        if channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(connector):
            loss = loss_fn(connector, unet_call, sched, latents, feats, None, dims=dims, generator=gen)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    n_steps = steps or args.steps
    losses = []
    t0 = time.perf_counter()
    try:
        for _ in range(args.warmup):
            losses.append(step())
        sync()
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n_steps):
            losses.append(step())  # kept on the GPU: reading each one would sync every step
        sync()
    except torch.OutOfMemoryError:
        row = {"config": name, "batch": batch, "inputs": inputs, "error": "out of memory"}
        accelerator.print(json.dumps(row), flush=True)
        return row
    finally:
        speed.reset_attention_backend()
    elapsed = time.perf_counter() - t0
    sps = batch * n_steps / elapsed
    curve = torch.stack(losses).float().tolist()
    row = {
        "config": name,
        "batch": batch,
        "inputs": inputs,
        "processes": accelerator.num_processes,
        "samples_per_s": round(sps, 1),
        "total_samples_per_s": round(sps * accelerator.num_processes, 1),
        "mfu": round(sps * UNET_GFLOP_PER_SAMPLE * 1e9 / HOPPER_BF16_PEAK, 4),
        "step_ms": round(1000 * elapsed / n_steps, 1),
        "warmup_s": round(warm_s, 1),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
        "loss_finite": all(map(math.isfinite, curve)),
        "settings": {"scope": scope, "mode": mode, "attention": attention, "fp8_layers": len(converted)},
    }
    if inputs == "llm7b":  # what this process stores of the LLM: all of it, or its shard
        local = (getattr(q, "to_local", lambda q=q: q)() for q in llm.parameters())
        row["llm_weights_gb_per_process"] = round(sum(t.numel() * t.element_size() for t in local) / 1e9, 2)
    if args.check_grads:  # is the row's compiled step computing the eager step's gradients?
        batch0 = (cached_latents[0], cached_feats[0])
        row["grad_check"] = grad_check(connector, unet, unet_call, loss_fn, sched, *batch0, dims)
        accelerator.print(json.dumps({"config": name, "grad_check": row["grad_check"]}), flush=True)
    if steps:  # a loss-curve row: every step's loss, warm-up included (step 1 first)
        row["losses"] = [round(v, 6) for v in curve]
    accelerator.print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    if name in args.profile:
        profile_step(step, device)
    unet0.to(memory_format=torch.contiguous_format)
    return row


def grad_check(connector, unet, unet_call, loss_fn, sched, latents, feats, dims) -> dict:
    """The connector's gradients on one batch from the row's step against the plain eager step (same noise and
    timesteps): a compiler that drops part of the UNet's input gradient shows here as a large relative error."""
    from ella.train.train import diffusion_loss

    def grads(fn, forward):
        connector.zero_grad(set_to_none=True)
        gen = torch.Generator(latents.device).manual_seed(7)
        loss = fn(connector, forward, sched, latents, feats, None, dims=dims, generator=gen)
        loss.backward()
        flat = torch.cat([p.grad.float().flatten() for p in connector.parameters() if p.grad is not None])
        connector.zero_grad(set_to_none=True)
        return loss.detach().float(), flat

    loss0, g0 = grads(diffusion_loss, unet)  # eager: the uncompiled loss on the uncompiled UNet
    loss1, g1 = grads(loss_fn, unet_call)
    return {
        "loss_rel_diff": round(((loss1 - loss0).abs() / loss0.abs()).item(), 6),
        "grad_rel_l2": round(((g1 - g0).norm() / g0.norm()).item(), 6),
        "grad_cosine": round(torch.nn.functional.cosine_similarity(g0, g1, dim=0).item(), 6),
    }


class PaddedHeads:
    """SD attention with each head zero-padded to ``multiple`` channels: q·k and the softmax are unchanged by
    zero columns, the padded output columns are zero and cut off, and the scale is the true 1/sqrt(head dim) —
    so it computes the same attention, on a head size the kernels have native tiles for (64, not 40)."""

    def __init__(self, multiple: int):
        self.multiple = multiple

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        import torch.nn.functional as F

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        d = q.shape[-1] // attn.heads
        q, k, v = (x.view(b, -1, attn.heads, d).transpose(1, 2) for x in (q, k, v))
        pad = (-d) % self.multiple if d < self.multiple else 0
        if pad:
            q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, context.shape[1], b)
            mask = mask.view(b, attn.heads, -1, mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5)
        out = out[..., :d].transpose(1, 2).reshape(b, -1, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))


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
    p.add_argument("--profile", nargs="*", default=(), help="profile one step of these configs")
    p.add_argument("--check-grads", action="store_true", help="compare each row's gradients with the eager step's")
    args = p.parse_args(argv)
    unknown = [n for n in [*(args.only or ()), *args.profile] if n not in dict(plan(args))]
    if unknown:
        p.error(f"unknown config(s) {unknown}; the configs are: {', '.join(name for name, _ in plan(args))}")
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
    configs = dict(plan(args))
    # --only runs its rows in the order given: a row listed after another that compiles the same graph finds it
    # in inductor's cache (another process's compile included), which is what keeps a call inside its time
    for name in args.only or list(configs):
        kw = configs[name]
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
