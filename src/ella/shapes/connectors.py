"""The shapes world's connector stage: ELLA's training step on a dataset that fits in GPU memory.

The product trainer (``ella train``) streams images and captions from disk, as real datasets need.
The shapes world is small enough to hold whole on the GPU: 100k scenes' latents (200 MB) and the
LLM features of several captions per scene (``captions_per_scene``, 39 GB for 8 captions of 50k
scenes in bf16). So the LLM runs once per caption, before the loop, and each step only gathers a
batch: no data loader, no per-step LLM forward (40% of a step's arithmetic), nothing on the host.

The step itself is the product's: :func:`ella.train.train.diffusion_loss` (one random timestep per
sample, the connector and the frozen UNet see the same one; v-prediction here), AdamW, gradient
clipping, caption dropout to "" for classifier-free guidance — so what the toy world measures is
what ``ella train`` trains. Several wordings per scene (``captions_for``) are what teach the connector
language rather than one template; scenes with more objects are drawn more often (the hard part of
the task is five objects that must not bleed into each other).

Under ``torchrun`` every process takes its own shard of the scenes and DDP averages the gradients;
alone, it is one process.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModel, AutoTokenizer

from ..errors import EllaError
from ..io import atomic_dir
from ..text import select_hidden_states
from ..train.models import Dims
from ..train.train import diffusion_loss, out_of_time
from . import models as M
from .captions import captions_for
from .world import scene_for


@dataclass(frozen=True)
class ConnectorPlan:
    """Plain values for one connector run (the recipe fills them in)."""

    variant: str
    steps: int
    batch: int  # global: split over the processes
    lr: float
    seed: int = 0
    caption_dropout: float = 0.1
    compile: bool = False
    log_every: int = 100
    deadline: float | None = None  # time.monotonic() at which to stop early (weights saved, steps recorded)
    warmup: int = 0  # linear learning-rate warm-up steps
    feature_noise: float = 0.0  # Gaussian noise on the LLM features, in units of their RMS
    init: Path | None = None  # connector weights to continue from (a single safetensors file)
    init_record: dict | None = None  # what ``init`` was trained on: carried into training.json
    llm_layers: tuple[int, ...] | None = None  # MiniLM layers the features concatenate (None: the last)


def log(msg: str) -> None:
    print(f"[shapes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def encode_captions(
    llm, tokenizer, captions: list[str], device, chunk: int = 2048, llm_layers: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[len(captions), 128, 384 * layers]`` bf16 features and their ``[len, 128]`` masks, computed once on
    ``device``: MiniLM's last layer, or the ``llm_layers`` side by side (as ``ella.text`` reads them at inference).

    Written into one preallocated tensor: concatenating chunks would need twice the memory for a moment."""
    device = torch.device(device)
    width = M.CROSS_ATTENTION_DIM * len(llm_layers or (None,))
    features = torch.empty(len(captions), M.LLM_MAX_LENGTH, width, dtype=torch.bfloat16, device=device)
    masks = torch.empty(len(captions), M.LLM_MAX_LENGTH, dtype=torch.bool, device=device)
    for start in range(0, len(captions), chunk):
        tokens = tokenizer(
            captions[start : start + chunk],
            padding="max_length",
            truncation=True,
            max_length=M.LLM_MAX_LENGTH,
            return_tensors="pt",
        ).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = llm(
                input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"],
                output_hidden_states=llm_layers is not None,
            )
            out = select_hidden_states(out, list(llm_layers) if llm_layers else None)
        features[start : start + len(out)] = out.to(torch.bfloat16)
        masks[start : start + len(out)] = tokens["attention_mask"].bool()
    return features, masks


@dataclass
class ConnectorData:
    """What every variant trains on, built once per process: features of ``k`` captions per scene, latents."""

    features: torch.Tensor  # [scenes * k, 128, 384] bf16: caption j of scene i is row i * k + j
    masks: torch.Tensor  # [scenes * k, 128] bool
    empty_features: torch.Tensor  # the "" caption (caption dropout; the negative prompt at inference)
    empty_mask: torch.Tensor
    latents: torch.Tensor  # [scenes, 4, 16, 16]
    weights: torch.Tensor  # [scenes * k]: how often each caption is drawn (the scene's object count)
    captions_per_scene: int
    setup_seconds: float
    features_rms: float = 1.0  # over every caption token, pads included: the scale of ``feature_noise``


