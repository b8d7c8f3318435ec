"""Assembling a ready ELLA pipeline from what the user names: a base, ELLA weights and an LLM.

Each part can be a hub id, a local directory or a single file (``hub.py`` resolves them and words
what is missing); this module decides which pipeline class, which components and dtypes, and
refuses mismatches before the big downloads load.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionPipeline

from .connector import TimestepAwareSemanticConnector
from .devices import check_device, resolve_dtype
from .errors import EllaError
from .hub import (
    DEFAULT_BASE,
    DEFAULT_ELLA_FILE,
    DEFAULT_ELLA_REPO,
    DEFAULT_LLM,
    SINGLE_FILE_SUFFIXES,
    base_config_dir,
    check_offline,
    ella_ident,
    loading,
)
from .llm import check_hidden_layer, check_quantization, is_single_file, load_llm
from .pipelines import PIPELINE_KINDS, PIPELINE_KINDS_XL, check_mode
from .pipelines.base import ELLA_COMPONENTS, ELLA_INIT_DEFAULTS
from .schedulers import make_scheduler


def load_connector(ella: str | os.PathLike = f"{DEFAULT_ELLA_REPO}/{DEFAULT_ELLA_FILE}", torch_dtype=None):
    """The connector from an official single file, a ``save_pretrained`` directory or the Hub."""
    local = Path(ella).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        with loading("ELLA connector weights", str(ella)):
            return TimestepAwareSemanticConnector.from_pretrained(local, dtype=torch_dtype)
    if local.is_dir():  # e.g. the --local-dir of `hf download QQGYLab/ELLA <file>`
        files = sorted(local.glob("*.safetensors"))
        if not (local / DEFAULT_ELLA_FILE).is_file() and len(files) != 1:
            raise EllaError(
                f"{local} has no config.json and {len(files)} .safetensors files; pass the file itself"
                + (f" (one of: {', '.join(f.name for f in files[:6])})" if files else "")
            )
        ella = local / DEFAULT_ELLA_FILE if (local / DEFAULT_ELLA_FILE).is_file() else files[0]
    else:
        ella = ella_ident(ella)
    return TimestepAwareSemanticConnector.from_single_file(ella, torch_dtype=torch_dtype)


def load_base(pipeline_cls, base: str | os.PathLike, scheduler: str | None, base_config=None, **components):
    """``pipeline_cls`` from a diffusers dir / hub id or a single checkpoint file, with ``scheduler``.

    A single file takes its component configs from ``base_config`` (see :func:`base_config_dir`).
    """
    with loading("base model", str(base)):
        if str(base).endswith(SINGLE_FILE_SUFFIXES):
            config = base_config_dir(base, base_config)
            pipe = pipeline_cls.from_single_file(str(base), config=config, **components)
        else:
            pipe = pipeline_cls.from_pretrained(base, **components)
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe


def load_pipeline(
    base: str | os.PathLike = DEFAULT_BASE,
    ella: str | os.PathLike = DEFAULT_ELLA_REPO,
    llm: str | os.PathLike = DEFAULT_LLM,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    llm_dtype: str | torch.dtype | None = None,
    scheduler: str | None = "dpm++",
    max_length: int | None = 128,
    flexible: bool = False,
    hidden_layer: int | list[int] | None = None,
    base_config: str | os.PathLike | None = None,
    kind: str = "txt2img",
    mode: str = "ella",
    controlnet: str | os.PathLike | None = None,
    llm_quantization: str | None = None,
    llm_tokenizer: str | os.PathLike | None = None,
):
    """Assemble an ELLA pipeline (:class:`~ella.pipelines.EllaStableDiffusionPipeline` by default) from three
    independent sources.

    ``base`` is a diffusers directory / hub id or a single ``.safetensors``/``.ckpt`` checkpoint
    (whose component configs come from ``base_config``: a diffusers directory or hub id, by default
    the repo diffusers infers from the file, e.g. SD 1.5 for SD 1.x);
    ``ella`` an official single file, ``save_pretrained`` directory or hub id; ``llm`` any HF
    encoder or decoder-only LM, or a single ``.safetensors`` of T5 encoder weights (its tokenizer from
    ``llm_tokenizer``, flan-t5-xl's by default). ``llm_quantization`` (``int8``, ``fp8``, ``nf4``)
    quantises the LLM's weights as they load (see :func:`ella.llm.load_llm`). The default scheduler is
    DPM-Solver++ multistep, as in the official ``inference.py``.

    A connector with a pooling head (trained for an SDXL-style UNet) gives the SDXL pipelines.
    ``kind``: ``txt2img``, ``img2img``, ``inpaint``, ``controlnet`` or ``controlnet-img2img`` (with
    ``controlnet``, a diffusers ControlNet dir or hub id). ``mode="ella+clip"`` also loads the base's
    CLIP text encoder and tokenizer (for trigger words and textual inversions); in ``ella`` mode
    they are not loaded (ELLA replaces them).
    """
    if kind not in PIPELINE_KINDS:
        raise EllaError(f"unknown pipeline kind {kind!r}; use one of {', '.join(PIPELINE_KINDS)}")
    check_mode(mode)
    if bool(controlnet) != kind.startswith("controlnet"):
        raise EllaError(f"pipeline kind {kind!r} {'needs' if kind.startswith('controlnet') else 'takes no'} controlnet")

    device = check_device(device)
    dtype = resolve_dtype(dtype, device)
    check_quantization(llm_quantization, device)
    # a single-file LLM brings no tokenizer: flan-t5-xl's unless another is named
    tokenizer = str(llm_tokenizer) if llm_tokenizer else (DEFAULT_LLM if is_single_file(llm) else None)
    check_offline(
        [
            ("ELLA connector weights", ella_ident(ella), DEFAULT_ELLA_FILE),
            ("LLM", str(llm), "config.json"),
            ("base model", str(base), "model_index.json"),
        ]
        + ([("LLM tokenizer", tokenizer, "tokenizer_config.json")] if tokenizer else [])
        + ([("ControlNet", str(controlnet), "config.json")] if controlnet else [])
    )
    if str(base).endswith(SINGLE_FILE_SUFFIXES):  # a missing config fails now, not after loading the LLM
        base_config = base_config_dir(base, base_config)
    check_hidden_layer(llm, hidden_layer)  # (a connector trained on several layers names them: read below)
    # The release ran T5 in fp16 on GPU and was trained on those features; CPU falls back to fp32.
    llm_dtype = resolve_dtype(llm_dtype, device)
    connector = load_connector(ella, torch_dtype=dtype)
    trained_layers = list(getattr(connector.config, "llm_layers", None) or [])
    asked = hidden_layer if isinstance(hidden_layer, list) else [hidden_layer]
    if trained_layers and hidden_layer is None:  # read the layers it was trained on
        hidden_layer = trained_layers
        check_hidden_layer(llm, hidden_layer)
    elif trained_layers and trained_layers != asked:
        raise EllaError(
            f"these ELLA weights were trained on LLM layers {list(trained_layers)}; --llm-layer {hidden_layer} "
            "reads others: drop --llm-layer"
        )
    llm_model, llm_tokenizer = load_llm(
        llm, dtype=llm_dtype, device=device, quantization=llm_quantization, tokenizer=llm_tokenizer
    )
    common = dict(
        connector=connector,
        llm=llm_model,
        llm_tokenizer=llm_tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        condition_mode=mode,
        llm_hidden_layer=hidden_layer,  # at construction: the compatibility check reads it (several layers: wider)
        dtype=dtype,
    )
    # A connector with a pooling head was trained for an SDXL-style UNet (pooled text embedding + time ids).
    xl = getattr(connector.config, "pooled_dim", None) is not None
    if mode == "ella":  # ELLA replaces CLIP: don't load it
        common.update(text_encoder=None, tokenizer=None)
        if xl:
            common.update(text_encoder_2=None, tokenizer_2=None)
    if controlnet:
        with loading("ControlNet", str(controlnet)):
            common["controlnet"] = ControlNetModel.from_pretrained(controlnet, torch_dtype=dtype)
    if xl:
        if kind not in PIPELINE_KINDS_XL:
            raise EllaError(
                f"pipeline kind {kind!r} is not available for SDXL; use one of {', '.join(PIPELINE_KINDS_XL)}"
            )
        del common["safety_checker"], common["requires_safety_checker"]  # SDXL pipelines have neither
    pipe = load_base((PIPELINE_KINDS_XL if xl else PIPELINE_KINDS)[kind], base, scheduler, base_config, **common)
    pipe.register_to_config(llm_max_length=max_length, llm_flexible=flexible, llm_hidden_layer=hidden_layer)
    return pipe.to(device)


def load_plain_pipeline(
    base: str | os.PathLike = DEFAULT_BASE,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    scheduler: str | None = "dpm++",
):
    """The plain diffusers baseline (CLIP text encoder), loaded like :func:`load_pipeline` loads ours."""
    device = check_device(device)
    dtype = resolve_dtype(dtype, device)
    check_offline([("base model", str(base), "model_index.json")])
    pipe = load_base(
        StableDiffusionPipeline,
        base,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        dtype=dtype,
    )
    return pipe.to(device)


def as_kind(pipe, kind: str):
    """The same loaded models as another pipeline kind (``img2img``, ``inpaint``, ...): no weights are copied or
    reloaded, so a server can offer every kind the base supports from one load."""
    xl = getattr(pipe.connector.config, "pooled_dim", None) is not None
    kinds = PIPELINE_KINDS_XL if xl else PIPELINE_KINDS
    if kind not in kinds:
        raise EllaError(f"pipeline kind {kind!r} is not available here; use one of {', '.join(kinds)}")
    cls = kinds[kind]
    if isinstance(pipe, cls):
        return pipe
    accepted = inspect.signature(cls.__init__).parameters
    parts = {k: v for k, v in pipe.components.items() if k in accepted}
    if kind.startswith("controlnet") and parts.get("controlnet") is None:
        raise EllaError(f"pipeline kind {kind!r} needs a ControlNet: load one with controlnet=... (--controlnet)")
    options = {k: pipe.config[k] for k in ELLA_INIT_DEFAULTS if k not in ELLA_COMPONENTS and k in pipe.config}
    sibling = cls(**parts, **options)
    sibling.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return sibling
