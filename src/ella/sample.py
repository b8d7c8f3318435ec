"""Sampling to disk: seeds, PNGs, and a JSON sidecar with everything needed to reproduce an image.

Seed protocol (the official ``inference.py``'s): image ``k`` of a call gets its own generator seeded
``seed + k``, on the pipeline's device, so any single image can be regenerated alone.

Nothing a run writes replaces another run's files: names continue after the highest ``NNN-`` number
already in the folder and are claimed exclusively. Images are drawn in batches of ``batch_size`` and
each batch is saved as soon as it is done, so Ctrl-C or a full disk loses at most the batch in flight.
"""

from __future__ import annotations

import inspect
import math
import platform
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open

from . import __version__
from .errors import EllaError
from .io import atomic_path, file_in_the_way, json_text

# The official inference.py: DPM-Solver++ multistep, 50 steps, 512x512, guidance 12, seed 1001.
# (Its gradio demo used 25 steps and guidance 10; users report lower guidance blurs less.)
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 12.0
DEFAULT_SIZE = 512
DEFAULT_SEED = 1001
DEFAULT_BATCH = 4  # images per pipeline call: fills a GPU at 512², and bounds what Ctrl-C can lose
#: Every SD-family base is trained on 1,000 timesteps; schedulers refuse more steps than that.
MAX_STEPS = 1000
#: The largest side we draw: beyond it the UNet's attention alone needs more memory than any GPU has.
MAX_SIDE = 4096
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


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
    batch_size: int = DEFAULT_BATCH  # images per pipeline call (may change the last bits of an image on GPU)
    clip_prompt: str | None = None  # ella+clip: CLIP's own text (default: the prompt)
    negative_clip_prompt: str | None = None
    prompt_weights: bool = True  # A1111 (word:1.3) emphasis; False removes the markup, as before it existed

    def validate(self, prompts: int = 1) -> None:
        """The one place the sampling numbers are checked: finite, in range, before any model loads."""
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise EllaError(f"width and height must be positive multiples of 8; got {self.width}x{self.height}")
        if max(self.width, self.height) > MAX_SIDE:
            raise EllaError(f"width and height must be at most {MAX_SIDE}; got {self.width}x{self.height}")
        if self.steps < 1:
            raise EllaError(f"steps must be at least 1; got {self.steps}")
        if self.steps > MAX_STEPS:
            raise EllaError(f"steps must be at most {MAX_STEPS} (the base's training timesteps); got {self.steps}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise EllaError(f"guidance must be a finite number >= 0 (1 = no guidance); got {self.guidance}")
        if self.num_images < 1:
            raise EllaError(f"num-images must be at least 1; got {self.num_images}")
        if self.batch_size < 1:
            raise EllaError(f"batch size must be at least 1; got {self.batch_size}")
        if not 0 <= self.seed <= MAX_SEED - prompts * self.num_images:
            raise EllaError(f"seed must be in [0, 2**64) with room for one seed per image; got {self.seed}")
        if self.strength is not None and not (math.isfinite(self.strength) and 0.0 < self.strength <= 1.0):
            raise EllaError(f"strength must be in (0, 1]; got {self.strength}")
        named = (("clip-prompt", self.clip_prompt), ("negative-clip-prompt", self.negative_clip_prompt))
        clip = [flag for flag, value in named if value is not None]
        if clip and self.condition_mode != "ella+clip":
            raise EllaError(
                f"--{' and --'.join(clip)} feed the base's CLIP, which runs only with --mode ella+clip; "
                "add --mode ella+clip or drop them"
            )


def call_parameters(pipe) -> set[str]:
    """What the diffusers ``__call__`` behind ``pipe`` accepts (img2img takes no width/height, txt2img no strength)."""
    # heavy (diffusers): the CLI imports this module for its defaults and input checks, before any model is needed
    from .pipelines.base import CALL_OPTIONS, EllaMixin

    parent = next(c for c in type(pipe).__mro__ if "__call__" in vars(c) and not issubclass(c, EllaMixin))
    names = set(inspect.signature(parent.__call__).parameters)
    return names | (set(CALL_OPTIONS) if isinstance(pipe, EllaMixin) else set())


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:n] or "prompt"