def prepare_data(
    seed: int,
    latents: torch.Tensor,
    scene_indices: list[int],
    captions_per_scene: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    llm_layers: tuple[int, ...] | None = None,
) -> ConnectorData:
    """This process's ``rank::world`` share of the scenes, their captions encoded by MiniLM on ``device``.

    ``latents[j]`` is the VAE latent of world scene ``scene_indices[j]`` (``scene_for(seed, i)``)."""
    t0 = time.perf_counter()
    mine = list(range(rank, len(scene_indices), world))
    k = captions_per_scene
    jobs = [(seed, [scene_indices[j] for j in mine[i : i + 500]], k) for i in range(0, len(mine), 500)]
    # Writing ~100k captions a second needs every core: a fork pool (the workers only build strings).
    with multiprocessing.get_context("fork").Pool(max(1, (os.cpu_count() or 1) // world)) as pool:
        parts = pool.map(_captions_of, jobs)
    captions = [c for part, _ in parts for c in part] + [""]
    objects = torch.tensor([n for _, counts in parts for n in counts], dtype=torch.float)
    llm = AutoModel.from_pretrained(str(M.minilm_path())).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(M.minilm_path()))
    features, masks = encode_captions(llm, tokenizer, captions, device, llm_layers=llm_layers)
    seconds = time.perf_counter() - t0
    if rank == 0:
        log(
            f"connector data: {len(captions) - 1} captions of {len(mine)} scenes encoded per process "
            f"({features.numel() * 2 / 2**30:.1f} GiB) in {seconds:.0f} s"
        )
    return ConnectorData(
        features=features[:-1],
        masks=masks[:-1],
        empty_features=features[-1],
        empty_mask=masks[-1],
        latents=latents[mine].to(device, torch.float32),
        weights=objects.repeat_interleave(k).to(device),
        captions_per_scene=k,
        setup_seconds=round(seconds, 1),
        features_rms=_rms(features[:-1], world),
    )


def _rms(features: torch.Tensor, world: int, chunk: int = 8192) -> float:
    """Root mean square of every element over every process's share, in chunks (a float32 copy of 37 GiB of
    bf16 would not fit): one scale for all processes, as if one process held every caption."""
    total = torch.zeros(2, dtype=torch.float64, device=features.device)
    for i in range(0, len(features), chunk):
        total[0] += features[i : i + chunk].float().pow(2).sum().double()
    total[1] = features.numel()
    if world > 1:
        dist.all_reduce(total)
    return math.sqrt(total[0].item() / max(total[1].item(), 1))


def _captions_of(job: tuple[int, list[int], int]) -> tuple[list[str], list[int]]:
    """``k`` training captions of each scene, and each scene's object count."""
    seed, indices, k = job
    return [c for i in indices for c in captions_for(seed, i, k)], [len(scene_for(seed, i).objects) for i in indices]


@dataclass
class FrozenBase:
    """The base's UNet (and its compiled forward, shared by every variant: it compiles once) and noise schedule."""

    unet: torch.nn.Module
    forward: torch.nn.Module
    scheduler: DDPMScheduler
    dims: Dims

    @classmethod
    def load(cls, base: Path, device: torch.device, compile: bool) -> FrozenBase:
        weight_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU bf16 kernels are slow
        unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=weight_dtype).to(device)
        unet.requires_grad_(False)
        dims = Dims(
            llm_hidden=M.CROSS_ATTENTION_DIM,
            cross_attention_dim=M.CROSS_ATTENTION_DIM,
            pooled_dim=None,
            unet_config=dict(unet.config),
        )
        # static shapes: every batch is full and every caption is 128 tokens
        forward = torch.compile(unet, dynamic=False) if compile else unet
        return cls(unet, forward, DDPMScheduler.from_pretrained(base / "scheduler"), dims)


