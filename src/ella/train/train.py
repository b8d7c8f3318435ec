"""Train an ELLA connector: ``main(config)``, read top to bottom.

The paper's recipe: a frozen UNet, VAE and LLM; a random diffusion timestep per sample; the
connector turns the caption's LLM features into the UNet's cross-attention tokens *for that
timestep*; the loss is the UNet's ordinary denoising MSE. Only the connector (and for SDXL-style
UNets its pooling head) learns. Launch on several GPUs with ``accelerate launch -m ella.cli train``.

Determinism: every random draw in a step (noise, timesteps) comes from a generator seeded by
(seed, process, micro-batch counter), and every data decision from the sample's key and epoch,
so a run resumed from a checkpoint repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from ..errors import EllaError
from ..llm import llm_config
from ..text import Tokens, encode_tokens, tokenize, warn_truncated
from . import speed
from .checkpoint import (
    Progress,
    check_output_dir,
    export_connector,
    export_unet_lora,
    find_checkpoint,
    load_checkpoint,
    read_checkpoint,
    register_lora_state_hooks,
    save_checkpoint,
)
from .config import TrainConfig, require_optional_packages, require_train_extra
from .data import Augment, collate, open_dataset
from .models import Dims, add_unet_lora, encode_latents, load_clip, load_frozen, make_connector, read_dims
from .sharding import is_sharded, llm_memory_plan, shard_group_size, shard_llm
from .validation import validation_images


def main(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the output directory holding ``ella.safetensors``."""
    started = time.monotonic()  # --max_train_minutes counts from here: loading and compiling use the machine's time too
    cfg.validate()
    require_train_extra()
    require_optional_packages(cfg)
    output_dir = check_output_dir(cfg.output_dir, cfg.resume_from_checkpoint)
    source = cfg.train_data_dir or cfg.dataset_name

    # ---- Setup accelerate (DDP across processes when launched with `accelerate launch`)
    mixed_precision = cfg.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # lets `torchrun`/`accelerate launch` run DDP over CPU processes too
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)),
        # non_blocking: pinned batches go to the GPU without waiting for the steps queued before them
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=True),
    )
    set_seed(cfg.seed)  # the connector's initial weights (latents, projections) come from the global RNG
    resume = None  # a damaged checkpoint fails here, before any model loads; its weights load below
    if cfg.resume_from_checkpoint:
        path = find_checkpoint(output_dir, cfg.resume_from_checkpoint)
        if path is None:
            accelerator.print(f"no checkpoint in {output_dir} yet; starting from step 0")
        else:
            resume = read_checkpoint(path, accelerator.process_index, accelerator.num_processes)
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    if cfg.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.fp8_unet:
        speed.check_fp8(device)
    speed.set_attention_backend(cfg.attention_backend)

    # ---- Data first: an empty or unreadable dataset is an error before any model loads
    aug = Augment(
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        caption_dropout=cfg.caption_dropout,
        seed=cfg.seed,
    )
    dataset = open_dataset(
        source,
        aug,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        split=cfg.dataset_split,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    cache = getattr(dataset, "index", None)  # an `ella cache` directory: latents (and maybe features) precomputed
    cached_llm = (cache or {}).get("llm")
    if cached_llm and cached_llm["max_length"] != cfg.llm_max_length:
        raise EllaError(
            f"the cache's LLM features are {cached_llm['max_length']} tokens long but --llm_max_length is "
            f"{cfg.llm_max_length}; use the same length (validation and inference encode with it)"
        )
    if cached_llm and cfg.layers is not None:
        raise EllaError(
            "the cache holds the LLM's last hidden state; --llm_hidden_layer / --llm_layers read others: train from "
            "a cache without --features (the LLM then runs in the training step)"
        )
    if cached_llm and cached_llm["name"] != cfg.llm_name_or_path:
        warnings.warn(
            f"the cache's features come from {cached_llm['name']!r}, but --llm_name_or_path is "
            f"{cfg.llm_name_or_path!r} (used for validation and recorded with the weights)",
            stacklevel=2,
        )
    if cache and cache["resolution"] != cfg.resolution:
        raise EllaError(
            f"the cache at {cfg.train_data_dir} was made at resolution {cache['resolution']}, "
            f"but --resolution is {cfg.resolution}"
        )

    fsdp_llm = cfg.llm_fsdp and accelerator.num_processes > 1
    if cfg.llm_fsdp and cached_llm:
        raise EllaError(
            "--llm_fsdp shards the LLM that runs in the training step, but this cache holds its features already: "
            "drop --llm_fsdp (or train from a cache made without --features)"
        )
    if fsdp_llm:  # what sharding saves, from the LLM's config alone, before any weights load
        group = shard_group_size(accelerator.num_processes)
        accelerator.print(llm_memory_plan(llm_config(cfg.llm_name_or_path), group, weight_dtype.itemsize).summary())

    # ---- Sizes from config files, then the connector; dimension mismatches fail here, in a second
    dims = read_dims(cfg, cached_llm["hidden_size"] if cached_llm else None)
    connector = make_connector(cfg, dims).to(device).train()

    # ---- Frozen models (bf16 on GPU), loaded only if the cache doesn't make them unnecessary
    unet, vae, llm, tokenizer, noise_scheduler = load_frozen(
        cfg, weight_dtype, device, need_vae=cache is None, need_llm=cached_llm is None
    )
    if cache and abs(cache["vae"]["scaling_factor"] - vae_scaling(cfg)) > 1e-9:
        raise EllaError(
            f"the cache's latents were scaled by {cache['vae']['scaling_factor']}, but this base's VAE "
            f"uses {vae_scaling(cfg)}: re-run `ella cache` with --pretrained_model_name_or_path "
            f"{cfg.pretrained_model_name_or_path}"
        )
    if fsdp_llm and llm is not None:  # every process calls it: its forward is now a collective (see sharding.py)
        llm = shard_llm(llm, device=device)
    clip_encoder, clip_tokenizer = None, None
    if cfg.condition_mode == "ella+clip":
        clip_encoder, clip_tokenizer = load_clip(cfg, dims, weight_dtype, device)

    # ---- What learns: the connector (ELLA), and/or a LoRA on the UNet's attention (--train_unet_lora)
    lora_params = add_unet_lora(unet, cfg.train_unet_lora, cfg.unet_lora_alpha) if cfg.train_unet_lora else []
    if cfg.freeze_connector:
        connector.requires_grad_(False).eval()
    trainable = [p for p in connector.parameters() if p.requires_grad] + lora_params
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.fp8_unet:
        speed.fp8_unet(unet)
    # Compiling gives 1.27x the steps per second on a data-centre GPU, compiling the whole loss rather than the
    # UNet alone more (benchmarks/RESULTS.md); channels_last did not help. Static shapes (dynamic ones crashed
    # inductor's GroupNorm backward on the shapes world's UNet); so the loader drops an epoch's short last batch
    # when compiling, which would compile everything once more.
    unet_train = unet
    if lora_params:  # its LoRA learns: DDP must sync its gradients, and checkpoints keep the LoRA (only)
        register_lora_state_hooks(accelerator, unet)
        unet_train = accelerator.prepare(unet)
    compiling = speed.resolve_compile(cfg.torch_compile, device)
    compile_unet = compiling and cfg.compile_scope == "unet"
    unet_forward = speed.compiled(unet_train, cfg.compile_mode) if compile_unet else unet_train
    compile_step = compiling and cfg.compile_scope == "step"
    loss_fn = speed.compiled(diffusion_loss, cfg.compile_mode) if compile_step else diffusion_loss

    # ---- Optimizer (AdamW, paper: constant lr, weight decay 0.01), lr schedule, EMA
    optimizer_cls, extra = torch.optim.AdamW, {"fused": device.type == "cuda"}  # fused: one kernel per step
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb  # heavy and optional (--use_8bit_adam only); its presence was checked up front

        optimizer_cls, extra = bnb.optim.AdamW8bit, {}
    optimizer = optimizer_cls(
        trainable,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        **extra,
    )
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_train_steps * accelerator.num_processes,
    )
    ema = None
    if cfg.use_ema:
        ema = EMAModel(connector.parameters(), decay=cfg.ema_decay)

    if cfg.dataloader_num_workers > 0 and (tokenizer is not None or clip_tokenizer is not None):
        # Every worker tokenizes whole batches; a thread pool in each (the tokenizers default: one thread per
        # core) would oversubscribe the CPU many times over when several runs with several workers share a host.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.train_batch_size,
        shuffle=not isinstance(dataset, torch.utils.data.IterableDataset),
        collate_fn=TokenizingCollate(tokenizer, cfg, clip_tokenizer),  # no tokenizer at all: plain collate
        num_workers=cfg.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        # A short last batch would make the compiled UNet compile again (static shapes): that can take over a
        # minute when several runs compile at once, long enough to push a time-limited run past its deadline.
        drop_last=compiling
        and not isinstance(dataset, torch.utils.data.IterableDataset)
        and len(dataset) >= cfg.train_batch_size * accelerator.num_processes,
    )
    if cfg.freeze_connector:  # nothing of it learns: DDP refuses a module without a trainable parameter
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    else:
        connector, optimizer, lr_scheduler = accelerator.prepare(connector, optimizer, lr_scheduler)
    learners = ([] if cfg.freeze_connector else [connector]) + ([unet_train] if lora_params else [])
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        loader = accelerator.prepare(loader)  # shards each batch across processes; tar shards split themselves

    # ---- Resume
    progress = Progress()
    if resume is not None:
        progress = load_checkpoint(accelerator, resume, ema)
        accelerator.print(f"resumed from {resume.path} at step {progress.global_step}")
    if ema is not None:
        ema.to(device)
    if accelerator.is_main_process:
        accelerator.init_trackers("ella-train", config=tracker_config(cfg))

    # ---- The loop
    generator = torch.Generator(device=device)
    window_start, window_samples, data_wait = time.perf_counter(), 0, [0.0]
    deadline = started + 60 * cfg.max_train_minutes if cfg.max_train_minutes else None
    stopped_by = "steps"
    # Set on the device when a step's loss is NaN or infinite, read only where the loop logs or writes weights
    # (see check_finite): the hot loop never waits for the GPU.
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    checked_step = progress.global_step
    unreadable_in_a_row = 0  # samples in batches with nothing readable, since the last readable one
    bar = tqdm(
        total=cfg.max_train_steps,
        initial=progress.global_step,
        desc="train",
        unit="step",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    with bar:  # closed before an error message, so the message gets a line of its own
        while progress.global_step < cfg.max_train_steps and stopped_by == "steps":
            start_epoch(loader, dataset, progress.epoch)
            whole_epoch, readable_in_epoch, skipped_in_epoch = progress.batches_in_epoch == 0, False, 0
            batches = (
                accelerator.skip_first_batches(loader, progress.batches_in_epoch)
                if progress.batches_in_epoch
                else loader
            )
            for batch in timed(batches, data_wait):
                progress.batches_in_epoch += 1
                progress.micro_steps += 1
                progress.skipped += batch["skipped"]
                skipped_in_epoch += batch["skipped"]
                if not batch["captions"]:  # every sample of this batch was unreadable
                    unreadable_in_a_row += batch["skipped"]
                    bar.set_postfix(skipped=progress.skipped)
                    if unreadable_in_a_row >= cfg.max_consecutive_skipped:
                        raise EllaError(
                            f"the last {unreadable_in_a_row} samples of {source} were all unreadable (undecodable "
                            "images or missing captions), so training could not start or go on; fix the data, "
                            "or raise --max_consecutive_skipped if long broken stretches are expected"
                        )
                    continue
                unreadable_in_a_row, readable_in_epoch = 0, True
                generator.manual_seed(noise_seed(cfg.seed, accelerator.process_index, progress.micro_steps))
                with accelerator.accumulate(*learners):
                    latents = batch_latents(batch, vae, device)
                    features, mask = batch_features(batch, llm, cfg, device, static=compiling)
                    loss = loss_fn(
                        connector,
                        unet_forward,
                        noise_scheduler,
                        latents,
                        features,
                        mask,
                        dims=dims,
                        time_ids=time_ids(batch, cfg.resolution) if dims.sdxl_style else None,
                        clip_tokens=None if clip_encoder is None else clip_tokens(batch, clip_encoder, device),
                        clip_dropout=cfg.clip_dropout,
                        generator=generator,
                        noise_offset=cfg.noise_offset,
                        snr_gamma=cfg.snr_gamma,
                    )
                    nonfinite |= ~torch.isfinite(loss.detach())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.samples_seen += len(batch["captions"])
                window_samples += len(batch["captions"]) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                progress.global_step += 1
                bar.update(1)
                if ema is not None:
                    ema.step(connector.parameters())
                if progress.global_step % cfg.logging_steps == 0 or progress.global_step == 1:
                    check_finite(accelerator, nonfinite, connector, checked_step, progress.global_step)
                    checked_step = progress.global_step
                    elapsed = time.perf_counter() - window_start
                    logs = {
                        "loss": loss.detach().item(),
                        "lr": lr_scheduler.get_last_lr()[0],
                        "samples_per_s": window_samples / max(elapsed, 1e-9),
                        "skipped_samples": progress.skipped,
                        "data_wait_fraction": data_wait[0] / max(elapsed, 1e-9),
                    }
                    if device.type == "cuda":
                        logs["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    accelerator.log(logs, step=progress.global_step)
                    bar.set_postfix(
                        loss=f"{logs['loss']:.4f}",
                        sps=f"{logs['samples_per_s']:.1f}",
                        skipped=progress.skipped,
                        data_wait=f"{logs['data_wait_fraction']:.0%}",
                    )
                    window_start, window_samples, data_wait[0] = time.perf_counter(), 0, 0.0
                done = progress.global_step >= cfg.max_train_steps
                if not done and out_of_time(deadline):
                    done, stopped_by = True, "time"
                    accelerator.print(
                        f"--max_train_minutes {cfg.max_train_minutes} reached: stopping at step "
                        f"{progress.global_step} of {cfg.max_train_steps} (resume to go on)"
                    )
                save = progress.global_step % cfg.checkpointing_steps == 0 or done
                validate = cfg.validation_prompts and (progress.global_step % cfg.validation_steps == 0 or done)
                if (save or validate) and checked_step < progress.global_step:
                    check_finite(accelerator, nonfinite, connector, checked_step, progress.global_step)
                    checked_step = progress.global_step
                if save:
                    save_checkpoint(
                        accelerator,
                        output_dir,
                        progress,
                        accelerator.unwrap_model(connector),
                        ema,
                        cfg.checkpoints_total_limit,
                    )
                if validate:
                    run_validation(
                        cfg,
                        accelerator,
                        connector,
                        ema,
                        unet,
                        vae,
                        llm,
                        tokenizer,
                        noise_scheduler,
                        dims,
                        progress.global_step,
                        weight_dtype,
                    )
                if done:
                    break
            else:  # the epoch ran out before max_train_steps
                if whole_epoch and not readable_in_epoch:  # the next epoch reads the same files: stop now
                    raise EllaError(
                        f"a whole epoch of {source} had no readable sample ({skipped_in_epoch} unreadable: "
                        "undecodable images, missing captions or unreadable tar shards); fix the data"
                    )
                progress.epoch += 1
                progress.batches_in_epoch = 0

    # ---- Final weights beside the checkpoints: the files a user loads
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export_connector(
            accelerator.unwrap_model(connector),
            ema,
            output_dir,
            {
                "steps": progress.global_step,
                "max_train_steps": cfg.max_train_steps,
                "samples_seen": progress.samples_seen * accelerator.num_processes,
                "stopped_by": stopped_by,
                **(
                    {"unet_lora_rank": cfg.train_unet_lora, "connector_frozen": cfg.freeze_connector}
                    if lora_params
                    else {}
                ),
                **({"condition_mode": cfg.condition_mode, "clip_dropout": cfg.clip_dropout} if clip_encoder else {}),
            },
        )
        if lora_params:
            export_unet_lora(unet, output_dir)
        if progress.skipped:
            accelerator.print(f"skipped {progress.skipped} corrupt or unreadable samples")
    accelerator.end_training()
    return output_dir


# ----------------------------------------------------------------------------- the training step


def diffusion_loss(
    connector,
    unet,
    noise_scheduler,
    latents,
    features,
    mask,
    *,
    dims: Dims,
    time_ids=None,
    clip_tokens: torch.Tensor | None = None,
    clip_dropout: float = 0.0,
    generator=None,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """The frozen UNet's denoising loss with the connector's tokens as its text condition.

    One random timestep per sample (uniform over the training schedule, as in SD's own training);
    the connector sees the same timestep the UNet does — that is what "timestep-aware" trains.
    ``clip_tokens`` (``ella+clip``): the base's CLIP tokens go first, as the pipelines join them; for a
    ``clip_dropout`` share of the samples they are masked out of cross-attention (``ella`` mode exactly).
    """
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (batch, latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator, device=latents.device
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    tokens = connector(features, timesteps, mask)
    # The connector's own attributes: DDP (and a compiled DDP, which forwards to it) hide them behind .module;
    # read through the wrapper, an MLP's mask would silently never reach the UNet in multi-GPU training.
    inner = getattr(connector, "module", connector)
    follows_text = mask is not None and getattr(inner, "output_follows_text", False)
    text_mask = mask if follows_text else None
    if clip_tokens is not None:
        keep = torch.rand(batch, generator=generator, device=latents.device) >= clip_dropout
        ones = torch.ones(batch, tokens.shape[1], dtype=torch.bool, device=latents.device)
        ella_keys = text_mask.bool() if text_mask is not None else ones
        text_mask = torch.cat([keep[:, None].expand(-1, clip_tokens.shape[1]), ella_keys], dim=1).to(tokens.dtype)
        tokens = torch.cat([clip_tokens.to(tokens.dtype), tokens], dim=1)
    added = None
    if dims.sdxl_style:
        pool = inner.pool
        added = {"text_embeds": pool(tokens, mask), "time_ids": time_ids.to(latents.device, tokens.dtype)}
    pred = unet(
        noisy.to(unet.dtype),
        timesteps,
        encoder_hidden_states=tokens.to(unet.dtype),
        encoder_attention_mask=text_mask,
        added_cond_kwargs=added,
        return_dict=False,
    )[0]
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=snr_gamma)
        weight = weight / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
        per_sample = per_sample * weight
    return per_sample.mean()


def check_finite(accelerator, nonfinite: torch.Tensor, connector, since: int, step: int) -> None:
    """Stop before a NaN reaches the logs or the disk: a non-finite loss since step ``since``, or weights.

    One host sync, at logging steps and before every checkpoint or validation, never in between; the
    answer is the same on every process (the flag is summed over them), so all stop together.
    """
    weights_ok = torch.stack([torch.isfinite(p).all() for p in connector.parameters()]).all()
    bad = torch.stack([nonfinite, ~weights_ok]).float()
    loss_bad, weights_bad = (accelerator.reduce(bad, reduction="sum") > 0).tolist()
    if loss_bad or weights_bad:
        what = "the loss became NaN or infinite" if loss_bad else "the connector's weights became NaN or infinite"
        raise EllaError(
            f"{what} between steps {since} and {step}; stopped without saving them (checkpoints already "
            "written are from before). Try a lower --learning_rate, or --mixed_precision bf16 or no instead of fp16"
        )


def timed(batches, clock: list[float]):
    """Yield the batches, adding the time spent waiting for each to ``clock[0]``.

    Logged as ``data_wait_fraction``: near 0 the GPU step is the limit, near 1 the data loader is.
    """
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        clock[0] += time.perf_counter() - start
        yield batch


def out_of_time(deadline: float | None) -> bool:
    """Past ``deadline`` (``time.monotonic``)? Under torch.distributed every process gets the same answer (if
    any is late, all are), so all stop at the same step — the trainer's processes and the shapes recipe's alike."""
    if deadline is None:
        return False
    late = time.monotonic() > deadline
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return late
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([float(late)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def noise_seed(seed: int, process: int, micro_step: int) -> int:
    """A distinct, reproducible seed per (run seed, process, micro-batch)."""
    return ((seed * 1_000_003 + process) * 1_000_003 + micro_step) % (2**63)


def batch_latents(batch: dict, vae, device) -> torch.Tensor:
    if "latents" in batch:
        return batch["latents"].to(device, torch.float32)
    return encode_latents(vae, batch["pixel_values"])


@torch.no_grad()
def clip_tokens(batch: dict, encoder, device) -> torch.Tensor:
    """The base's CLIP tokens of the captions ([B, 77, width]) from the ids the loader made, as its own pipeline
    encodes a prompt."""
    return encoder(batch["clip_ids"].to(device))[0]


def batch_features(
    batch: dict, llm, cfg: TrainConfig, device, static: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LLM features of the captions (already "" where dropped): cached, or computed now with the frozen LLM;
    ``static`` (a compiled step) pads token-aligned features to ``llm_max_length``."""
    if "features" in batch:
        mask = batch["feature_mask"].to(device)
        return batch["features"].to(device), mask if cfg.flexible_features else None
    flexible = cfg.flexible_features
    tokens = Tokens(batch["input_ids"], batch["attention_mask"], batch["token_lengths"])
    warn_truncated(batch["captions"], tokens, cfg.llm_max_length)
    out = encode_tokens(llm, tokens, flexible=flexible, hidden_layer=cfg.layers)
    states, mask = out.hidden_states, out.attention_mask
    if flexible and static:
        # The MLP's tokens follow the text, so its batches are as long as their longest caption; a compiled
        # UNet gets them padded to llm_max_length instead, masked, so the loss is the same but shapes static.
        extra = cfg.llm_max_length - states.shape[1]
        states, mask = F.pad(states, (0, 0, 0, extra)), F.pad(mask, (0, extra))
    return states, mask


class TokenizingCollate:
    """:func:`collate`, plus the captions' tokens: as the loader's ``collate_fn`` this tokenizes in its
    worker processes, off the training process, where it stalled the GPU (~0.2 s a step at batch 512).

    ``tokenizer``: the LLM's (None when the features are cached); ``clip_tokenizer``: the base's CLIP's, for
    ``--condition_mode ella+clip`` (its ids padded to its 77 tokens, as the pipeline encodes a prompt)."""

    def __init__(self, tokenizer, cfg: TrainConfig, clip_tokenizer=None):
        self.tokenizer, self.max_length, self.flexible = tokenizer, cfg.llm_max_length, cfg.flexible_features
        self.clip_tokenizer = clip_tokenizer

    def __call__(self, samples: list[dict | None]) -> dict:
        batch = collate(samples)
        if batch["captions"] and self.tokenizer is not None:
            tokens = tokenize(self.tokenizer, batch["captions"], max_length=self.max_length, flexible=self.flexible)
            batch.update(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, token_lengths=tokens.lengths)
        if batch["captions"] and self.clip_tokenizer is not None:
            clip = self.clip_tokenizer
            ids = clip(batch["captions"], padding="max_length", max_length=clip.model_max_length, truncation=True)
            batch["clip_ids"] = torch.tensor(ids["input_ids"])
        return batch


def time_ids(batch: dict, resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) per sample."""
    target = torch.tensor([resolution, resolution]).expand(len(batch["captions"]), 2)
    return torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).float()


# ----------------------------------------------------------------------------------- plumbing


def vae_scaling(cfg: TrainConfig) -> float:
    return AutoencoderKL.load_config(cfg.pretrained_model_name_or_path, subfolder="vae")["scaling_factor"]


def start_epoch(loader, dataset, epoch: int) -> None:
    """New shuffle (map-style: accelerate's seeded sampler; tar shards: shard order) and per-sample RNG."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    dataset.set_epoch(epoch)


def tracker_config(cfg: TrainConfig) -> dict:
    """Trackers accept scalars only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(cfg).items()}


@torch.no_grad()
def run_validation(
    cfg, accelerator, connector, ema, unet, vae, llm, tokenizer, noise_scheduler, dims, step, weight_dtype
) -> None:
    """Images for the fixed validation prompts (EMA weights if on) → PNG grid + trackers.

    The main process draws them while the others wait; with a sharded LLM (``--llm_fsdp``) every process must
    run the LLM's forward with it (its all-gathers are collectives), so all draw and only the main one writes."""
    if not accelerator.is_main_process and not (llm is not None and is_sharded(llm)):
        accelerator.wait_for_everyone()
        return
    model = accelerator.unwrap_model(connector)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    try:
        validation_images(cfg, model, unet, vae, llm, tokenizer, noise_scheduler, dims, step, weight_dtype, accelerator)
    finally:
        if ema is not None:
            ema.restore(model.parameters())
        model.train()
    accelerator.wait_for_everyone()