def versions() -> dict:
    import diffusers  # heavy: see call_parameters
    import transformers

    return {
        "ella-diffusion": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def check_out_dir(out_dir: str | Path, images: int = 0, width: int = 0, height: int = 0) -> Path:
    """A folder we can write ``images`` PNGs into — checked before any model loads.

    Refuses a file (or a path under one), a folder we can't write, and a run whose images can't fit
    on the disk (counted at their uncompressed size: an upper bound for a PNG).
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise EllaError(f"--out {out} is a file; give a folder for the images")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise EllaError(f"--out {out} is under {blocker}, which is a file; give a folder for the images")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise EllaError(f"--out {out} is not writable ({err.strerror}); pick a folder you can write to") from None
    need = images * (width * height * 3 + 4096)
    free = shutil.disk_usage(out).free
    if need > free:
        raise EllaError(
            f"{images} images of {width}x{height} need up to {need / 1e9:.1f} GB in {out}, "
            f"which has {free / 1e9:.1f} GB free; draw fewer (--num-images) or free some space"
        )
    return out


_NUMBERED = re.compile(r"^(\d+)-")


def _names(out_dir: Path) -> Iterator[int]:
    """Indices for new files: after every ``NNN-`` already in ``out_dir`` (another run's files stay)."""
    taken = [int(m.group(1)) for p in out_dir.iterdir() if (m := _NUMBERED.match(p.name))]
    yield from range(max(taken, default=-1) + 1, 10**9)


def _chunks(jobs: list, size: int) -> Iterator[list]:
    for i in range(0, len(jobs), size):
        yield jobs[i : i + size]


def generate_to_dir(
    pipe,
    prompts: list[str],
    settings: SampleSettings,
    out_dir: str | Path,
    sources: dict,
    inputs: dict | None = None,
    on_saved: Callable[[Path], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Generate ``num_images`` per prompt; write ``NNN-<slug>-seed<S>.png`` + ``.json`` as each batch finishes.

    ``sources`` names the models (base/ella/llm as given) for the sidecar; ``inputs`` are extra
    ``__call__`` arguments by the pipeline's own names (``image``, ``mask_image``,
    ``control_image``), each ``(PIL image, path)``, the path recorded in the sidecar. ``on_saved`` is
    called with each PNG's path as soon as it is on disk (the CLI prints it: progress that survives Ctrl-C);
    ``on_step(done, total)`` after every denoising step of every batch (``ella serve``'s progress bar).
    """
    settings.validate(len(prompts))
    out_dir = check_out_dir(out_dir, len(prompts) * settings.num_images, settings.width, settings.height)
    steps_limit = pipe.scheduler.config.get("num_train_timesteps", MAX_STEPS)
    if settings.steps > steps_limit:
        raise EllaError(
            f"steps must be at most {steps_limit} for this base (its scheduler's training timesteps); "
            f"got {settings.steps}"
        )
    accepted = call_parameters(pipe)
    if settings.condition_mode != "ella" and "condition_mode" not in accepted:
        raise EllaError(f"condition mode {settings.condition_mode!r} needs an ELLA pipeline")
    device = pipe._execution_device
    call = {
        "negative_prompt": settings.negative_prompt,
        "num_inference_steps": settings.steps,
        "guidance_scale": settings.guidance,
        "output_type": "pil",
        "width": settings.width,
        "height": settings.height,
        "strength": settings.strength,
        "condition_mode": settings.condition_mode,
        "clip_prompt": settings.clip_prompt,
        "negative_clip_prompt": settings.negative_clip_prompt,
        "prompt_weights": None if settings.prompt_weights else False,
    }
    call = {k: v for k, v in call.items() if k in accepted and v is not None}
    for name, (image, _) in (inputs or {}).items():
        call[name] = image
    batches = -(-len(prompts) * settings.num_images // settings.batch_size)
    done = [0]

    def step_end(_pipe, _step, _t, tensors):  # diffusers' callback_on_step_end: must hand the tensors back
        done[0] += 1
        on_step(done[0], batches * max(1, _pipe.num_timesteps))
        return tensors

    if on_step is not None and "callback_on_step_end" in accepted:
        call["callback_on_step_end"] = step_end
    jobs = [
        (prompt, settings.seed + k) for k, prompt in enumerate(p for p in prompts for _ in range(settings.num_images))
    ]
    names = _names(out_dir)
    written = []
    for chunk in _chunks(jobs, settings.batch_size):
        generators = [torch.Generator(device=device).manual_seed(seed) for _, seed in chunk]
        images = pipe([prompt for prompt, _ in chunk], generator=generators, **call).images
        for image, (prompt, seed) in zip(images, chunk):
            record = {
                "prompt": prompt,
                **{k: v for k, v in asdict(settings).items() if k not in ("seed", "num_images")},
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
                "fast": bool(getattr(pipe, "_ella_fast", False)),  # enable_fast_inference: same up to fp16 rounding
                "cpu_offload": bool(getattr(pipe, "_all_hooks", None)),  # enable_low_vram / diffusers' offload
                "inputs": {name: str(path) for name, (_, path) in (inputs or {}).items()},
                "models": sources,
                "versions": versions(),
            }
            written.append(_save(out_dir, names, f"{slug(prompt)}-seed{seed}", image, record))
            if on_saved is not None:
                on_saved(written[-1])
    return written


def _save(out_dir: Path, names: Iterator[int], stem: str, image: Image.Image, record: dict) -> Path:
    """PNG + sidecar under the next free number; never over an existing file; a full disk is one clear line."""
    sidecar = json_text(record)
    for index in names:
        png = out_dir / f"{index:03d}-{stem}.png"
        try:
            with atomic_path(png, exclusive=True) as tmp:
                image.save(tmp, format="PNG")
            with atomic_path(png.with_suffix(".json"), exclusive=True) as tmp:
                tmp.write_text(sidecar)
            return png
        except FileExistsError:
            continue  # another run claimed this number a moment ago: take the next
        except OSError as err:
            raise EllaError(
                f"could not write {png} ({err.strerror}); the images finished before it are saved"
            ) from None
    raise EllaError(f"{out_dir} has no free image number left")


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


def open_image(path: str, name: str) -> Image.Image:
    """An input image as 8-bit RGB (or L for masks), refusing what can't be read safely.

    Pillow's decompression-bomb guard is made an error (a tiny PNG can claim 10^10 pixels), and
    16-bit greyscale (mode ``I;16``/``I``) is scaled down to 8 bits — a plain ``convert`` clips it
    to white.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise EllaError(f"{name} {path!r} is too large to open safely: {err}") from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise EllaError(f"cannot read image {path!r}: {err}") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("L" if name == "mask_image" else "RGB")


def read_inputs(
    kind: str, init_image: str | None, mask: str | None, control_image: str | None, width: int, height: int
) -> dict:
    """``{call name: (RGB image at width x height, path)}`` for :func:`generate_to_dir`."""
    inputs = {}
    for name, path in zip(INPUT_NAMES[kind], (init_image, mask, control_image)):
        if name is None:
            continue
        inputs[name] = (open_image(path, name).resize((width, height), Image.LANCZOS), path)
    return inputs


#: Tensor-name pieces every LoRA format uses (diffusers/PEFT lora_A/B, kohya lora_down/up, A1111 alpha).
_LORA_KEY = re.compile(r"lora|alpha", re.IGNORECASE)


def check_loras(specs: list[str]) -> list[dict]:
    """``FILE[:SCALE]`` each -> ``{"path", "file", "scale"}``, checked before any model loads.

    Only safetensors are accepted (a pickled ``.bin`` can run code when loaded); the file must hold
    LoRA tensors and the scale must be a finite number.
    """
    checked = []
    for spec in specs:
        path, _, scale = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
        try:
            weight = float(scale) if scale else 1.0
        except ValueError:
            raise EllaError(
                f"--lora {spec!r}: the scale after ':' must be a number, e.g. style.safetensors:0.8"
            ) from None
        if not math.isfinite(weight):
            raise EllaError(f"--lora {spec!r}: the scale must be a finite number, got {scale}")
        target = Path(path).expanduser()
        if target.is_dir():
            files = sorted(target.glob("*.safetensors"))
            if len(files) != 1:
                raise EllaError(
                    f"--lora {path!r}: a LoRA folder must hold exactly one .safetensors file "
                    f"(found {len(files)}); pass the file itself"
                )
            target = files[0]
        if not target.is_file():
            raise EllaError(f"--lora {path!r} does not exist (a LoRA .safetensors file or a diffusers LoRA dir)")
        if target.suffix != ".safetensors":
            raise EllaError(f"--lora {path!r}: only .safetensors LoRAs are loaded (pickled files can run code)")
        try:
            with safe_open(str(target), framework="pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as err:
            raise EllaError(f"--lora {path!r} is not a readable safetensors file: {err}") from None
        if not any(_LORA_KEY.search(k) for k in keys):
            raise EllaError(
                f"--lora {path!r} holds no LoRA tensors (its {len(keys)} tensors have no lora_A/lora_down/"
                "alpha names); is it a full checkpoint?"
            )
        checked.append({"path": path, "file": str(target), "scale": weight})
    return checked


def load_loras(pipe, loras: list[dict]) -> list[dict]:
    """Checked LoRAs (:func:`check_loras`) -> ``pipe.load_lora_weights`` (diffusers reads diffusers, kohya and
    A1111 LoRAs); returns what the sidecar records."""
    for i, lora in enumerate(loras):
        target = Path(lora["file"])
        try:
            pipe.load_lora_weights(str(target.parent), weight_name=target.name, adapter_name=f"lora{i}")
        except (ValueError, KeyError, RuntimeError) as err:
            raise EllaError(f"--lora {lora['path']!r} does not fit this base model: {err}") from None
    if loras:
        pipe.set_adapters([f"lora{i}" for i in range(len(loras))], adapter_weights=[d["scale"] for d in loras])
    return [{"path": d["path"], "scale": d["scale"]} for d in loras]
