"""What every ELLA pipeline shares: LLM encoding, the condition table, and the UNet feed.

A pipeline class is ``class EllaX(EllaMixin, diffusers.X)``, declared in ``stable_diffusion.py`` /
``stable_diffusion_xl.py``: the mixin overrides ``encode_prompt``
(LLM + connector instead of CLIP) and wraps ``__call__`` so the UNet (and ControlNet) receive the
per-timestep condition; the diffusers loop, schedulers, LoRA/IP-Adapter loaders, callbacks and
``output_type`` handling are the parent's, unchanged.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import warnings
from typing import ClassVar

import torch
from diffusers import DiffusionPipeline

from ..conditioning import ClipPart, ConditionFeed, ConditionTable, placeholder_embeds
from ..errors import EllaError, InvalidArgumentError
from ..prompts import PromptWeightsWarning, parse_weights
from ..text import DEFAULT_MAX_LENGTH, TextFeatures, WeightSpans, encode_text, layer_count
from .clip import encode_clip
from .fast import enable_fast_inference
from .memory import enable_low_vram
from .prompting import PromptPlan, plan_prompts

#: Distinct negative prompts whose LLM features a fast pipeline keeps (one is the common case: "").
MAX_CACHED_NEGATIVES = 8
# bf16 holds integers exactly only up to 256: the placeholder row ids must survive the loop's dtype.
_MAX_ROWS = {torch.bfloat16: 256, torch.float16: 2048}

ELLA_COMPONENTS = ["connector", "llm", "llm_tokenizer"]
#: ``ella``: the connector's tokens only (the paper). ``ella+clip``: the base's CLIP tokens and ELLA's.
CONDITION_MODES = ("ella", "ella+clip")
#: ``__init__`` arguments every ELLA pipeline adds to its diffusers parent (all saved in model_index.json).
ELLA_INIT_DEFAULTS = {
    "connector": None,
    "llm": None,
    "llm_tokenizer": None,
    "llm_max_length": DEFAULT_MAX_LENGTH,
    "llm_flexible": False,
    "llm_hidden_layer": None,
    "condition_mode": "ella",
    "clip_first": True,
}
#: Per-call options our ``__call__`` accepts on top of the parent's (defaults: the pipeline config).
CALL_OPTIONS = (
    "condition_mode",
    "clip_first",
    "clip_scale",
    "ella_scale",
    "clip_prompt",
    "negative_clip_prompt",
    "prompt_weights",
)
#: Options that only mean something in ``ella+clip`` mode.
CLIP_OPTIONS = ("clip_scale", "ella_scale", "clip_prompt", "negative_clip_prompt")


class EllaMixin:
    """Turns a diffusers text-to-image pipeline into an ELLA one (see module docstring).

    Declaring ``class EllaX(EllaMixin, diffusers.X)`` is all a new pipeline kind needs: the class
    gets ``X.__init__`` plus the ELLA components (connector, llm, llm_tokenizer) and options, and
    the CLIP text encoder(s) become optional (ELLA replaces them; ``ella+clip`` mode uses them).
    """

    _ella_table: ConditionTable | None = None
    _ella_plan: PromptPlan | None = None  # the current call's (read by SDXL for CLIP's pooled embedding)
    _clip_pooled: torch.Tensor | None = None  # per CLIP row, SDXL
    _ella_fast = False  # set by enable_fast_inference
    _ella_feature_cache: ClassVar[dict] = {}  # replaced per pipeline on first use (see _encode_rows)
    _ella_feature_key: tuple | None = None
    _ella_options: ClassVar[dict] = {}  # per call; __call__ sets and clears it
    _warned_feature_dtype = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        parent = next(
            (b for b in cls.__mro__[1:] if issubclass(b, DiffusionPipeline) and not issubclass(b, EllaMixin)), None
        )
        if parent is None:  # another mixin (EllaXLMixin): the pipeline classes below it get the __init__
            return
        cls.__init__ = _ella_init(parent)
        params = inspect.signature(parent.__init__).parameters
        clip = [p for p in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") if p in params]
        cls._optional_components = list(dict.fromkeys(parent._optional_components + clip + ELLA_COMPONENTS))

    def _register_ella(
        self,
        connector,
        llm,
        llm_tokenizer,
        llm_max_length,
        llm_flexible,
        llm_hidden_layer,
        condition_mode="ella",
        clip_first=True,
    ):
        check_mode(condition_mode)
        self.register_modules(connector=connector, llm=llm, llm_tokenizer=llm_tokenizer)
        self.register_to_config(
            llm_max_length=llm_max_length,
            llm_flexible=llm_flexible,
            llm_hidden_layer=llm_hidden_layer,
            condition_mode=condition_mode,
            clip_first=clip_first,
        )
        self.check_compatible()

    def check_compatible(self) -> None:
        """Refuse mismatched parts up front (not as a matmul error at the first denoising step)."""
        connector, unet, llm = self.connector, getattr(self, "unet", None), self.llm
        if connector is None:
            return
        width = connector.config.width
        if unet is not None and width != unet.config.cross_attention_dim:
            raise EllaError(
                f"connector width {width} does not match the UNet's cross_attention_dim "
                f"{unet.config.cross_attention_dim}: these ELLA weights were made for another base model"
            )
        hidden = getattr(getattr(llm, "config", None), "hidden_size", None)
        layers = layer_count(self.config.llm_hidden_layer)
        if hidden is not None and hidden * layers != connector.config.input_dim:
            raise EllaError(
                f"the LLM's hidden size {hidden}{f' x {layers} layers' if layers > 1 else ''} does not match the "
                f"connector's input_dim {connector.config.input_dim}: use the LLM (and layers) these ELLA weights "
                "were trained with"
            )

    def encode_text(self, prompts: list[str], weights: list[WeightSpans] | None = None) -> TextFeatures:
        """LLM features for ``prompts`` with the pipeline's length policy (``llm_max_length``/``llm_flexible``);
        ``weights``: per prompt, emphasised character spans (:func:`ella.text.tokenize`)."""
        if self.llm is None or self.llm_tokenizer is None or self.connector is None:
            raise EllaError("this pipeline has no connector/llm/llm_tokenizer; load it with ella.load_pipeline(...)")
        trained = getattr(self.connector.config, "text_feature_dtype", None)
        if trained and str(self.llm.dtype) != f"torch.{trained}" and not self._warned_feature_dtype:
            self._warned_feature_dtype = True
            warnings.warn(
                f"these ELLA weights were trained on {trained} LLM features, but the LLM runs in "
                f"{str(self.llm.dtype).replace('torch.', '')}; images will differ slightly from the official ones "
                f"(use --dtype float16 on a GPU to match)",
                stacklevel=3,
            )
        return encode_text(
            self.llm,
            self.llm_tokenizer,
            prompts,
            max_length=self.config.llm_max_length,
            flexible=self.config.llm_flexible,
            hidden_layer=self.config.llm_hidden_layer,
            weights=weights if weights is not None and any(weights) else None,
        )

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        lora_scale=None,
        clip_skip=None,
        **kwargs,
    ):
        """LLM-encode positive and negative prompts into a condition table; return row placeholders.

        The negative prompt defaults to ``""`` (the release's unconditional branch: the LLM
        features of the empty string). Identical strings share one table row.
        """
        if prompt_embeds is not None or negative_prompt_embeds is not None:
            raise EllaError(
                "ELLA pipelines take text (`prompt`, `negative_prompt`), not CLIP `prompt_embeds`: "
                "the LLM and connector compute the condition"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise EllaError(f"prompt {i} is empty: describe the image (the empty prompt is the negative branch)")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise EllaError(
                    f"got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one or one each"
                )

        texts = prompts + (negatives if do_classifier_free_guidance else [])
        opts = self._ella_options
        clip = self._clip_texts(prompts, negatives if do_classifier_free_guidance else [], opts)
        plan = plan_prompts(texts, clip, weights=opts.get("prompt_weights", True))
        if plan.stripped:
            warnings.warn(
                f"prompt weights are off (prompt_weights=False): removed the markup: "
                f"{plan.stripped[0]!r} -> {plan.stripped[1]!r}",
                PromptWeightsWarning,
                stacklevel=3,
            )
        dtype = self.connector.dtype
        slots = max(plan.slot_of) + 1
        if max(slots, len(plan.llm_texts)) > _MAX_ROWS.get(dtype, 1 << 24):
            raise EllaError(f"at most {_MAX_ROWS[dtype]} distinct prompts per call in {dtype}; split the batch")
        cache_negatives = do_classifier_free_guidance and not plan.weighted
        negative_rows = set(negatives) & set(plan.llm_texts) if cache_negatives else set()
        self._ella_table = ConditionTable(
            self.connector,
            self._encode_rows(plan.llm_texts, negative_rows, plan.llm_spans),
            timesteps=lambda: self.scheduler.timesteps,
            clip=self._clip_part(plan, device, lora_scale, clip_skip),
            pooled=self._pooled_from_connector(),
            schedule=plan.schedule,
            run_from=lambda: getattr(self.scheduler, "begin_index", None),
        )
        self._ella_plan = plan

        def embeds(slot_ids):
            rows = torch.tensor(slot_ids).repeat_interleave(num_images_per_prompt)
            return placeholder_embeds(rows, device).to(dtype)

        n = len(prompts)
        return embeds(plan.slot_of[:n]), (embeds(plan.slot_of[n:]) if do_classifier_free_guidance else None)

    def _clip_texts(self, prompts: list[str], negatives: list[str], opts: dict) -> list[tuple[str, str | None]] | None:
        """Per slot text (positives, then negatives): the CLIP prompt(s) in ``ella+clip`` mode, else None.

        ``clip_prompt`` / ``negative_clip_prompt`` default to the LLM's prompt, as before they existed: the
        authors' advice for trigger words is a neutral sentence for the LLM and the tags in the CLIP prompt.
        SDXL's ``prompt_2`` / ``negative_prompt_2`` (set by its mixin) go to the second CLIP.
        """
        if opts.get("condition_mode", self.config.condition_mode) == "ella":
            given = [k for k in CLIP_OPTIONS if opts.get(k) is not None] + [
                k for k in ("prompt_2", "negative_prompt_2") if opts.get(k) is not None
            ]
            if given:
                raise EllaError(
                    f"{', '.join(given)} feed the base's CLIP in condition_mode='ella+clip'; this call runs in "
                    "'ella' mode (pass condition_mode='ella+clip', or `--mode ella+clip` on the command line)"
                )
            return None

        def per_prompt(value, default: list[str], name: str) -> list[str]:
            if value is None:
                return list(default)  # a copy: the caller extends it
            values = [value] * len(default) if isinstance(value, str) else list(value)
            if len(values) != len(default):
                raise EllaError(f"got {len(values)} {name}s for {len(default)} prompts; pass one or one each")
            return values

        n = len(prompts)
        first = per_prompt(opts.get("clip_prompt"), prompts, "clip_prompt")
        first += per_prompt(opts.get("negative_clip_prompt"), negatives, "negative_clip_prompt") if negatives else []
        second = per_prompt(opts.get("prompt_2"), [None] * n, "prompt_2")
        second += per_prompt(opts.get("negative_prompt_2"), [None] * len(negatives), "negative_prompt_2")
        return list(zip(first, second))

    def _encode_rows(self, texts: list[str], negatives: set[str], weights: list[WeightSpans]) -> TextFeatures:
        """LLM features of the table's rows; in fast mode those of negative prompts come from a cache.

        The negative prompt is nearly always the same (``""`` unless the user sets one), so after the first
        call its encode is pure waste. Cached only under :meth:`enable_fast_inference` (batching it apart
        from the positives changes fp16 rounding, which the default mode promises not to do), only at
        a fixed length (every row then has the same shape) and only without prompt weights. The cache is
        dropped when the LLM, its dtype or device, or the length policy change.
        """
        flexible = self.config.llm_flexible or self.config.llm_max_length is None
        if not self._ella_fast or flexible or not negatives or any(weights):
            return self.encode_text(texts, weights)
        layer = self.config.llm_hidden_layer
        layer = tuple(layer) if isinstance(layer, list) else layer
        key = (id(self.llm), self.llm.dtype, self.llm.device, self.config.llm_max_length, layer)
        if self._ella_feature_key != key:
            self._ella_feature_cache, self._ella_feature_key = {}, key
        cache = self._ella_feature_cache
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        rows = dict(zip(todo, self.encode_text(todo).hidden_states.split(1))) if todo else {}
        for text in todo:
            if text in negatives and len(cache) < MAX_CACHED_NEGATIVES:
                cache[text] = rows[text]
        return TextFeatures(torch.cat([rows[t] if t in rows else cache[t] for t in texts]))

    def enable_fast_inference(self, **options) -> None:
        """Compile and fuse for speed (see :func:`ella.pipelines.fast.enable_fast_inference` for ``options``)."""
        enable_fast_inference(self, **options)

    def enable_low_vram(self, *, llm_device=None, device=None, vae_tiling=None) -> None:
        """Only the running model on the accelerator (see :func:`ella.pipelines.memory.enable_low_vram`)."""
        enable_low_vram(self, llm_device=llm_device, device=device, vae_tiling=vae_tiling)

    def _clip_part(self, plan: PromptPlan, device, lora_scale, clip_skip) -> ClipPart | None:
        """In ``ella+clip`` mode, the base's CLIP embeddings of the plan's CLIP rows (textual inversions, LoRA
        scale, clip skip, emphasis weights, and prompts past 75 tokens in further 77-token windows)."""
        opts = self._ella_options
        if not plan.clip_rows:
            return None
        if getattr(self, "text_encoder", None) is None and getattr(self, "text_encoder_2", None) is None:
            raise EllaError(
                "condition_mode='ella+clip' needs the base model's CLIP text_encoder and tokenizer; "
                "load with ella.load_pipeline(..., mode='ella+clip') or `ella generate --mode ella+clip`"
            )
        embeds, pooled, _ = encode_clip(
            self,
            [first for first, _ in plan.clip_rows],
            device,
            rows_2=[second for _, second in plan.clip_rows],
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        self._clip_pooled = pooled
        return ClipPart(
            embeds,
            clip_first=opts.get("clip_first", self.config.clip_first),
            clip_scale=1.0 if opts.get("clip_scale") is None else float(opts["clip_scale"]),
            ella_scale=1.0 if opts.get("ella_scale") is None else float(opts["ella_scale"]),
        )

    def _pooled_from_connector(self) -> bool:
        """SDXL-style pipelines take a pooled embedding from the connector's head (overridden there)."""
        return False

    def clip_embeds(self, texts: list[str], device, lora_scale=None, clip_skip=None) -> torch.Tensor:
        """``[len(texts), 77 * windows, width]``: the base's CLIP encoding of ``texts`` as ``ella+clip`` uses it
        (emphasis markup parsed; long texts in further windows). Identical to the parent pipeline's
        ``encode_prompt`` for a plain text under 76 tokens."""
        rows = [parse_weights(t) for t in texts]
        embeds, _, _ = encode_clip(self, rows, device, lora_scale=lora_scale, clip_skip=clip_skip)
        return embeds

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """The parent pipeline's ``__call__`` — same arguments and outputs — with ELLA conditioning.

        Per call: the LLM runs once per distinct prompt; the connector runs once, batched, for
        all scheduler timesteps and all prompts (positive and negative); each UNet/ControlNet
        call gets the condition of its own timestep (:class:`~ella.conditioning.ConditionFeed`).
        Extra keyword arguments: ``condition_mode`` (``"ella"`` | ``"ella+clip"``, default: the
        pipeline's config), ``clip_first``, ``clip_scale``, ``ella_scale`` (``ella+clip`` only).

        Arguments are checked first (:func:`check_call_arguments`).
        """
        options = {k: kwargs.pop(k) for k in CALL_OPTIONS if k in kwargs}
        for k in ("prompt_2", "negative_prompt_2"):  # SDXL: its mixin routes them to the second CLIP
            if kwargs.get(k) is not None:
                options[k] = kwargs[k]
        parent_call = super().__call__
        check_call_arguments(self, parent_call, args, kwargs, options)
        if "condition_mode" in options:
            check_mode(options["condition_mode"])

        self._ella_options = options
        try:
            with ConditionFeed(lambda: self._ella_table).install([self.unet, getattr(self, "controlnet", None)]):
                return parent_call(*args, **kwargs)
        finally:
            self._ella_table = None
            self._ella_plan = None
            self._ella_options = {}


