"""``ella shapes reproduce``: train the whole mini ELLA from nothing, in stages, each resumable by its output.

1. **world** — render ``n_train`` scenes and their dense captions into webdataset tar shards;
2. **vae** — a small f=4 VAE (64x64x3 -> 16x16x4) on those renders; scaling factor = 1/std of latents;
3. **cache** — ``ella cache`` the latents with that VAE (the trainer and the base loop read them);
4. **base** — the UNet conditioned on the weak 20-token encoder, trained and then frozen;
5. **connectors** — the product's training step (``ella.train.train.diffusion_loss``) on data held in GPU
   memory (``connectors.py``), MiniLM as the LLM, ``captions_per_scene`` wordings of every scene, one run
   per Table 6 variant: ``tsc``, ``resampler`` (no timestep), ``mlp``, each seeing the same number of samples;
6. **eval** — shapes-DPG for the base and every connector on four kinds of prompt (training-style, held-out
   wording, terse tags, under-specified) at every object count 1-5 (``evaluate.py``).

A stage whose output exists is skipped, and a missing stage runs only if the stage asked for (``until``)
needs it, so a run cut off (e.g. by a GPU-time limit) resumes with the same command, and a run whose
trained stages were copied in (VAE, base, connectors) rebuilds neither world nor latents to score them.

One process, or one per GPU under ``torchrun`` / ``accelerate launch`` (``gpus.py``): every stage is
data-parallel over the launcher's processes. Batch sizes are global — the same values mean the same
run on one GPU or eight — and the VAE and base loops draw each global batch from one generator seeded
alike everywhere, each process training on its slice, so N processes take the steps one process takes.
Values are plain dataclass fields (nanoGPT style); ``smoke=True`` shrinks everything so the whole
recipe runs in seconds on a CPU (the test suite does that).
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import tarfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from ..devices import check_device, default_device
from ..errors import EllaError, require
from ..io import atomic_dir, atomic_path, file_in_the_way
from ..train.cache import write_cache
from ..train.config import MAX_SEED
from ..train.data import Augment, open_dataset, read_cache_index
from ..train.speed import resolve_compile
from ..train.train import out_of_time
from . import gpus
from . import models as M
from .captions import caption_for
from .connectors import ConnectorPlan, FrozenBase, prepare_data, train_connector
from .evaluate import evaluate, roundtrip_accuracy
from .gpus import Group, from_main, local_slice
from .world import render, scene_for

VARIANTS = ("tsc", "resampler", "mlp")
STAGES = ("world", "vae", "cache", "base", "connectors", "eval")
#: What each stage reads: a missing stage is rebuilt only when a stage that must run needs it.
NEEDS = {
    "world": (),
    "vae": ("world",),
    "cache": ("world", "vae"),
    "base": ("cache", "vae"),
    "connectors": ("cache", "base"),
    "eval": ("base", "connectors"),
}


@dataclass
class Recipe:
    out: str = "shapes-run"
    seed: int = 0
    device: str = "auto"  # auto: cuda when this machine has a GPU, else cpu (decided when the run starts)
    n_train: int = 100_000  # scenes (one caption each)
    shard_size: int = 10_000
    vae_steps: int = 4_000
    vae_batch: int = 1024  # global: split over the processes
    vae_lr: float = 1e-3
    base_steps: int = 6_000
    base_batch: int = 2048  # global: split over the processes
    base_lr: float = 5e-4
    base_warmup: int = 500  # linear warm-up steps (a fresh UNet at this rate and batch)
    base_caption_dropout: float = 0.1
    # The shipped TSC: 5,300 steps of these (5.4M samples) reached 93.4 on shapes-DPG; 0.54M did not
    # beat the base (benchmarks/RESULTS.md).
    connector_steps: int = 6_000
    connector_batch: int = 1024  # global: split over the processes
    connector_lr: float = 6e-4  # the paper's 1e-4 is for a 67M connector on 34M pairs; this one is small
    # Wordings per scene the connector learns from (``captions.captions_for``): language, not one template.
    captions_per_scene: int = 8
    # Training time of the first variant, in minutes (None: connector_steps); the variants after it train
    # as many steps as it reached, so every variant sees the same number of samples.
    connector_minutes: float | None = None
    # Continue from an earlier run's connectors (a run directory: connector-<variant>/ella.safetensors for
    # every variant) rather than from scratch: a training longer than one lent GPU session is several runs.
    connector_init: str | None = None
    connector_warmup: int = 0  # linear learning-rate warm-up steps (Adam's moments start empty either way)
    # Gaussian noise added to the LLM features during connector training, in units of their RMS (0 = none).
    feature_noise: float = 0.0
    # Several MiniLM hidden layers side by side as the connector's input (e.g. -1 -3 -5; hidden state 0 is the
    # embeddings), as Playground v3 / Lumina read their LLMs; None: the last layer, as the release reads T5.
    llm_layers: tuple[int, ...] | None = None
    variants: tuple[str, ...] = VARIANTS
    # torch.compile the UNet in the base loop and the trainer; None: on a GPU yes, on a CPU no (compiling
    # there costs more than it saves on a run this size).
    compile: bool | None = None
    # Unix time at which the base loop and the connector runs stop early, saving what they have (each
    # records its steps in training.json): for a machine lent until a known time. None = run every step.
    stop_at: float | None = None
    eval_items: int = 100  # held-out scenes per object count (1-5) and prompt kind, 4 seeds each (DPG-Bench)
    eval_steps: int = 25
    eval_guidance: float = 5.0
    log_every: int = 100

    @classmethod
    def smoke(cls, out: str) -> Recipe:
        """CPU-sized: every stage runs, on a handful of samples and steps."""
        return cls(
            out=out,
            device="cpu",
            n_train=24,
            shard_size=12,
            vae_steps=3,
            vae_batch=4,
            base_steps=3,
            base_batch=4,
            base_warmup=1,
            connector_steps=2,
            connector_batch=4,
            captions_per_scene=2,
            eval_items=1,
            eval_steps=2,
            log_every=1,
            compile=False,
        )

    def check(self, world: int = 1) -> None:
        """Fail in one line, before any work, on a value that can't run — over ``world`` processes."""
        for f in fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if f.name in INT_RANGES:
                low, high = INT_RANGES[f.name]
                bad_type = isinstance(value, bool) or not isinstance(value, int)
                if bad_type or value < low or (high is not None and value > high):
                    what = f">= {low}" if high is None else f"in [{low}, {high}]"
                    raise EllaError(f"{flag} must be an integer {what}; got {value!r}")
            elif f.name in FLOAT_RANGES:
                if value is None and f.default is None:
                    continue
                ok, what = FLOAT_RANGES[f.name]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise EllaError(f"{flag} must be a finite number ({what}); got {value!r}")
                if not ok(value):
                    raise EllaError(f"{flag} must be {what}; got {value!r}")
        for name in ("vae_batch", "base_batch", "connector_batch"):
            if getattr(self, name) % world:
                raise EllaError(
                    f"{name}={getattr(self, name)} is the global batch and must divide evenly over "
                    f"{world} processes (one per GPU); pick a multiple of {world}"
                )
        if not isinstance(self.variants, tuple) or not self.variants:
            raise EllaError(f"--variants must be a tuple of one or more of {', '.join(VARIANTS)}; got {self.variants}")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise EllaError(f"unknown connector variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise EllaError(f"--variants names a variant twice: {' '.join(self.variants)}")
        if self.llm_layers is not None:
            depth = M.MINILM_LAYERS + 1  # hidden states: the embeddings, then one per layer
            bad = [
                i for i in self.llm_layers if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth
            ]
            if bad or len(self.llm_layers) < 2 or len(set(self.llm_layers)) != len(self.llm_layers):
                raise EllaError(
                    f"--llm-layers takes two or more distinct MiniLM hidden-state indices in [-{depth}, {depth - 1}] "
                    f"(0 = embeddings, -1 = last layer); got {' '.join(map(str, self.llm_layers))}"
                )
        if self.connector_init is not None:
            missing = [str(p) for p in self.connector_inits().values() if not p.is_file()]
            if missing:
                raise EllaError(
                    f"--connector-init {self.connector_init}: no connector weights at {', '.join(missing)} "
                    "(expected a run directory with connector-<variant>/ella.safetensors for every --variants)"
                )
        if self.compile is not None and not isinstance(self.compile, bool):
            raise EllaError(f"--compile must be true or false; got {self.compile!r}")
        if not isinstance(self.device, str) or not self.device:
            raise EllaError(f"--device must be auto, cpu, cuda or mps; got {self.device!r}")
        check_run_dir(Path(self.out))

    def resolved(self, world: int = 1) -> Recipe:
        """The values decided when the run starts: the device this machine has, and compile for it."""
        device = default_device() if self.device == "auto" else check_device(self.device)
        if world > 1 and torch.device(device).index is not None:
            raise EllaError(
                f"--device {device}: under a launcher each process takes its own GPU (LOCAL_RANK); "
                "pass --device cuda (or leave it at auto)"
            )
        return replace(self, device=device, compile=resolve_compile(self.compile, device))

    @property
    def root(self) -> Path:
        return Path(self.out)

    def connector_inits(self) -> dict[str, Path]:
        """The weights each variant continues from ({} without ``connector_init``)."""
        if self.connector_init is None:
            return {}
        return {v: Path(self.connector_init) / f"connector-{v}" / "ella.safetensors" for v in self.variants}


#: Integer fields: (smallest, largest or None) value each can take.
INT_RANGES = {
    "seed": (0, MAX_SEED - 1),  # the connector trainer seeds NumPy, which takes 32 bits
    "n_train": (1, None),
    "shard_size": (1, None),
    "vae_steps": (1, None),
    "vae_batch": (1, None),
    "base_steps": (1, None),
    "base_batch": (1, None),
    "base_warmup": (0, None),
    "connector_steps": (1, None),
    "connector_batch": (1, None),
    "captions_per_scene": (1, 64),
    "connector_warmup": (0, None),
    "eval_items": (1, None),
    "eval_steps": (1, M.SCHEDULER_CONFIG["num_train_timesteps"]),  # DDIM can't take more steps than it has
    "log_every": (1, None),
}
#: Number fields: what each may be (all must be finite).
FLOAT_RANGES = {
    "vae_lr": (lambda v: v > 0, "> 0"),
    "base_lr": (lambda v: v > 0, "> 0"),
    "connector_lr": (lambda v: v > 0, "> 0"),
    "connector_minutes": (lambda v: v > 0, "> 0"),
    "feature_noise": (lambda v: 0 <= v <= 10, "in [0, 10]"),
    "base_caption_dropout": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "eval_guidance": (lambda v: v >= 0, ">= 0"),
    "stop_at": (lambda v: v > 0, "a Unix time, > 0"),
}


def check_run_dir(out: Path) -> None:
    """The run directory must be a directory we can create: not a file, not under one."""
    if out.exists() and not out.is_dir():
        raise EllaError(f"--out {out} is a file; give a directory for the run")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise EllaError(f"--out {out} is under {blocker}, which is a file; give a directory for the run")
    if out.exists() and not os.access(out, os.W_OK | os.X_OK):
        raise EllaError(f"--out {out} is not writable; pick a directory you can write to")


def log(msg: str) -> None:
    print(f"[shapes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_pool(processes: int) -> multiprocessing.pool.Pool:
    """A pool of CPU workers for rendering (pure PIL, so fork is safe and fast, even beside CUDA)."""
    return multiprocessing.get_context("fork").Pool(max(1, min(16, processes)))


def cpus_per_process(group: Group) -> int:
    return max(1, (os.cpu_count() or 1) // group.world)


# ----------------------------------------------------------------------------------- 1. world


def make_world(r: Recipe, g: Group) -> Path:
    """Tar shards in img2dataset layout (``key.png`` + ``key.txt``): any trainer data path reads them.

    Each process writes every ``world``-th shard; rank 0 marks the world done once all are written.
    """
    shards = r.root / "world"
    jobs = [
        (r.seed, start, min(start + r.shard_size, r.n_train), shards / f"{start // r.shard_size:05d}.tar")
        for start in range(0, r.n_train, r.shard_size)
    ]
    shards.mkdir(parents=True, exist_ok=True)
    with cpu_pool(cpus_per_process(g)) as pool:
        pool.map(_write_shard, gpus.shard(g, jobs))
    gpus.barrier(g)
    if g.main:
        with atomic_path(shards / "done.json") as tmp:
            tmp.write_text(json.dumps({"n_train": r.n_train, "seed": r.seed}))
        log(f"world: {r.n_train} scenes in {shards}")
    return shards


def _write_shard(job: tuple[int, int, int, Path]) -> None:
    seed, start, stop, path = job
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for i in range(start, stop):
            buf = io.BytesIO()
            render(scene_for(seed, i), size=M.RESOLUTION).save(buf, format="PNG")
            for name, payload in ((f"{i:07d}.png", buf.getvalue()), (f"{i:07d}.txt", caption_for(seed, i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _render_range(job: tuple[int, int, int]) -> np.ndarray:
    seed, start, stop = job
    return np.stack([np.asarray(render(scene_for(seed, i), size=M.RESOLUTION)) for i in range(start, stop)])


def load_world_images(r: Recipe, g: Group) -> torch.Tensor:
    """Every scene's render as one uint8 tensor [N, 3, 64, 64] (100k scenes: 1.2 GB).

    Every process holds them all (rendering is ~0.4 ms a scene, so this costs seconds): each global
    batch draws from the whole world, whatever the number of processes.
    """
    jobs = [(r.seed, s, min(s + r.shard_size, r.n_train)) for s in range(0, r.n_train, r.shard_size)]
    with cpu_pool(cpus_per_process(g)) as pool:
        parts = pool.map(_render_range, jobs)
    return torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------- 2. vae


class VaeLoss(torch.nn.Module):
    """The VAE's training loss as one ``forward``, so DDP sees (and syncs) the whole encode-decode step.

    The posterior's noise ``eps`` comes from outside: drawn for the global batch, sliced per process.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mean + posterior.std * eps.to(posterior.mean.dtype)).sample
        # Reconstruction dominates; a tiny KL keeps the latent space smooth enough for diffusion.
        return F.mse_loss(recon.float(), x.float()) + 1e-6 * posterior.kl().mean()


def train_vae(r: Recipe, g: Group) -> Path:
    device = g.device
    images = load_world_images(r, g).to(device)
    vae = M.new_vae(r.seed).to(device).train()
    step_fn = gpus.data_parallel(VaeLoss(vae), g)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    # The first full run (constant 1e-3, no clipping) ended on a loss spike with colours lost in the round
    # trip (oracle colour accuracy 13%): decay the rate to zero and clip, so the last step is a good one.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.vae_lr, total_steps=r.vae_steps, pct_start=0.05)
    gen = torch.Generator(device).manual_seed(r.seed)  # alike on every process: the global batch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0 = time.perf_counter()
    for step in range(1, r.vae_steps + 1):
        idx = torch.randint(0, len(images), (r.vae_batch,), generator=gen, device=device)
        eps = torch.randn((r.vae_batch, *M.LATENT_SHAPE), generator=gen, device=device)
        x = images[local_slice(g, idx)].float() / 127.5 - 1
        with autocast:
            loss = step_fn(x, local_slice(g, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if g.main and (step % r.log_every == 0 or step == r.vae_steps):
            rate = step * r.vae_batch / (time.perf_counter() - t0)
            log(f"vae step {step}/{r.vae_steps} loss {loss.item():.5f} ({rate:.0f} samples/s)")
    if g.main:
        save_vae(r, vae.eval(), images)
    gpus.barrier(g)
    return r.root / "vae"


def save_vae(r: Recipe, vae: AutoencoderKL, images: torch.Tensor) -> None:
    """Scaling factor, the round-trip check, then the VAE directory (atomically)."""
    path = r.root / "vae"
    with torch.no_grad():  # SD's recipe: scale latents to unit variance for the diffusion model
        x = images[: min(len(images), 2048)].float() / 127.5 - 1
        std = torch.cat([vae.encode(b).latent_dist.mode() for b in x.split(256)]).float().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    kept = roundtrip_accuracy(vae, n_scenes=100 if r.device != "cpu" else 2, seed=r.seed)
    with atomic_dir(path) as staging:
        vae.save_pretrained(staging)
        (staging / "roundtrip.json").write_text(json.dumps({"oracle_yes_percent": round(kept, 2)}) + "\n")
    log(f"vae: latent std {std:.4f} -> scaling_factor {1 / std:.4f}; round trip keeps {kept:.1f}% of the facts")
    if kept < 95.0:
        log(
            f"WARNING: the VAE loses {100 - kept:.1f}% of the facts the oracle checks; that caps every row "
            "(train it longer: --vae-steps)"
        )


def write_base(r: Recipe, unet, vae_path: Path, training: dict | None = None) -> Path:
    """A StableDiffusionPipeline directory: VAE, UNet, weak encoder + its tokenizer, DDIM (trailing, v-pred)."""
    # The base ships in fp16: round it now, so the connectors train against exactly the shipped weights.
    unet = unet.half().float()
    encoder, tokenizer = M.weak_text_encoder()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_path),
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(M.SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = r.root / "base"
    with atomic_dir(path) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        if training is not None:  # how far the loop got (a time limit may have stopped it early)
            (staging / "training.json").write_text(json.dumps(training, indent=2, allow_nan=False) + "\n")
    return path


# ---------------------------------------------------------------------------------- 3. cache


def cache_latents(r: Recipe, g: Group, world: Path, vae_path: Path) -> Path:
    """``ella cache``'s latents, written by rank 0 (seconds on a GPU) while the others wait."""
    path = r.root / "cache"
    if g.main:
        dataset = open_dataset(str(world), Augment(resolution=M.RESOLUTION, center_crop=True, caption_dropout=0.0))
        write_cache(
            dataset,
            path,
            AutoencoderKL.from_pretrained(vae_path),
            batch_size=256 if r.device != "cpu" else 8,
            shard_size=r.shard_size,
            device=g.device,
            source=str(world),
            base=str(vae_path),
            progress=False,
        )
    gpus.barrier(g)
    return path


def cached_latents_and_captions(cache: Path) -> tuple[torch.Tensor, list[str]]:
    return _read_cache(cache, "captions")


def cached_latents_and_keys(cache: Path) -> tuple[torch.Tensor, list[str]]:
    """The latents and their keys (``"<shard>/0000042"`` is ``scene_for(seed, 42)``)."""
    return _read_cache(cache, "keys")


def _read_cache(cache: Path, field: str) -> tuple[torch.Tensor, list[str]]:
    index = read_cache_index(cache)
    latents, values = [], []
    for shard in index["shards"]:
        latents.append(load_file(cache / f"{shard['name']}.safetensors")["latents"])
        values += json.loads((cache / f"{shard['name']}.json").read_text())[field]
    return torch.cat(latents), values


# ----------------------------------------------------------------------------------- 4. base


def train_base(r: Recipe, g: Group, cache: Path, vae_path: Path) -> Path:
    """The frozen base: UNet on cached latents, conditioned on the weak encoder (first 20 tokens only)."""
    device = g.device
    latents, captions = cached_latents_and_captions(cache)
    latents = latents.to(device)
    encoder, tokenizer = M.weak_text_encoder()
    encoder.to(device)
    with torch.no_grad():  # the weak encoder is frozen and non-contextual: encode every caption once
        conds = []
        for i in range(0, len(captions), 1024):
            ids = tokenizer(
                captions[i : i + 1024] + [""],
                padding="max_length",
                max_length=M.WEAK_MAX_LENGTH,
                truncation=True,
                return_tensors="pt",
            ).to(device)
            conds.append(encoder(**ids)[0].to(torch.bfloat16))
        empty = conds[-1][-1]
        conds = torch.cat([c[:-1] for c in conds])
    del encoder
    unet = M.new_unet(r.seed).to(device).train()  # same seed on every process: identical replicas
    ema = EMAModel(unet.parameters(), decay=0.999, foreach=True)
    model = gpus.data_parallel(unet, g)
    # Fixed batch, so static shapes (dynamic ones crashed inductor's GroupNorm backward at batch 1024).
    forward = torch.compile(model, dynamic=False) if r.compile else model
    sched = M.new_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=r.base_lr, weight_decay=0.01)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=r.base_warmup)
    gen = torch.Generator(device).manual_seed(r.seed + 1)  # alike on every process: the global batch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    n = r.base_batch
    t0 = time.perf_counter()
    deadline = time.monotonic() + (r.stop_at - time.time()) if r.stop_at else None
    training = {"steps": 0, "max_steps": r.base_steps, "batch": r.base_batch, "stopped_by": "steps"}
    for step in range(1, r.base_steps + 1):
        if step % 25 == 0 and out_of_time(deadline):  # every 25 steps: the check syncs the processes
            training["stopped_by"] = "time"
            break
        training["steps"] = step
        idx = torch.randint(0, len(latents), (n,), generator=gen, device=device)
        drop = torch.rand(n, generator=gen, device=device) < r.base_caption_dropout
        noise = torch.randn((n, *M.LATENT_SHAPE), generator=gen, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen, device=device)
        idx, drop, noise, t = (local_slice(g, v) for v in (idx, drop, noise, t))
        x0 = latents[idx].float()
        cond = torch.where(drop[:, None, None], empty, conds[idx]).float()
        with autocast:
            pred = forward(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), sched.get_velocity(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        if g.main and (step % r.log_every == 0 or step == r.base_steps):
            rate = step * r.base_batch / (time.perf_counter() - t0)
            log(f"base step {step}/{r.base_steps} loss {loss.item():.4f} ({rate:.0f} samples/s)")
    if g.main:
        ema.copy_to(unet.parameters())
        training["samples"] = training["steps"] * r.base_batch
        log(f"base: {training['steps']} steps ({training['samples']} samples), stopped by {training['stopped_by']}")
        write_base(r, unet.eval().to("cpu"), vae_path, training)
    gpus.barrier(g)
    return r.root / "base"


# ----------------------------------------------------------------------------- 5. connectors


def train_connectors(r: Recipe, g: Group, cache: Path, base: Path) -> dict[str, Path]:
    """Each variant not trained yet, in turn, data-parallel over every process, on data encoded once for all.

    Every variant sees the same number of samples: with ``connector_minutes`` the first variant trains for
    that long and the later ones train as many steps as it reached."""
    out = {v: r.root / f"connector-{v}" for v in r.variants}
    todo = from_main(g, [v for v in r.variants if not (out[v] / "ella.safetensors").is_file()])
    if not todo:
        return out
    steps = from_main(g, _steps_of_first(r, out))
    latents, keys = cached_latents_and_keys(cache)
    scenes = [int(k.rsplit("/", 1)[-1]) for k in keys]  # "<shard>/0000042" is scene_for(seed, 42)
    data = prepare_data(
        r.seed, latents, scenes, r.captions_per_scene, g.device, g.rank, g.world, llm_layers=r.llm_layers
    )
    frozen = FrozenBase.load(base, g.device, compile=bool(r.compile))
    for variant in todo:
        deadline = None
        if r.connector_minutes and steps is None:
            deadline = time.monotonic() + 60 * r.connector_minutes
        if r.stop_at:
            deadline = min(deadline or math.inf, time.monotonic() + r.stop_at - time.time())
        plan = ConnectorPlan(
            variant=variant,
            steps=steps or r.connector_steps,
            batch=r.connector_batch,
            lr=r.connector_lr,
            seed=r.seed,
            compile=bool(r.compile),
            log_every=r.log_every,
            deadline=deadline,
            warmup=r.connector_warmup,
            feature_noise=r.feature_noise,
            llm_layers=r.llm_layers,
            **_continued(r, variant),
        )
        if g.main:
            log(
                f"connector {variant}: {M.param_count(M.new_connector(variant)) / 1e6:.2f}M parameters, "
                f"{plan.steps} steps x {plan.batch}" + (f" over {g.world} processes" if g.world > 1 else "")
            )
        training = train_connector(plan, data, frozen, out[variant], device=g.device, rank=g.rank, world=g.world)
        if r.connector_minutes and steps is None:
            steps = training["steps"]  # the later variants: as many samples as this one
    return out


def _continued(r: Recipe, variant: str) -> dict:
    """``init`` and ``init_record`` of the plan: the earlier weights, and what they were trained on."""
    init = r.connector_inits().get(variant)
    if init is None:
        return {}
    record = init.parent / "training.json"
    earlier = json.loads(record.read_text()) if record.is_file() else {}
    keep = ("steps", "batch", "samples_seen", "samples_total", "feature_noise", "continued_from")
    return {"init": init, "init_record": {"file": str(init), **{k: earlier[k] for k in keep if k in earlier}}}


def _steps_of_first(r: Recipe, out: dict[str, Path]) -> int | None:
    """With ``connector_minutes``, the step count of the first variant already trained (the later ones match it)."""
    if not r.connector_minutes:
        return None
    for variant in r.variants:
        record = out[variant] / "training.json"
        if record.is_file():
            return int(json.loads(record.read_text())["steps"])
    return None


# -------------------------------------------------------------------------------- the stages


def stage_done(r: Recipe, stage: str) -> bool:
    """Whether ``stage``'s output is on disk (eval is never done: it rescores what it can from its results)."""
    markers = {
        "world": [r.root / "world" / "done.json"],
        "vae": [r.root / "vae" / "config.json"],
        "cache": [r.root / "cache" / "cache.json"],
        "base": [r.root / "base" / "model_index.json"],
        "connectors": [r.root / f"connector-{v}" / "ella.safetensors" for v in r.variants],
        "eval": [],
    }[stage]
    return bool(markers) and all(p.is_file() for p in markers)


def plan(done: dict[str, bool], until: str) -> list[str]:
    """The stages to run for ``until``: it, if not done, and each missing stage that a stage to run reads."""
    wanted = {until}
    for stage in reversed(STAGES[: STAGES.index(until) + 1]):
        if stage in wanted and not done[stage]:
            wanted.update(NEEDS[stage])
    return [s for s in STAGES if s in wanted and not done[s]]


def check_world(r: Recipe) -> None:
    """A world already in ``out`` must be this recipe's: stages built on another would mix two runs."""
    path = r.root / "world" / "done.json"
    if not path.is_file():
        return
    try:
        made = json.loads(path.read_text())
    except ValueError:
        made = None
    if not isinstance(made, dict):
        raise EllaError(f"{path} is not the record `ella shapes reproduce` writes; use another --out")
    if made != {"n_train": r.n_train, "seed": r.seed}:
        raise EllaError(
            f"--out {r.root} holds a world of {made.get('n_train')} scenes with seed {made.get('seed')}, "
            f"not {r.n_train} with seed {r.seed}; use those values or another --out"
        )


def reproduce(r: Recipe, until: str = "eval") -> dict:
    """Every stage in order up to ``until`` (finished ones skipped); returns the paths and wall time per stage.

    Under ``torchrun`` / ``accelerate launch`` every process calls this; each returns the same result.
    """
    if until not in STAGES:
        raise EllaError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
    world = gpus.launched_world_size()
    r.check(world)
    check_world(r)
    require("webdataset", "train")  # the world's tar shards and their latent cache: all the recipe needs of [train]
    r = r.resolved(world)
    with gpus.join(r.device) as g:
        return _reproduce(r, g, until)


def _reproduce(r: Recipe, g: Group, until: str) -> dict:
    done = from_main(g, {stage: stage_done(r, stage) for stage in STAGES})
    todo = plan(done, until)
    result = {"until": until, "seconds": {}, "skipped": [s for s in STAGES[: STAGES.index(until) + 1] if s not in todo]}
    if g.main:
        r.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(r.root / "recipe.json") as tmp:
            tmp.write_text(json.dumps({**asdict(r), "processes": g.world}, indent=2, allow_nan=False))
    paths = {stage: r.root / stage for stage in ("world", "vae", "cache", "base", "eval")}  # fixed homes
    for stage in todo:
        t = time.perf_counter()
        if stage == "world":
            make_world(r, g)
        elif stage == "vae":
            train_vae(r, g)
        elif stage == "cache":
            cache_latents(r, g, paths["world"], paths["vae"])
        elif stage == "base":
            train_base(r, g, paths["cache"], paths["vae"])
        elif stage == "connectors":
            train_connectors(r, g, paths["cache"], paths["base"])
        else:
            result["scores"] = evaluate(
                paths["base"],
                {v: r.root / f"connector-{v}" for v in r.variants},
                paths["eval"],
                n_items=r.eval_items,
                seed=r.seed,
                steps=r.eval_steps,
                guidance=r.eval_guidance,
                device=str(g.device),
                progress=g.main and r.device != "cpu",
                group=g,
            )
        result["seconds"][stage] = round(time.perf_counter() - t, 1)
    if STAGES.index(until) >= STAGES.index("base"):
        result["base"] = str(paths["base"])
    if STAGES.index(until) >= STAGES.index("connectors"):
        result["connectors"] = {v: str(r.root / f"connector-{v}") for v in r.variants}
    if g.main:
        with atomic_path(r.root / "reproduce.json") as tmp:
            tmp.write_text(json.dumps(result, indent=2, allow_nan=False))
    return result
