#!/usr/bin/env python
"""Inference benchmark: plain SD1.5 vs ELLA (this package) vs the official per-step ELLA wrapper.

What it measures, in one run, on full-size architectures with RANDOM weights (no hub access is
needed or attempted; the timings depend on shapes, not on weight values):

* ``plain``    -- diffusers' ``StableDiffusionPipeline``: SD1.5 UNet + VAE + CLIP ViT-L/14 text
  encoder. The baseline.
* ``ours``     -- ``ella.EllaStableDiffusionPipeline`` on the *same* UNet/VAE/scheduler objects,
  with the default ``ella.TimestepAwareSemanticConnector()`` and a flan-t5-xl-size
  ``T5EncoderModel`` (``text_encoder=None``). The connector runs once per call, batched over all
  timesteps and prompts (the condition table, see ``ella.conditioning``); the UNet is untouched.
* ``official`` -- the release's approach (``ELLAProxyUNet``): a proxy module wrapping the UNet
  recomputes the connector at *every* UNet call, installed as ``pipe.unet`` of a plain
  ``StableDiffusionPipeline`` that shares the same UNet/VAE/scheduler and is fed
  ``prompt_embeds``/``negative_prompt_embeds`` = T5 features from ``ella.text.encode_text``
  (fixed mode, 128 tokens; negative = T5 of ``""`` as in the release). The T5 encode time is
  included in its per-image time, as it is in ``ours``. Its pipeline has ``text_encoder=None``
  like ours, so the memory compares like with like (the release also kept CLIP loaded: +0.25 GB).

Settings (defaults): 512x512, 50 steps, DPMSolverMultistepScheduler on SD1.5's scheduler config,
CFG 7.5, fp16 on CUDA, batch 1 and 4 (batch = number of prompts, one image each), the same seed for
every configuration, default SDPA attention processors, TF32 left at PyTorch's default (off for
matmuls) unless ``--tf32``.

Method, in two phases:

1. per configuration, with only its models on the GPU (the others parked on the CPU): warm-up
   call(s), then one steady-state call for the peak GPU memory (``reset_peak_memory_stats()`` /
   ``max_memory_allocated()``; so ``ours`` at batch 1 counts UNet + VAE + T5 + connector) that is
   also run under ``torch.profiler`` to get the GPU's busy time (sum of its kernels and copies) and
   its op count;
2. all models resident, one more warm-up call each, then ``--repeats`` timed calls per
   (configuration, batch) with the configurations *interleaved* in rotating order, each call
   bracketed by ``torch.cuda.synchronize()`` + ``time.perf_counter``; "s/image" = median per call
   / batch.

Why both wall time and GPU-busy time: on a lent GPU host (an H100's, 2026-11-26) a 512x512 SD1.5 step
at batch 1 (UNet batch 2 with CFG) is CPU/kernel-launch bound (eager UNet ~28 ms of Python and
launches vs ~12 ms of GPU work; measured 2026-11-26), and that host's CPU speed varies by tens of
percent between calls. Wall-time ratios then measure Python overhead (and noise) more than GPU
work, so the profiled GPU time is reported next to them; interleaving and 5 repeats keep the
wall-time medians comparable. Afterwards (unless ``--no-components``) the parts are timed alone:
T5 encode, ours' batched condition table, the connector run at every step (official), one UNet
step (wall time, eager).

Why: the targets this measures against are
  * ours <= 1.03x plain SD1.5 per image (the connector + T5 cost must be negligible),
  * the release's per-step recompute is ~1.2x plain (what the condition table saves),
  * peak GPU memory <= 6 GB at batch 1 in fp16.

Random-weight caveats: the connector's AdaLN projections are zero-initialised; they are randomised
here so its arithmetic is realistic (the compute is the same either way). T5 runs in fp16 like the
release; its features are checked to be finite and, if they are not, its weights are scaled down
(recorded in the JSON ``notes``). Image finiteness of every call is recorded too (``all_finite``).

Run on one GPU from the repo root (PYTHONPATH must reach ``src/``; ~3.5 min on an H100, capped
by ``--budget-s``)::

    PYTHONPATH=src python benchmarks/bench_inference.py            # writes $OUT or ./bench-out

Writes ``bench_inference.md`` (the tables) and ``bench_inference.json`` (raw times, versions,
device, command line, model sizes/configs, notes) into ``--out``.

CPU smoke test with tiny configs (< 1 minute)::

    python benchmarks/bench_inference.py --tiny --device cpu --dtype float32 --steps 2 --repeats 1

Imports only torch, diffusers, transformers, tokenizers, ``ella`` and the standard library.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

T0 = time.perf_counter()

# ------------------------------------------------------------------------------------ configs

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# runwayml/stable-diffusion-v1-5 vae/config.json
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# openai/clip-vit-large-patch14 text config (SD1.5 text_encoder/config.json)
SD15_CLIP = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
# google/flan-t5-xl config.json (the encoder is what ELLA runs)
FLAN_T5_XL = {
    "vocab_size": 32128,
    "d_model": 2048,
    "d_kv": 64,
    "d_ff": 5120,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 32,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",  # => is_gated_act=True, dense_act_fn="gelu_new"
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
# SD1.5 scheduler/scheduler_config.json (a PNDM config; DPM-Solver++ is built from it, as the
# release's inference.py does with DPMSolverMultistepScheduler.from_config(pipe.scheduler.config))
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "trained_betas": None,
}
CONNECTOR = {}  # ella.TimestepAwareSemanticConnector() defaults = the released SD1.5 connector

# --tiny: the same architectures, shrunk so a CPU run takes seconds
TINY_UNET = dict(
    SD15_UNET,
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    norm_num_groups=8,
)
TINY_VAE = dict(SD15_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64)
TINY_CLIP = dict(
    SD15_CLIP, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
)
TINY_T5 = dict(
    FLAN_T5_XL,
    d_model=16,
    d_kv=4,
    d_ff=32,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
)
TINY_CONNECTOR = {
    "width": 32,
    "layers": 2,
    "heads": 4,
    "num_latents": 8,
    "input_dim": 16,
    "time_channel": 32,
    "time_embed_dim": 24,
}

PROMPTS = [
    (
        "a photo of a red cat sitting on a wooden table next to a blue cup of coffee in a bright kitchen, "
        "soft morning light, highly detailed"
    ),
    "an old castle on a mountain above a quiet lake at sunset, dramatic clouds, oil painting, masterpiece",
    "two children riding bicycles down a busy city street in the rain, cinematic lighting, wide angle shot",
    "a cute robot reading a book in a small garden full of yellow flowers, watercolor illustration",
]
SEED = 1234

# Word vocab of the stand-in tokenizers (prompt words + filler). Words not in it map to <unk>.
_FILLER = """a an the of and with in on at to from by for over under near next behind is are this that one two
        three red orange yellow green blue purple pink brown black white gray gold dark light bright cat dog bird
        horse fish lion man woman boy girl child people robot astronaut table chair window room house kitchen
        garden street city forest tree flower grass mountain river lake ocean beach sky cloud sun moon star
        rain snow night day morning evening sunset car train boat castle bridge tower book cup coffee portrait
        landscape style art illustration painting photo realistic detailed high quality beautiful small large
        old young soft sharp focus cinematic lighting anime fantasy 4k 8k , ."""
_WORDS = sorted(set(" ".join(PROMPTS).replace(",", " , ").split()) | set(_FILLER.split()))


# --------------------------------------------------------------------------------- tokenizers


def clip_like_tokenizer(vocab_size: int):
    """Word-level stand-in for SD1.5's CLIPTokenizer: ``<bos> words <eos>``, pad (= eos) to 77."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab = {w: i for i, w in enumerate(_WORDS)}
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token=eos))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        unk_token=eos,
        model_max_length=77,
        padding_side="right",
    )