def check_call_arguments(pipe, parent_call, args: tuple, kwargs: dict, options: dict) -> None:
    """Refuse a bad ``__call__`` before the LLM, the connector or the UNet runs, each mistake one line.

    An argument the parent's ``__call__`` does not name (diffusers' ``**kwargs`` would swallow it
    silently), a prompt that is not a string or a non-empty list of strings, an image side that is
    not a positive multiple of 8, step or image counts below 1 (or more steps than the scheduler was
    trained with), and guidance, strength and scales that are not finite (strength in (0, 1]).
    """
    named = {
        name: p
        for name, p in inspect.signature(parent_call).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)  # diffusers' **kwargs only swallows typos
    }
    for key in kwargs:
        if key not in named:
            names = [*named, *CALL_OPTIONS]
            close = [n for n in names if n.startswith(key)] or difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"see help({type(pipe).__name__}.__call__)"
            raise InvalidArgumentError(f"{type(pipe).__name__} takes no argument {key!r}; {hint}")
    try:
        given = {**inspect.Signature(list(named.values())).bind(*args, **kwargs).arguments, **options}
    except TypeError as e:  # too many positional arguments, or one given twice
        raise InvalidArgumentError(f"{type(pipe).__name__}: {e}") from None

    prompt = given.get("prompt")
    if prompt is None and given.get("prompt_embeds") is None:
        raise InvalidArgumentError("no prompt: pass the text to draw, a string or a list of strings")
    for name in ("prompt", "negative_prompt", "clip_prompt", "negative_clip_prompt", "prompt_2", "negative_prompt_2"):
        value = given.get(name)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, list):
            raise InvalidArgumentError(f"{name} must be a string or a list of strings; got {type(value).__name__}")
        odd = [type(p).__name__ for p in value if not isinstance(p, str)]
        if odd:
            raise InvalidArgumentError(f"{name} must be a string or a list of strings; got a list holding {odd[0]}")
    if given.get("prompt_weights") is not None and not isinstance(given["prompt_weights"], bool):
        raise InvalidArgumentError(f"prompt_weights must be True or False; got {given['prompt_weights']!r}")
    if prompt == []:
        raise InvalidArgumentError("prompt is an empty list: give at least one prompt")
    for name in ("height", "width", "num_inference_steps", "num_images_per_prompt"):
        value = given.get(name)
        if value is None:
            continue
        side = name in ("height", "width")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or (side and value % 8):
            what = "a positive number of pixels divisible by 8" if side else "a whole number of at least 1"
            raise InvalidArgumentError(f"{name} must be {what}; got {value!r}")
    train_steps = pipe.scheduler.config.get("num_train_timesteps")
    if train_steps and (given.get("num_inference_steps") or 0) > train_steps:
        raise InvalidArgumentError(
            f"num_inference_steps must be at most {train_steps} (the scheduler's training timesteps); "
            f"got {given['num_inference_steps']}"
        )
    for name in ("guidance_scale", "guidance_rescale", "eta", "strength", "clip_scale", "ella_scale"):
        value = given.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
        ):
            raise InvalidArgumentError(f"{name} must be a finite number; got {value!r}")
    if given.get("strength") is not None and not 0 < given["strength"] <= 1:
        raise InvalidArgumentError(f"strength must be in (0, 1] (1 starts from pure noise); got {given['strength']!r}")


