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
from .io import atomic_path

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
    strength: float | None = None  # img2img / inpainting: 1.0 starts from pure noise, 0.3 keeps most of the image
    condition_mode: str = "ella"  # or "ella+clip": CLIP's 77 tokens beside ELLA's (trigger words, TI)

    def validate(self) -> None:
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise EllaError(f"width and height must be positive multiples of 8; got {self.width}x{self.height}")
        if self.steps < 1:
            raise EllaError(f"steps must be at least 1; got {self.steps}")
        if self.num_images < 1:
            raise EllaError(f"num-images must be at least 1; got {self.num_images}")
        if self.strength is not None and not 0.0 < self.strength <= 1.0:
            raise EllaError(f"strength must be in (0, 1]; got {self.strength}")


def call_parameters(pipe) -> set[str]:
    """What the diffusers ``__call__`` behind ``pipe`` accepts (img2img takes no width/height, txt2img no strength)."""
    import inspect

    from .pipelines.base import CALL_OPTIONS, EllaMixin

    parent = next(c for c in type(pipe).__mro__ if "__call__" in vars(c) and not issubclass(c, EllaMixin))
    names = set(inspect.signature(parent.__call__).parameters)
    return names | (set(CALL_OPTIONS) if isinstance(pipe, EllaMixin) else set())


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


def generate_to_dir(
    pipe, prompts: list[str], settings: SampleSettings, out_dir: str | Path, sources: dict, inputs: dict | None = None
) -> list[Path]:
    """Generate ``num_images`` per prompt; write ``NNN-<slug>-seed<S>.png`` + ``.json`` atomically.

    ``sources`` names the models (base/ella/llm as given) for the sidecar; ``inputs`` are extra
    ``__call__`` arguments by the pipeline's own names (``image``, ``mask_image``,
    ``control_image``), each ``(PIL image, path)``, the path recorded in the sidecar.
    """
    settings.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = settings.num_images
    seeds = [settings.seed + k for k in range(len(prompts) * n)]
    device = pipe._execution_device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    accepted = call_parameters(pipe)
    call = {
        "negative_prompt": settings.negative_prompt,
        "num_inference_steps": settings.steps,
        "guidance_scale": settings.guidance,
        "num_images_per_prompt": n,
        "generator": generators,
        "output_type": "pil",
        "width": settings.width,
        "height": settings.height,
        "strength": settings.strength,
        "condition_mode": settings.condition_mode,
    }
    call = {k: v for k, v in call.items() if k in accepted and v is not None}
    if settings.condition_mode != "ella" and "condition_mode" not in accepted:
        raise EllaError(f"condition mode {settings.condition_mode!r} needs an ELLA pipeline")
    for name, (image, _) in (inputs or {}).items():
        call[name] = image
    images = pipe(prompts, **call).images
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
            "inputs": {name: str(path) for name, (_, path) in (inputs or {}).items()},
            "models": sources,
            "versions": versions(),
        }
        with atomic_path(stem.with_suffix(".png")) as tmp:
            image.save(tmp, format="PNG")
        with atomic_path(stem.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        written.append(stem.with_suffix(".png"))
    return written


# ------------------------------------------------------------------ community tools: inputs and adapters

#: pipeline kind -> the ``__call__`` names of its input images, in the order (init image, mask, control image)
INPUT_NAMES = {
    "txt2img": (None, None, None),
    "img2img": ("image", None, None),
    "inpaint": ("image", "mask_image", None),
    "controlnet": (None, None, "image"),
    "controlnet-img2img": ("image", None, "control_image"),
}


def kind_for(init_image: str | None, mask: str | None, controlnet: str | None, control_image: str | None) -> str:
    """Which pipeline the given inputs ask for; inconsistent combinations fail before any model loads."""
    if mask and not init_image:
        raise EllaError("--mask needs --init-image (the picture whose masked part is repainted)")
    if bool(controlnet) != bool(control_image):
        raise EllaError("--controlnet and --control-image go together: the ControlNet model and its input image")
    if controlnet and mask:
        raise EllaError("ControlNet inpainting is not supported; use --controlnet with or without --init-image")
    if controlnet:
        return "controlnet-img2img" if init_image else "controlnet"
    return ("inpaint" if mask else "img2img") if init_image else "txt2img"


def read_inputs(
    kind: str, init_image: str | None, mask: str | None, control_image: str | None, width: int, height: int
) -> dict:
    """``{call name: (RGB image at width x height, path)}`` for :func:`generate_to_dir`."""
    from PIL import Image, UnidentifiedImageError

    inputs = {}
    for name, path in zip(INPUT_NAMES[kind], (init_image, mask, control_image)):
        if name is None:
            continue
        try:
            image = Image.open(path).convert("L" if name == "mask_image" else "RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise EllaError(f"cannot read image {path!r}: {err}") from None
        inputs[name] = (image.resize((width, height), Image.LANCZOS), path)
    return inputs


def load_loras(pipe, specs: list[str]) -> list[dict]:
    """``FILE[:SCALE]`` each -> ``pipe.load_lora_weights`` (diffusers reads diffusers, kohya and A1111 LoRAs)."""
    loaded = []
    for i, spec in enumerate(specs):
        path, _, scale = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        try:
            weight = float(scale) if scale else 1.0
        except ValueError:
            raise EllaError(
                f"--lora {spec!r}: the scale after ':' must be a number, e.g. style.safetensors:0.8"
            ) from None
        if not Path(path).exists():
            raise EllaError(f"--lora {path!r} does not exist (a LoRA .safetensors file or a diffusers LoRA dir)")
        target = Path(path)
        kwargs = {"weight_name": target.name} if target.is_file() else {}
        pipe.load_lora_weights(str(target.parent if target.is_file() else target), adapter_name=f"lora{i}", **kwargs)
        loaded.append({"path": path, "scale": weight})
    if loaded:
        pipe.set_adapters([f"lora{i}" for i in range(len(loaded))], adapter_weights=[d["scale"] for d in loaded])
    return loaded