def t5_like_tokenizer(vocab_size: int):
    """Word-level stand-in for the flan-T5 tokenizer: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, appends ``</s>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in _WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


# ------------------------------------------------------------------------- the official proxy


class OfficialProxyUNet(torch.nn.Module):
    """The release's ``ELLAProxyUNet``: the connector runs on the raw LLM features at every UNet call.

    Installed as ``pipe.unet`` of a plain ``StableDiffusionPipeline``, which then passes its
    ``prompt_embeds`` (here: T5 features, CFG-concatenated by the loop) as ``encoder_hidden_states``.
    """

    def __init__(self, connector, unet):
        super().__init__()
        self.connector = connector
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        return self.unet(
            sample, timestep, encoder_hidden_states=self.connector(encoder_hidden_states, timestep), **kwargs
        )


# ----------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(run, prompts: list[str], device: torch.device, finite: list[bool]) -> float:
    """One synchronised, timed pipeline call from a fresh seed; appends whether its images are finite."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    sync(device)
    t = time.perf_counter()
    images = run(prompts, gen)
    sync(device)
    dt = time.perf_counter() - t
    finite.append(bool(torch.isfinite(torch.as_tensor(images)).all()))
    return dt


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    from ella.devices import resolve_dtype  # the package's own policy: fp16 on CUDA, fp32 elsewhere

    return resolve_dtype(name, str(device))