def check_mode(mode: str) -> None:
    if mode not in CONDITION_MODES:
        raise EllaError(f"unknown condition mode {mode!r}; use {' or '.join(CONDITION_MODES)}")


def _ella_init(parent: type):
    """``parent.__init__`` plus the ELLA arguments, with a signature diffusers' loaders can read.

    diffusers finds a pipeline's components from its ``__init__`` signature, so the signature is the
    parent's plus :data:`ELLA_INIT_DEFAULTS`, with the safety checker optional and off by default.
    """
    relaxed = {
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }
    parent_sig = inspect.signature(parent.__init__)
    params = [p.replace(default=relaxed[p.name]) if p.name in relaxed else p for p in parent_sig.parameters.values()]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in ELLA_INIT_DEFAULTS.items()]

    def __init__(self, *args, **kwargs):
        ella = {k: kwargs.pop(k, v) for k, v in ELLA_INIT_DEFAULTS.items()}
        bound = parent_sig.bind_partial(self, *args, **kwargs)
        for key, value in relaxed.items():
            if key in parent_sig.parameters and key not in bound.arguments:
                bound.arguments[key] = value
        parent.__init__(*bound.args, **bound.kwargs)
        self._register_ella(**ella)

    __init__.__signature__ = inspect.Signature(params)
    return __init__