def train_connector(
    plan: ConnectorPlan,
    data: ConnectorData,
    frozen: FrozenBase,
    out: Path,
    *,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Train ``plan.variant`` against the frozen base; write ``out/ella.safetensors`` + ``training.json``."""
    if plan.batch % world:
        raise EllaError(f"connector batch {plan.batch} must divide evenly over {world} processes")
    connector = M.new_connector(plan.variant, seed=plan.seed, llm_layers=plan.llm_layers)
    if plan.init is not None:
        connector.load_state_dict({k: v.float() for k, v in load_file(plan.init).items()})
    connector = connector.to(device).train()
    model = (
        DistributedDataParallel(connector, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else connector
    )
    if plan.compile:
        model = torch.compile(model, dynamic=False)
    opt = torch.optim.AdamW(connector.parameters(), lr=plan.lr, weight_decay=0.01, fused=device.type == "cuda")
    # Adam starts with no moments, so a connector that is already trained needs the warm-up as much as a new one.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (plan.warmup + 1)))
    noise_scale = plan.feature_noise * data.features_rms
    gen = torch.Generator(device).manual_seed(plan.seed * 1_000_003 + rank)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    per_process = plan.batch // world
    k = data.captions_per_scene
    use_mask = connector.output_follows_text  # the MLP's tokens follow the text: its pads are masked
    training = {"steps": 0, "max_train_steps": plan.steps, "batch": plan.batch, "stopped_by": "steps"}
    if plan.feature_noise:
        training["feature_noise"] = plan.feature_noise
    if plan.llm_layers:
        training["llm_layers"] = list(plan.llm_layers)
    if plan.init is not None:
        training["continued_from"] = plan.init_record or {"file": str(plan.init)}
    t_loop = time.perf_counter()
    for step in range(1, plan.steps + 1):
        if step % 25 == 0 and out_of_time(plan.deadline):  # every 25 steps: the check syncs the processes
            training["stopped_by"] = "time"
            break
        idx = torch.multinomial(data.weights, per_process, replacement=True, generator=gen)
        drop = torch.rand(per_process, generator=gen, device=device) < plan.caption_dropout
        feats = data.features[idx]
        if noise_scale:
            # Noise on the features, not the words: the connector can't lean on one exact feature vector per
            # training word, so an unseen word whose features lie near a known one ("high" ~ "top") reads alike.
            feats = feats + noise_scale * torch.randn(feats.shape, generator=gen, device=device, dtype=feats.dtype)
        feats = torch.where(drop[:, None, None], data.empty_features, feats)
        mask = torch.where(drop[:, None], data.empty_mask, data.masks[idx])
        with autocast:
            loss = diffusion_loss(
                model,
                frozen.forward,
                frozen.scheduler,
                data.latents[idx // k],
                feats,
                mask if use_mask else None,
                dims=frozen.dims,
                generator=gen,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(connector.parameters(), 1.0)
        opt.step()
        schedule.step()
        training["steps"] = step
        if step % plan.log_every == 0 or step == plan.steps:
            value = loss.item()
            if not math.isfinite(value):
                raise EllaError(
                    f"connector {plan.variant}: the loss became {value} at step {step}; "
                    "lower the learning rate (--connector-lr)"
                )
            if rank == 0:
                rate = step * plan.batch / (time.perf_counter() - t_loop)
                log(f"connector {plan.variant} step {step}/{plan.steps} loss {value:.4f} ({rate:.0f} samples/s)")
    seconds = time.perf_counter() - t_loop
    record = plan.init_record or {}
    earlier = record.get("samples_total", record.get("samples_seen", 0))
    training.update(
        samples_seen=training["steps"] * plan.batch,
        samples_total=earlier + training["steps"] * plan.batch,
        captions_per_scene=k,
        setup_seconds=data.setup_seconds,
        train_seconds=round(seconds, 1),
        samples_per_second=round(training["steps"] * plan.batch / max(seconds, 1e-9)),
    )
    if rank == 0:
        with atomic_dir(out) as staging:
            connector.eval().save_single_file(staging / "ella.safetensors")
            (staging / "training.json").write_text(json.dumps(training, indent=2, allow_nan=False) + "\n")
        log(
            f"connector {plan.variant}: {training['steps']} steps ({training['samples_seen']} samples) "
            f"in {seconds:.0f} s, stopped by {training['stopped_by']}"
        )
    if world > 1:
        dist.barrier()
    return training
