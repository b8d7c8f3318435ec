"""Validation images during training: the fixed prompts, the current (or EMA) connector, the frozen base.

They are generated with the same pipeline class users run, so what the grid shows is what
``ella generate`` would draw with these weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from PIL import Image

from ..io import atomic_path
from ..llm import load_llm
from ..pipelines import EllaStableDiffusionPipeline


def validation_images(
    cfg, connector, unet, vae, llm, tokenizer, noise_scheduler, dims, step: int, weight_dtype, accelerator
) -> Path | None:
    """A PNG grid of the validation prompts at ``step`` (also sent to the trackers); None when skipped."""
    if dims.sdxl_style:
        warnings.warn(
            "validation images for SDXL-style UNets are not drawn yet (validation builds the SD1.5 pipeline); skipped",
            stacklevel=2,
        )
        return None
    device = accelerator.device
    if vae is None:  # training from cached latents: the VAE is only needed here
        vae = AutoencoderKL.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="vae").to(device)
    if llm is None:  # cached features: so is the LLM
        llm, tokenizer = load_llm(cfg.llm_name_or_path, dtype=weight_dtype, device=device)
    pipe = EllaStableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
        connector=connector.eval(),
        llm=llm,
        llm_tokenizer=tokenizer,
        llm_max_length=cfg.llm_max_length,
        llm_flexible=cfg.flexible_features,
        llm_hidden_layer=cfg.layers,
    )
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    images = []
    for i, prompt in enumerate(cfg.validation_prompts):
        generator = torch.Generator(device).manual_seed(cfg.seed + i)
        with autocast:
            out = pipe(
                prompt,
                num_inference_steps=cfg.validation_inference_steps,
                guidance_scale=cfg.validation_guidance_scale,
                height=cfg.resolution,
                width=cfg.resolution,
                generator=generator,
                output_type="np",
            )
        images.append(out.images[0])
    stacked = np.stack(images)
    if not accelerator.is_main_process:  # a sharded LLM made every process draw (see run_validation); one writes
        return None
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"validation": stacked}, step=step)
    grid = np.concatenate(list(stacked), axis=1)
    path = Path(cfg.output_dir) / "validation" / f"step-{step:07d}.png"
    with atomic_path(path) as tmp:
        Image.fromarray((grid * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    return path
