"""What ``ella serve`` does with a request, without any web framework: load once, check, generate, explain.

The web page (:mod:`ella.serve.app`) is a thin layer over :class:`Backend`, so everything a request can do is
the CLI's own code path: :class:`~ella.sample.SampleSettings` checks the numbers, :func:`~ella.sample.read_inputs`
the uploaded images, and :func:`~ella.sample.generate_to_dir` writes the PNG + JSON sidecar, which is why the
server's image for a prompt and seed is byte-for-byte the one ``ella generate`` writes.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EllaError
from ..loading import as_kind, load_pipeline
from ..sample import SampleSettings, check_loras, generate_to_dir, kind_for, load_loras, read_inputs
from ..schedulers import SCHEDULER_ALIASES, make_scheduler

#: How many example prompts the page offers.
EXAMPLES = 6


@dataclass
class Request:
    """One click of Generate (the API endpoint's parameters)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = -1  # -1: a random seed (the one used is returned)
    steps: int = 25
    guidance: float = 5.0
    width: int = 64
    height: int = 64
    scheduler: str = "default"
    num_images: int = 1
    mode: str = "ella"
    clip_prompt: str = ""
    init_image: str | None = None
    mask_image: str | None = None
    strength: float = 0.8
    control_image: str | None = None
    loras: list[str] = field(default_factory=list)  # of the server's --lora files: the ones active in this request


@dataclass
class Result:
    images: list[Path]
    sidecars: list[Path]
    seed: int
    questions: list[list[tuple[str, bool]]] = field(default_factory=list)  # per image, shapes model only


class Backend:
    """The loaded pipeline, its defaults, and the shapes oracle when the shapes model is loaded.

    ``model``: ``"shapes"`` (the shipped mini ELLA), a shapes model dir, or None for the real models
    (``base``/``ella``/``llm`` as ``ella generate`` takes them). Requests run one at a time (a lock; the web
    queue also serialises them): a diffusers pipeline is not re-entrant, and one GPU serves one batch anyway.
    """

    def __init__(
        self,
        *,
        model: str | None = "shapes",
        base: str | None = None,
        ella: str | None = None,
        llm: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        out: str | Path = "ella-serve-out",
        controlnet: str | None = None,
        loras: list[str] | None = None,
        fast: bool = False,
        low_vram: bool = False,
    ):
        self.shapes = model is not None
        self.out = Path(out).expanduser()
        self._lock = threading.Lock()
        self._scenes: dict[str, tuple] = {}  # shapes prompt -> (scene, what it specifies): the oracle's questions
        if self.shapes:
            from ..shapes import models as M
            from ..shapes.ship import load_shapes_pipeline

            self.pipe = load_shapes_pipeline(None if model == "shapes" else model, device=device or "cpu")
            self.defaults = Request(prompt="", steps=25, guidance=5.0, width=M.RESOLUTION, height=M.RESOLUTION)
            self.sources = {"model": model}
        else:
            self.pipe = load_pipeline(
                base, ella, llm, device=device, dtype=dtype, mode="ella+clip", controlnet=controlnet,
                kind="controlnet" if controlnet else "txt2img",
            )  # fmt: skip
            self.defaults = Request(prompt="", steps=50, guidance=12.0, width=512, height=512)
            self.sources = {"base": str(base), "ella": str(ella), "llm": str(llm), "controlnet": controlnet}
        self.controlnet = controlnet is not None
        self._base_scheduler = self.pipe.scheduler
        self._kinds = {}  # pipeline kind -> the same models as that kind (built at its first request)
        # every --lora loads once as its own adapter; a request switches the ones it names on (at their scales)
        loaded = load_loras(self.pipe, check_loras(loras or []))
        self.loras = {d["path"]: (f"lora{i}", d["scale"]) for i, d in enumerate(loaded)}
        if self.loras:
            self.pipe.disable_lora()
        if fast:
            self.pipe.enable_fast_inference()
        if low_vram:
            self.pipe.enable_low_vram()

    # ------------------------------------------------------------------------------------------------ examples
    def examples(self) -> list[str]:
        """Shapes: held-out scene prompts of every kind (their questions known); real models: dense DPG prompts."""
        if not self.shapes:
            from ..bench.data import dpg_prompts

            return [text for _, text in sorted(dpg_prompts().items())[:EXAMPLES]]
        return [self.scene_prompt(i) for i in range(EXAMPLES)]

    def scene_prompt(self, index: int) -> str:
        """A held-out shapes prompt whose scene the oracle knows (so its image gets PASS/FAIL questions)."""
        from ..shapes.captions import prompt_for
        from ..shapes.evaluate import EVAL_KINDS, EVAL_SEED_OFFSET
        from ..shapes.world import scene_for

        seed = EVAL_SEED_OFFSET + 7
        caption = prompt_for(seed, index, EVAL_KINDS[index % len(EVAL_KINDS)])
        self._scenes[caption.text] = (scene_for(seed, index), caption.specified)
        return caption.text

    # ------------------------------------------------------------------------------------------------- generate
    def settings(self, r: Request) -> tuple[SampleSettings, int]:
        """The request as :class:`SampleSettings` (checked), and the seed it runs with."""
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise EllaError("the prompt is empty: describe the image")
        modes = ("ella",) if self.shapes else ("ella", "ella+clip")  # the shapes model has no CLIP
        if r.mode not in modes:
            raise EllaError(f"mode {r.mode!r}: use {' or '.join(modes)}")
        numbers = {"seed": r.seed, "steps": r.steps, "num_images": r.num_images, "width": r.width, "height": r.height}
        for name, value in numbers.items():
            if isinstance(value, bool) or not float(value).is_integer():
                raise EllaError(f"{name} must be a whole number; got {value!r}")
        seed = int(r.seed) if int(r.seed) >= 0 else random.randrange(0, 2**32)
        settings = SampleSettings(
            negative_prompt=r.negative_prompt or "",
            steps=int(r.steps),
            guidance=float(r.guidance),
            width=int(r.width),
            height=int(r.height),
            seed=seed,
            num_images=int(r.num_images),
            strength=float(r.strength) if r.init_image else None,
            condition_mode=r.mode,
            clip_prompt=(r.clip_prompt or None) if r.mode == "ella+clip" else None,
        )
        settings.validate(1)
        if settings.num_images > 8:
            raise EllaError(f"at most 8 images per request; got {settings.num_images}")
        return settings, seed

    def generate(self, r: Request, on_step: Callable[[int, int], None] | None = None) -> Result:
        """Check everything (one :class:`EllaError` line each), then draw; files land in a folder of their own."""
        settings, seed = self.settings(r)
        if r.control_image and not self.controlnet:
            raise EllaError("this server has no ControlNet loaded (start it with --controlnet)")
        kind = kind_for(r.init_image, r.mask_image, "controlnet" if r.control_image else None, r.control_image)
        inputs = read_inputs(kind, r.init_image, r.mask_image, r.control_image, settings.width, settings.height)
        scheduler = self._scheduler(r.scheduler)
        unknown = [name for name in r.loras or [] if name not in self.loras]
        if unknown:
            have = ", ".join(self.loras) or "none"
            raise EllaError(f"LoRA {unknown[0]!r} is not loaded on this server (start it with --lora); it has: {have}")
        with self._lock:
            pipe = self._kinds.get(kind) or self._kinds.setdefault(kind, as_kind(self.pipe, kind))
            pipe.scheduler = scheduler
            self._switch_loras(r.loras or [])
            out = self.out / uuid.uuid4().hex[:12]
            sources = {**self.sources, "kind": kind, "lora": [{"path": n, "scale": self.loras[n][1]} for n in r.loras]}
            images = generate_to_dir(pipe, [r.prompt], settings, out, sources, inputs, on_step=on_step)
        sidecars = [p.with_suffix(".json") for p in images]
        return Result(images, sidecars, seed, self._questions(r.prompt, images))

    def _switch_loras(self, names: list[str]) -> None:
        if not self.loras:
            return
        if not names:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([self.loras[n][0] for n in names], adapter_weights=[self.loras[n][1] for n in names])

    def _scheduler(self, name: str):
        if not name or name == "default":
            return self._base_scheduler
        if name not in SCHEDULER_ALIASES:
            raise EllaError(f"unknown scheduler {name!r}; use default or one of {', '.join(SCHEDULER_ALIASES)}")
        return make_scheduler(name, self._base_scheduler.config)

    def _questions(self, prompt: str, images: list[Path]) -> list[list[tuple[str, bool]]]:
        """Shapes model, a prompt whose scene is known: each image's shapes-DPG questions, PASS or FAIL."""
        if not self.shapes or prompt not in self._scenes:
            return []
        from PIL import Image

        from ..shapes.oracle import ShapesOracle
        from ..shapes.questions import questions

        oracle = ShapesOracle()
        asked = questions(*self._scenes[prompt])
        marks = []
        for path in images:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            marks.append([(q.question, oracle(rgb, q.question) == "yes") for q in asked])
        return marks
