"""Sampling to disk: seeds, PNGs, and a JSON sidecar with everything needed to reproduce an image.

Seed protocol (the official ``inference.py``'s): image ``k`` of a call gets its own generator seeded
``seed + k``, on the pipeline's device, so any single image can be regenerated alone.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import EllaError
from .loading import atomic_path

# The official inference.py: DPM-Solver++ multistep, 50 steps, 512x512, guidance 12, seed 1001.
# (Its gradio demo used 25 steps and guidance 10; users report lower guidance blurs less.)
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 12.0
DEFAULT_SIZE = 512
DEFAULT_SEED = 1001


@dataclass
class SampleSettings:
    """Everything that decides an image besides the model files (recorded in every sidecar)."""

    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    seed: int = DEFAULT_SEED
    num_images: int = 1

    def validate(self) -> None:
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise EllaError(f"width and height must be positive multiples of 8; got {self.width}x{self.height}")
        if self.steps < 1:
            raise EllaError(f"steps must be at least 1; got {self.steps}")
        if self.num_images < 1:
            raise EllaError(f"num-images must be at least 1; got {self.num_images}")


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:n] or "prompt"


def versions() -> dict:
    import diffusers
    import transformers

    from . import __version__

    return {
        "ella-diffusion": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def generate_to_dir(pipe, prompts: list[str], settings: SampleSettings, out_dir: str | Path, sources: dict) -> list[Path]:
    """Generate ``num_images`` per prompt; write ``NNN-<slug>-seed<S>.png`` + ``.json`` atomically.

    ``sources`` names the models (base/ella/llm as given) for the sidecar.
    """
    settings.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = settings.num_images
    seeds = [settings.seed + k for k in range(len(prompts) * n)]
    device = pipe._execution_device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    images = pipe(
        prompts,
        negative_prompt=settings.negative_prompt,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        width=settings.width,
        height=settings.height,
        num_images_per_prompt=n,
        generator=generators,
        output_type="pil",
    ).images
    written = []
    for k, (image, seed) in enumerate(zip(images, seeds)):
        prompt = prompts[k // n]
        stem = out_dir / f"{k:03d}-{slug(prompt)}-seed{seed}"
        record = {
            "prompt": prompt,
            **{k2: v for k2, v in asdict(settings).items() if k2 not in ("seed", "num_images")},
            "seed": seed,
            "seed_protocol": "torch.Generator(device).manual_seed(seed), one generator per image",
            "scheduler": type(pipe.scheduler).__name__,
            "scheduler_config": dict(pipe.scheduler.config),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""),
            "llm_dtype": str(pipe.llm.dtype).replace("torch.", ""),
            "llm_max_length": pipe.config.llm_max_length,
            "llm_flexible": pipe.config.llm_flexible,
            "llm_hidden_layer": pipe.config.llm_hidden_layer,
            "device": str(device),
            "models": sources,
            "versions": versions(),
        }
        with atomic_path(stem.with_suffix(".png")) as tmp:
            image.save(tmp, format="PNG")
        with atomic_path(stem.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        written.append(stem.with_suffix(".png"))
    return written
