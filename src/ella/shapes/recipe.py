"""``ella shapes reproduce``: train the whole mini ELLA from nothing, in stages, each resumable by its output.

1. **world** — render ``n_train`` scenes and their dense captions into webdataset tar shards;
2. **vae** — a small f=4 VAE (64x64x3 -> 16x16x4) on those renders; scaling factor = 1/std of latents;
3. **cache** — ``ella cache`` the latents with that VAE (the trainer and the base loop read them);
4. **base** — the UNet conditioned on the weak 20-token encoder, trained and then frozen;
5. **connectors** — the issue-4 trainer (``ella.train.train.main``) with MiniLM as the LLM, one run per
   Table 6 variant: ``tsc``, ``resampler`` (no timestep), ``mlp``;
6. **eval** — shapes-DPG for the base and every connector (``evaluate.py``).

A stage whose output exists is skipped, so a run cut off (e.g. by a GPU-time limit) resumes with the
same command. On a machine with several GPUs (``processes``, default: all of them) the VAE and base
loops run data-parallel, one process per GPU (``gpus.py``), the connector variants train one after
another, each data-parallel over all of them (or one per GPU with ``parallel_variants``), and the eval
rows are drawn side by side; batch sizes are global, so the values mean the same on one GPU or four.
Values are plain dataclass fields (nanoGPT style); ``smoke=True`` shrinks everything so the whole recipe
runs in seconds on a CPU (the test suite does that).
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EllaError
from ..io import atomic_dir, atomic_path
from . import gpus
from . import models as M

VARIANTS = ("tsc", "resampler", "mlp")


@dataclass
class Recipe:
    out: str = "shapes-run"
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
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
    connector_batch: int = 1024  # global when one variant trains over several GPUs, else per variant
    connector_lr: float = 6e-4  # the paper's 1e-4 is for a 67M connector on 34M pairs; this one is small
    variants: tuple[str, ...] = VARIANTS
    # One process per GPU for the VAE and base loops and for each connector variant (data-parallel); the
    # eval rows go one per GPU. 1 = everything in this process.
    processes: int = max(1, torch.cuda.device_count())
    # Several variants side by side, one process each: on one GPU a 6M connector run alone leaves it idle.
    # With several GPUs one variant after another, data-parallel over all, is faster (measured on 4 H100s:
    # ~17.5k samples/s per variant against 2.3-3.6k each side by side, one GPU left idle).
    parallel_variants: bool = torch.cuda.device_count() == 1
    compile: bool = torch.cuda.is_available()  # torch.compile the UNet in the base loop and the trainer
    # Unix time at which the base loop and the connector runs stop early, saving what they have (each
    # records its steps in training.json): for a machine lent until a known time. None = run every step.
    stop_at: float | None = None
    eval_items: int = 200  # held-out scenes, 4 seeds each (the DPG-Bench protocol)
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
            eval_items=2,
            eval_steps=2,
            log_every=1,
            processes=1,
            parallel_variants=False,
            compile=False,
        )

    def check(self) -> None:
        """Fail before any work on values that can't run."""
        if self.processes < 1:
            raise EllaError(f"processes must be >= 1, got {self.processes}")
        for name in ("vae_batch", "base_batch", "connector_batch"):
            if getattr(self, name) % self.processes:
                raise EllaError(
                    f"{name}={getattr(self, name)} is the global batch and must divide evenly over "
                    f"{self.processes} processes (one per GPU); pick a multiple of {self.processes}"
                )
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise EllaError(f"unknown connector variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    @property
    def root(self) -> Path:
        return Path(self.out)


def log(msg: str) -> None:
    print(f"[shapes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------- 1. world


def make_world(r: Recipe) -> Path:
    """Tar shards in img2dataset layout (``key.png`` + ``key.txt``): any trainer data path reads them."""
    shards = r.root / "world"
    done = shards / "done.json"
    if done.is_file():
        return shards
    shards.mkdir(parents=True, exist_ok=True)
    jobs = [
        (r.seed, start, min(start + r.shard_size, r.n_train), shards / f"{start // r.shard_size:05d}.tar")
        for start in range(0, r.n_train, r.shard_size)
    ]
    with parallel() as pool:
        pool.map(_write_shard, jobs)
    done.write_text(json.dumps({"n_train": r.n_train, "seed": r.seed}))
    log(f"world: {r.n_train} scenes in {shards}")
    return shards


def parallel(processes: int | None = None):
    """A process pool over the CPU cores (rendering is pure PIL, so fork is safe and fast)."""
    import multiprocessing
    import os

    return multiprocessing.get_context("fork").Pool(max(1, min(16, processes or os.cpu_count() or 1)))


def _write_shard(job: tuple[int, int, int, Path]) -> None:
    from .captions import caption_for
    from .world import render, scene_for

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
    from .world import render, scene_for

    seed, start, stop = job
    return np.stack([np.asarray(render(scene_for(seed, i), size=M.RESOLUTION)) for i in range(start, stop)])


def load_world_images(r: Recipe, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Renders as one uint8 tensor [N, 3, 64, 64] (100k scenes: 1.2 GB): process ``rank`` of ``world`` gets
    every ``world``-th shard's scenes (data parallel: each GPU trains on its own part)."""
    import os

    jobs = [(r.seed, s, min(s + r.shard_size, r.n_train)) for s in range(0, r.n_train, r.shard_size)]
    jobs = jobs[rank::world] or jobs[:1]
    with parallel(max(1, (os.cpu_count() or 1) // world)) as pool:
        parts = pool.map(_render_range, jobs)
    return torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------- 2. vae


class VaeLoss(torch.nn.Module):
    """The VAE's training loss as one ``forward``, so DDP sees (and syncs) the whole encode-decode step."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample(generator=generator)).sample
        # Reconstruction dominates; a tiny KL keeps the latent space smooth enough for diffusion.
        return F.mse_loss(recon.float(), x.float()) + 1e-6 * posterior.kl().mean()


def train_vae(r: Recipe) -> Path:
    path = r.root / "vae"
    if not (path / "config.json").is_file():
        gpus.run_on_gpus(_train_vae, r.processes, r)
    return path


def _train_vae(rank: int, world: int, r: Recipe) -> None:
    device = gpus.device_for(r.device, rank)
    images = load_world_images(r, rank, world).to(device)
    vae = M.new_vae(r.seed).to(device).train()
    step_fn = gpus.data_parallel(VaeLoss(vae), world, device)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    # The first full run (constant 1e-3, no clipping) ended on a loss spike with colours lost in the round
    # trip (oracle colour accuracy 13%): decay the rate to zero and clip, so the last step is a good one.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.vae_lr, total_steps=r.vae_steps, pct_start=0.05)
    gen = torch.Generator(device).manual_seed(r.seed + 7919 * rank)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batch = r.vae_batch // world
    t0 = time.perf_counter()
    for step in range(1, r.vae_steps + 1):
        idx = torch.randint(0, len(images), (batch,), generator=gen, device=device)
        with autocast:
            loss = step_fn(images[idx].float() / 127.5 - 1, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if rank == 0 and (step % r.log_every == 0 or step == r.vae_steps):
            rate = step * r.vae_batch / (time.perf_counter() - t0)
            log(f"vae step {step}/{r.vae_steps} loss {loss.item():.5f} ({rate:.0f} samples/s)")
    if rank == 0:
        save_vae(r, vae.eval(), images)
    gpus.barrier(world)


def save_vae(r: Recipe, vae, images: torch.Tensor) -> None:
    """Scaling factor, the round-trip check, then the VAE directory (atomically)."""
    from .evaluate import roundtrip_accuracy

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
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

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
            (staging / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------- 3. cache


def cache_latents(r: Recipe, world: Path, vae_path: Path) -> Path:
    from diffusers import AutoencoderKL

    from ..train.cache import write_cache
    from ..train.data import Augment, open_dataset

    path = r.root / "cache"
    if (path / "cache.json").is_file():
        return path
    dataset = open_dataset(str(world), Augment(resolution=M.RESOLUTION, center_crop=True, caption_dropout=0.0))
    write_cache(
        dataset,
        path,
        AutoencoderKL.from_pretrained(vae_path),
        batch_size=256 if r.device != "cpu" else 8,
        shard_size=r.shard_size,
        device=r.device,
        source=str(world),
        base=str(vae_path),
        progress=False,
    )
    return path


def cached_latents_and_captions(cache: Path) -> tuple[torch.Tensor, list[str]]:
    from safetensors.torch import load_file

    from ..train.cache import read_cache_index

    index = read_cache_index(cache)
    latents, captions = [], []
    for shard in index["shards"]:
        latents.append(load_file(cache / f"{shard['name']}.safetensors")["latents"])
        captions += json.loads((cache / f"{shard['name']}.json").read_text())["captions"]
    return torch.cat(latents), captions


# ----------------------------------------------------------------------------------- 4. base


def train_base(r: Recipe, cache: Path, vae_path: Path) -> Path:
    """The frozen base: UNet on cached latents, conditioned on the weak encoder (first 20 tokens only)."""
    path = r.root / "base"
    if not (path / "model_index.json").is_file():
        gpus.run_on_gpus(_train_base, r.processes, r, cache, vae_path)
    return path


def _train_base(rank: int, world: int, r: Recipe, cache: Path, vae_path: Path) -> None:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ..train.train import out_of_time

    device = gpus.device_for(r.device, rank)
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
    model = gpus.data_parallel(unet, world, device)
    # Fixed batch, so static shapes (dynamic ones crashed inductor's GroupNorm backward at batch 1024).
    forward = torch.compile(model, dynamic=False) if r.compile else model
    sched = M.new_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=r.base_lr, weight_decay=0.01)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=r.base_warmup)
    gen = torch.Generator(device).manual_seed(r.seed + 1 + 7919 * rank)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batch = r.base_batch // world
    t0 = time.perf_counter()
    deadline = time.monotonic() + (r.stop_at - time.time()) if r.stop_at else None
    training = {"steps": 0, "max_steps": r.base_steps, "batch": r.base_batch, "stopped_by": "steps"}
    for step in range(1, r.base_steps + 1):
        if step % 25 == 0 and out_of_time(deadline):  # every 25 steps: the check syncs the GPUs
            training["stopped_by"] = "time"
            break
        training["steps"] = step
        idx = torch.randint(0, len(latents), (batch,), generator=gen, device=device)
        x0 = latents[idx].float()
        cond = conds[idx].float()
        drop = torch.rand(batch, generator=gen, device=device) < r.base_caption_dropout
        cond[drop] = empty.float()
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen, device=device)
        with autocast:
            pred = forward(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), sched.get_velocity(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        if rank == 0 and (step % r.log_every == 0 or step == r.base_steps):
            rate = step * r.base_batch / (time.perf_counter() - t0)
            log(f"base step {step}/{r.base_steps} loss {loss.item():.4f} ({rate:.0f} samples/s)")
    if rank == 0:
        ema.copy_to(unet.parameters())
        training["samples"] = training["steps"] * r.base_batch
        log(f"base: {training['steps']} steps ({training['samples']} samples), stopped by {training['stopped_by']}")
        write_base(r, unet.eval().to("cpu"), vae_path, training)
    gpus.barrier(world)


# ----------------------------------------------------------------------------- 5. connectors


def train_connectors(r: Recipe, cache: Path, base: Path) -> dict[str, Path]:
    """One issue-4 trainer run per variant; the connector architecture comes from ``models.CONNECTOR_CONFIG``.

    With ``parallel_variants`` each variant trains in its own process (log: ``connector-<variant>.log``):
    one 6M-parameter run is latency-bound and leaves most of an H100 idle, three share it well. Without
    it, variants train in turn, each over all ``processes`` GPUs (:func:`train_variant`).
    """
    out = {v: r.root / f"connector-{v}" for v in r.variants}
    todo = [v for v in r.variants if not (out[v] / "ella.safetensors").is_file()]
    if not r.parallel_variants or len(todo) < 2:
        for variant in todo:
            train_variant(r, variant, cache, base)
        return out
    import multiprocessing

    ids = gpus.gpu_ids()[: r.processes]
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be re-initialised in a forked child
    jobs = [
        ctx.Process(
            target=_variant_job,
            args=(asdict(r), v, str(cache), str(base), ids[i % len(ids)] if len(ids) > 1 else None, len(todo)),
        )
        for i, v in enumerate(todo)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    failed = [v for v, job in zip(todo, jobs) if job.exitcode != 0]
    if failed:
        raise training_failed(r, failed)
    return out


def training_failed(r: Recipe, variants: list[str]) -> EllaError:
    logs = ", ".join(f"{r.root}/connector-{v}.log" for v in variants)
    return EllaError(
        f"connector training failed for {', '.join(variants)}; see {logs} "
        "(rerun the same command to resume from the last checkpoint)"
    )


def _variant_job(recipe: dict, variant: str, cache: str, base: str, gpu: str | None, side_by_side: int) -> None:
    import os
    import sys

    gpus.pin_gpu(gpu)  # first: before anything in this process touches CUDA
    r = Recipe(**{**recipe, "variants": tuple(recipe["variants"])})
    with open(r.root / f"connector-{variant}.log", "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        train_variant(r, variant, Path(cache), Path(base), side_by_side)


def train_variant(r: Recipe, variant: str, cache: Path, base: Path, side_by_side: int = 1) -> Path:
    """One variant with the issue-4 trainer: in this process, or — one variant at a time on several GPUs
    (``processes > 1``, ``side_by_side == 1``) — data-parallel under ``torchrun``, with ``connector_batch``
    split over the GPUs. A lent machine's call then gives one variant all its GPUs, and the carried bundle
    holds one connector instead of three."""
    import os

    from ..train.config import build_config
    from ..train.train import main as train

    run = r.root / f"connector-{variant}"
    init = r.root / f"init-{variant}.safetensors"
    connector = M.new_connector(variant, seed=r.seed)
    connector.save_single_file(init)
    ddp = r.processes > 1 and side_by_side == 1
    per_gpu = side_by_side * (r.processes if ddp else 1)
    workers = 0 if r.device == "cpu" else max(2, min(8, (os.cpu_count() or 2) // per_gpu - 1))
    values = dict(
        pretrained_model_name_or_path=str(base),
        llm_name_or_path=str(M.minilm_path()),
        train_data_dir=str(cache),
        init_connector=str(init),
        connector_variant=variant,
        output_dir=str(run),
        resolution=M.RESOLUTION,
        llm_max_length=M.LLM_MAX_LENGTH,
        train_batch_size=r.connector_batch // (r.processes if ddp else 1),
        max_train_steps=r.connector_steps,
        learning_rate=r.connector_lr,
        checkpointing_steps=max(1, r.connector_steps // 4),
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest",
        dataloader_num_workers=workers,
        report_to="none" if r.device == "cpu" else "tensorboard",
        seed=r.seed,
        logging_steps=r.log_every,
        torch_compile=r.compile,
        max_train_minutes=max(0.05, (r.stop_at - time.time()) / 60) if r.stop_at else None,
    )
    cfg = build_config(values)  # bad values fail here, in this process
    log(
        f"connector {variant}: {M.param_count(connector) / 1e6:.2f}M parameters"
        + (f", data-parallel over {r.processes} processes" if ddp else "")
    )
    if not ddp:
        train(cfg)
        return run
    import subprocess
    import sys

    import yaml

    config = r.root / f"connector-{variant}.yaml"
    with atomic_path(config) as tmp:
        tmp.write_text(yaml.safe_dump(values))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(r.processes),
        "--master_port",
        str(gpus.free_port()),
        "-m",
        "ella.cli",
        "train",
        "--config",
        str(config),
    ]
    with open(r.root / f"connector-{variant}.log", "a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise training_failed(r, [variant])
    return run


STAGES = ("world", "vae", "cache", "base", "connectors", "eval")


def reproduce(r: Recipe, until: str = "eval") -> dict:
    """Every stage in order up to ``until`` (finished ones skipped); returns the paths and wall time per stage."""
    if until not in STAGES:
        raise EllaError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
    r.check()
    r.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(r.root / "recipe.json") as tmp:
        tmp.write_text(json.dumps(asdict(r), indent=2))
    times, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        times[name] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()

    result = {"seconds": times, "until": until}

    def finish() -> dict:
        with atomic_path(r.root / "reproduce.json") as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        return result

    trained = (r.root / "base" / "model_index.json").is_file() and all(
        (r.root / f"connector-{v}" / "ella.safetensors").is_file() for v in r.variants
    )
    if trained and until in ("connectors", "eval"):
        world = cache = None  # nothing left to train (e.g. restored from a bundle): no world, no latents
        vae = r.root / "vae"
    else:
        world = make_world(r)
        lap("world")
        vae = train_vae(r)
        lap("vae")
        cache = cache_latents(r, world, vae)
        lap("cache")
    base = train_base(r, cache, vae)
    lap("base")
    result["base"] = str(base)
    if until in ("world", "vae", "cache", "base"):
        return finish()
    connectors = train_connectors(r, cache, base)
    lap("connectors")
    result["connectors"] = {k: str(v) for k, v in connectors.items()}
    if until == "connectors":
        return finish()
    from .evaluate import evaluate

    result["scores"] = evaluate(
        base,
        connectors,
        r.root / "eval",
        n_items=r.eval_items,
        seed=r.seed,
        steps=r.eval_steps,
        guidance=r.eval_guidance,
        device=r.device,
        progress=r.device != "cpu",
        gpus=gpus.gpu_ids()[: r.processes],
    )
    lap("eval")
    return finish()