def finite_t5(t5, tokenizer, notes: list[str]) -> None:
    """Random fp16 T5 must give finite features; scale its weights down until it does (timing only)."""
    from ella.text import encode_text

    for attempt in range(6):
        feats = encode_text(t5, tokenizer, PROMPTS + [""]).hidden_states
        if torch.isfinite(feats).all():
            if attempt:
                notes.append(f"T5 weights scaled by 0.5**{attempt} so that random fp16 T5 features are finite")
            log(f"T5 features finite (abs max {feats.abs().max().item():.3g}, dtype {feats.dtype})")
            return
        with torch.no_grad():
            for name, p in t5.named_parameters():
                if p.ndim == 2 and "embed" not in name and "shared" not in name:
                    p.mul_(0.5)
    notes.append("T5 features are still non-finite after scaling the weights down; timings are still valid")
    log("WARNING: T5 features not finite")


def build_models(args, device: torch.device, dtype: torch.dtype, notes: list[str]) -> dict:
    """All models, random weights (constructed directly on the device, then cast)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    import ella

    unet_cfg, vae_cfg, clip_cfg, t5_cfg, conn_cfg = (
        (TINY_UNET, TINY_VAE, TINY_CLIP, TINY_T5, TINY_CONNECTOR)
        if args.tiny
        else (SD15_UNET, SD15_VAE, SD15_CLIP, FLAN_T5_XL, CONNECTOR)
    )
    clip_tok = clip_like_tokenizer(clip_cfg["vocab_size"])
    t5_tok = t5_like_tokenizer(t5_cfg["vocab_size"])

    torch.manual_seed(0)
    with torch.device(device):
        t = time.perf_counter()
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        clip = CLIPTextModel(
            CLIPTextConfig(
                **clip_cfg,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        )
        t5 = T5EncoderModel(T5Config(**t5_cfg))
        connector = ella.TimestepAwareSemanticConnector(**conn_cfg)
        with torch.no_grad():  # AdaLN projections are zero-init; make them random like trained ones
            for name, p in connector.named_parameters():
                if ".ln_" in name:
                    p.normal_(0, 0.02)
        sync(device)
        log(f"built random models on {device} in {time.perf_counter() - t:.1f}s")
    models = {"unet": unet, "vae": vae, "clip": clip, "t5": t5, "connector": connector}
    for m in models.values():
        m.requires_grad_(False).eval()
        torch.nn.Module.to(m, dtype)  # nn.Module.to: no diffusers fp32-module warnings
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if conn_cfg.get("width", 768) != unet_cfg["cross_attention_dim"]:
        raise SystemExit("connector width must equal the UNet's cross_attention_dim")
    finite_t5(t5, t5_tok, notes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_config: PNDM-only keys (skip_prk_steps, ...) are ignored
        scheduler = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER)
    return dict(
        models,
        clip_tok=clip_tok,
        t5_tok=t5_tok,
        scheduler=scheduler,
        configs={"unet": unet_cfg, "vae": vae_cfg, "clip": clip_cfg, "t5": t5_cfg, "connector": dict(connector.config)},
    )


def build_runners(m: dict, args):
    """One callable per configuration: ``run(prompts, generator) -> images (np)``, and its GPU residents."""
    from diffusers import StableDiffusionPipeline

    import ella
    from ella.text import encode_text

    common = {
        "vae": m["vae"],
        "unet": m["unet"],
        "scheduler": m["scheduler"],
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    call = {
        "height": args.size,
        "width": args.size,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "output_type": "np",
    }

    plain = StableDiffusionPipeline(text_encoder=m["clip"], tokenizer=m["clip_tok"], **common)
    ours = ella.EllaStableDiffusionPipeline(
        text_encoder=None, tokenizer=None, connector=m["connector"], llm=m["t5"], llm_tokenizer=m["t5_tok"], **common
    )
    official = StableDiffusionPipeline(text_encoder=None, tokenizer=None, **common)
    official.unet = OfficialProxyUNet(m["connector"], m["unet"])  # as the release's inference.py does
    for p in (plain, ours, official):
        p.set_progress_bar_config(disable=True)

    def run_plain(prompts, generator):
        return plain(prompt=prompts, generator=generator, **call).images

    def run_ours(prompts, generator):
        return ours(prompt=prompts, generator=generator, **call).images

    def run_official(prompts, generator):
        # the release: T5 (fixed, 128 tokens) of the prompts and of "" for the negative branch
        pos = encode_text(m["t5"], m["t5_tok"], prompts, max_length=128).hidden_states
        neg = encode_text(m["t5"], m["t5_tok"], [""], max_length=128).hidden_states.expand(len(prompts), -1, -1)
        return official(prompt_embeds=pos, negative_prompt_embeds=neg, generator=generator, **call).images

    return {
        "plain": (run_plain, ("unet", "vae", "clip")),
        "ours": (run_ours, ("unet", "vae", "t5", "connector")),
        "official": (run_official, ("unet", "vae", "t5", "connector")),
    }


def place(models: dict, resident: tuple[str, ...], device: torch.device) -> None:
    """Only ``resident`` models on the device; the others parked on the CPU (so peak memory is per config)."""
    for name in ("unet", "vae", "clip", "t5", "connector"):
        torch.nn.Module.to(models[name], device if name in resident else torch.device("cpu"))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_components(models: dict, args, device: torch.device) -> list[dict]:
    """Where the ELLA overhead goes, per call: T5 encode, the batched condition table (ours), the
    connector run at every step (official) and the UNet (one step, and x steps), all with CFG rows."""
    from ella.conditioning import ConditionTable
    from ella.text import encode_text

    unet, t5, tok, connector = models["unet"], models["t5"], models["t5_tok"], models["connector"]
    scheduler = models["scheduler"]
    scheduler.set_timesteps(args.steps, device=device)
    timesteps = scheduler.timesteps

    def bench(fn, *fn_args, n=5):
        fn(*fn_args)
        times = []
        for _ in range(n):
            sync(device)
            t = time.perf_counter()
            fn(*fn_args)
            sync(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def table(feats):
        ConditionTable(connector, feats, timesteps=lambda: timesteps).precompute()

    def every_step(cfg_rows):
        for t in timesteps:
            connector(cfg_rows, t)

    rows = []
    with torch.no_grad():
        for batch in args.batches:
            texts = [PROMPTS[j % len(PROMPTS)] for j in range(batch)] + [""]
            feats = encode_text(t5, tok, texts)
            cfg_rows = feats.hidden_states[[batch] * batch + list(range(batch))]  # [negatives; positives]
            latents = torch.randn(
                2 * batch, unet.config.in_channels, args.size // 8, args.size // 8, device=device, dtype=unet.dtype
            )
            cond = connector(cfg_rows, timesteps[0])
            unet_step = bench(unet, latents, timesteps[0], cond)
            rows.append(
                {
                    "batch": batch,
                    "t5_encode_s": bench(encode_text, t5, tok, texts),
                    "condition_table_s": bench(table, feats),
                    "connector_every_step_s": bench(every_step, cfg_rows),
                    "unet_step_s": unet_step,
                    "unet_all_steps_s": unet_step * len(timesteps),
                }
            )
            r = rows[-1]
            log(
                f"components batch {batch}: T5 {r['t5_encode_s'] * 1e3:.1f} ms | table "
                f"{r['condition_table_s'] * 1e3:.1f} ms | connector x{len(timesteps)} "
                f"{r['connector_every_step_s'] * 1e3:.1f} ms | UNet step {unet_step * 1e3:.1f} ms"
            )
    return rows


def profiled_call(run, prompts: list[str], device: torch.device, finite: list[bool]) -> dict:
    """One call under torch.profiler: the GPU's busy time (sum of its kernels/copies) and op count."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # CUDA only: 3x faster to post-process
            wall = timed_call(run, prompts, device, finite)
    busy_us, ops = 0.0, 0
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA and not getattr(evt, "is_user_annotation", False):
            busy_us += getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
            ops += 1
    return {"gpu_busy_s": busy_us / 1e6, "gpu_ops": ops, "profiled_wall_s": wall}


def measure(models: dict, runners: dict, args, device: torch.device, notes: list[str]) -> list[dict]:
    """Phase 1, per config with only its models on the GPU: warm-up, then one steady-state call for peak
    memory (and, on CUDA, GPU busy time under the profiler). Phase 2, all models resident: timed calls
    with the configs interleaved (rotating order), so drift in clocks or host speed hits all alike."""
    cuda = device.type == "cuda"
    rows = {}
    for name in args.configs:
        run, resident = runners[name]
        place(models, resident, device)
        for batch in args.batches:
            prompts = [PROMPTS[j % len(PROMPTS)] for j in range(batch)]
            finite: list[bool] = []
            warm = [timed_call(run, prompts, device, finite) for _ in range(args.warmup)]
            row = {"config": name, "batch": batch, "warmup_s": warm, "resident_models": list(resident)}
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                row["resident_bytes"] = torch.cuda.memory_allocated(device)
                row.update(profiled_call(run, prompts, device, finite))
                row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
                row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            row["finite"] = finite
            rows[name, batch] = row
            log(
                f"{name:8s} batch {batch}: warmup {', '.join(f'{w:.2f}' for w in warm)} s"
                + (
                    f" | peak {row['peak_bytes'] / 1e9:.2f} GB | GPU busy {row['gpu_busy_s']:.3f} s of "
                    f"{row['profiled_wall_s']:.2f} s (profiled) | {row['gpu_ops']} GPU ops"
                    if cuda
                    else ""
                )
            )

    resident = sorted({m for name in args.configs for m in runners[name][1]})
    place(models, tuple(resident), device)
    repeats = args.repeats
    round_s = sum(min(rows[key]["warmup_s"] or [1.0]) for key in rows)  # one call of every (config, batch)
    left = args.budget_s - (time.perf_counter() - T0) - 20 - round_s  # 20 s for components, 1 warm round
    if round_s * repeats > left:
        repeats = max(1, int(left // round_s))
        if repeats < args.repeats:
            notes.append(f"repeats reduced from {args.repeats} to {repeats} to fit --budget-s {args.budget_s:g}")
    log(f"timing: {repeats} interleaved repeats of {len(rows)} (config, batch) pairs, ~{round_s:.0f} s per round")
    for batch in args.batches:
        prompts = [PROMPTS[j % len(PROMPTS)] for j in range(batch)]
        for name in args.configs:  # re-warm after the moves between CPU and GPU
            rows[name, batch]["warmup_s"].append(
                timed_call(runners[name][0], prompts, device, rows[name, batch]["finite"])
            )
        for rep in range(repeats):
            order = args.configs[rep % len(args.configs) :] + args.configs[: rep % len(args.configs)]
            for name in order:
                rows[name, batch].setdefault("times_s", []).append(
                    timed_call(runners[name][0], prompts, device, rows[name, batch]["finite"])
                )

    results = []
    for (name, batch), row in rows.items():
        times = row["times_s"]
        med = statistics.median(times)
        row.update(
            repeats=len(times),
            median_s_per_call=med,
            s_per_image=med / batch,
            min_s_per_call=min(times),
            max_s_per_call=max(times),
            all_finite=all(row.pop("finite")),
        )
        results.append(row)
        log(
            f"{name:8s} batch {batch}: timed {', '.join(f'{t:.2f}' for t in times)} s | {med / batch:.3f} s/image"
            + ("" if row["all_finite"] else " | NON-FINITE images")
        )
    return results


# ------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes (number of prompts)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per (config, batch), interleaved")
    p.add_argument("--warmup", type=int, default=1, help="untimed full calls per (config, batch)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; 64 with --tiny)")
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    p.add_argument("--dtype", default="auto", help="auto = float16 on cuda, float32 on cpu")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--configs", default="plain,ours,official")
    p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    p.add_argument("--tf32", action="store_true", help="set torch.backends.cuda.matmul.allow_tf32=True")
    p.add_argument(
        "--no-components",
        action="store_true",
        help="skip the per-component timings (T5, condition table, per-step connector, UNet step)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=400.0,
        help="wall-clock budget from start; repeats are reduced (to >= 1) to stay inside it",
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-out", help="output directory (default $OUT)")
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 512)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = set(args.configs) - {"plain", "ours", "official"}
    if bad:
        p.error(f"unknown configs {sorted(bad)}")
    if args.size % 8:
        p.error("--size must be a multiple of 8")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    import ella

    notes: list[str] = []
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "ella": ella.__version__,
        "python": platform.python_version(),
        "argv": [sys.executable] + sys.argv,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cpu_threads": torch.get_num_threads(),
    }
    settings = {
        k: getattr(args, k)
        for k in ("steps", "batches", "repeats", "warmup", "size", "guidance", "configs", "tiny", "budget_s")
    }
    settings.update(
        dtype=str(dtype).replace("torch.", ""),
        seed=SEED,
        scheduler="DPMSolverMultistepScheduler",
        t5_max_length=128,
        t5_mode="fixed",
        output_type="np",
    )
    log(
        f"{env['device_name']} | torch {env['torch']} | diffusers {env['diffusers']} | "
        f"transformers {env['transformers']} | {settings}"
    )

    models = build_models(args, device, dtype, notes)
    runners = build_runners(models, args)
    sizes = {
        k: {"params": param_count(models[k]), "bytes": param_bytes(models[k])}
        for k in ("unet", "vae", "clip", "t5", "connector")
    }
    log(
        "model sizes: "
        + ", ".join(f"{k} {v['params'] / 1e6:.1f}M ({v['bytes'] / 1e9:.2f} GB)" for k, v in sizes.items())
    )

    results = measure(models, runners, args, device, notes)
    components = []
    if not args.no_components and args.budget_s - (time.perf_counter() - T0) > 30:
        place(models, ("unet", "vae", "t5", "connector"), device)
        components = time_components(models, args, device)
    elif not args.no_components:
        notes.append("component timings skipped: --budget-s nearly spent")

    plain = {r["batch"]: r for r in results if r["config"] == "plain"}
    for r in results:
        base = plain.get(r["batch"])
        r["ratio_vs_plain"] = r["s_per_image"] / base["s_per_image"] if base else None
        r["min_ratio_vs_plain"] = r["min_s_per_call"] / base["min_s_per_call"] if base else None
        if base and r.get("gpu_busy_s") and base.get("gpu_busy_s"):
            r["gpu_ratio_vs_plain"] = r["gpu_busy_s"] / base["gpu_busy_s"]
        if r.get("gpu_busy_s"):
            r["gpu_busy_fraction"] = r["gpu_busy_s"] / r["median_s_per_call"]
    launch_bound = [r for r in results if r.get("gpu_busy_fraction", 1) < 0.8]
    if launch_bound:
        worst = min(launch_bound, key=lambda r: r["gpu_busy_fraction"])
        notes.append(
            f"the GPU is busy only {worst['gpu_busy_fraction']:.0%} of the wall time of {worst['config']} at batch "
            f"{worst['batch']}: these calls are CPU/kernel-launch bound, so wall-time ratios measure Python + launch "
            "overhead (and this host's CPU speed, which varies between calls); the GPU-work table shows the "
            "GPU's share"
        )

    def fmt_ratio(x):
        return "-" if x is None else f"{x:.3f}x"

    lines = [
        (
            f"# ELLA inference benchmark ({env['device_name']}, {settings['dtype']}, {args.size}x{args.size}, "
            f"{args.steps} steps DPM-Solver++, CFG {args.guidance}{', TINY configs' if args.tiny else ''})"
        ),
        "",
        "| config | batch | s/image | ratio vs plain | peak GB | best s/image | best ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = f"{r['peak_bytes'] / 1e9:.2f}" if "peak_bytes" in r else "-"
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['s_per_image']:.3f} | {fmt_ratio(r['ratio_vs_plain'])} "
            f"| {peak} | {r['min_s_per_call'] / r['batch']:.3f} | {fmt_ratio(r['min_ratio_vs_plain'])} |"
        )
    repeats = sorted({r["repeats"] for r in results})
    lines += [
        "",
        (
            f"s/image = median of {'/'.join(map(str, repeats))} timed calls / batch (configs interleaved, after "
            f"{args.warmup} + 1 warm-up call(s) each); peak GB = torch.cuda.max_memory_allocated() / 1e9 over one "
            "steady-state call with only that config's models on the GPU; best = fastest timed call (host noise "
            "only slows calls down, so best-of-N is the less noisy wall-time estimate)."
        ),
        "Targets: ours <= 1.03x plain; official (per-step connector) ~1.2x plain; ours peak <= 6 GB at batch 1.",
        (
            f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}; "
            f"TF32 matmul {env['matmul_allow_tf32']}; random weights."
        ),
    ]
    if any("gpu_busy_s" in r for r in results):
        lines += [
            "",
            "GPU work per call (one profiled call, torch.profiler; sum of kernel/memcpy times on the GPU):",
            "",
            "| config | batch | GPU-busy s/image | GPU ratio vs plain | GPU busy % of wall | GPU ops/call |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['config']} | {r['batch']} | {r['gpu_busy_s'] / r['batch']:.3f} | "
            f"{fmt_ratio(r.get('gpu_ratio_vs_plain'))} | {r['gpu_busy_fraction']:.0%} | {r['gpu_ops']} |"
            for r in results
            if "gpu_busy_s" in r
        ]
    if components:
        lines += [
            "",
            "Components per call (median of 5, CFG rows; ms):",
            "",
            (
                "| batch | T5 encode | condition table (ours) | connector every step (official) | UNet step "
                "| UNet x steps |"
            ),
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['batch']} | {c['t5_encode_s'] * 1e3:.1f} | {c['condition_table_s'] * 1e3:.1f} | "
            f"{c['connector_every_step_s'] * 1e3:.1f} | {c['unet_step_s'] * 1e3:.1f} | "
            f"{c['unet_all_steps_s'] * 1e3:.0f} |"
            for c in components
        ]
    lines += [f"Note: {n}" for n in notes]
    table = "\n".join(lines)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_inference.md").write_text(table + "\n")
    payload = {
        "env": env,
        "settings": settings,
        "model_sizes": sizes,
        "model_configs": models["configs"],
        "notes": notes,
        "results": results,
        "components": components,
        "prompts": PROMPTS,
        "total_wall_s": time.perf_counter() - T0,
    }
    (out / "bench_inference.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print("\n" + table, flush=True)
    log(f"wrote {out / 'bench_inference.md'} and {out / 'bench_inference.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
