"""Fast inference: what a diffusers expert does to a Stable Diffusion pipeline, applied to an ELLA one in one call.

``pipe.enable_fast_inference()`` (or ``ella generate --fast``) applies the recipe of diffusers' own
"accelerate inference" guide — fused QKV projections, channels-last memory, inductor's tuned flags,
``torch.compile`` of the UNet and the VAE decoder with CUDA graphs (``mode="reduce-overhead"``; the guide's
coordinate-descent tuning only with ``mode="max-autotune"``) — and
two things only an ELLA pipeline has: the LLM encode compiled too (at ~50 ms eager it is a tenth of a
compiled 50-step image), and the LLM features of negative prompts (``""`` by default) kept across calls.
Images stay the same up to fp16 rounding: every change reorders arithmetic, none changes it.

Why the compiled functions are the modules' ``forward`` (and ``vae.decode``) rather than the modules:
``pipe.unet`` stays a ``UNet2DConditionModel``, so LoRA loading, ``save_pretrained`` and the module
hooks keep working — and the hooks stay *outside* the graph: :class:`ella.conditioning.ConditionFeed`
swaps in each timestep's condition in Python before the compiled forward runs, as do accelerate's
offload hooks. The graph therefore sees one tensor per call whatever the timestep, prompt or guidance.

Recompiles, and how they are avoided: the batch dimension of every input is marked dynamic (with CFG a
UNet batch is 2 x prompts, so prompts 1-4 are one graph; CUDA graphs then record one replay per size),
prompts are padded to the fixed 128 tokens the release uses, and a single prompt's LLM batch is padded
to two rows (dynamo specialises a dimension of size 1). The compile caches live in a user cache
directory (``cache_dir``, default ``~/.cache/ella/torch-compile``) so a fresh process starts warm.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import EllaError

#: torch.compile modes that make sense here; "reduce-overhead" adds CUDA graphs (the winner at batch 1,
#: where a step is launch-bound), "max-autotune" also benchmarks kernels (minutes of compiling).
COMPILE_MODES = ("reduce-overhead", "max-autotune", "default", "max-autotune-no-cudagraphs")
DEFAULT_CACHE_DIR = Path("~/.cache/ella/torch-compile")


def enable_fast_inference(
    pipe,
    *,
    mode: str = "reduce-overhead",
    compile_llm: bool = True,
    compile_vae: bool = True,
    fuse_qkv: bool = True,
    backend: str = "inductor",
    cache_dir: str | os.PathLike | None = None,
) -> None:
    """Make ``pipe`` (any ELLA or plain diffusers SD/SDXL pipeline) fast; see the module docstring.

    ``backend`` other than ``"inductor"`` (``"eager"``, ``"aot_eager"``) keeps dynamo's tracing and
    guards but compiles nothing: what tests use to count recompiles without minutes of compiling.
    Call it once, after the pipeline is on its device and any LoRA is loaded (fusing QKV bakes in the
    attention weights present at that moment; a LoRA loaded later still works but recompiles).
    """
    if mode not in COMPILE_MODES:
        raise EllaError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if unet is None or vae is None:
        raise EllaError(f"{type(pipe).__name__} has no unet/vae: enable_fast_inference speeds up diffusion pipelines")
    if getattr(pipe, "_ella_fast", False):
        return  # already fast: compiling a compiled forward would only add a layer
    if getattr(pipe, "_all_hooks", None):  # diffusers' model offload (enable_low_vram included) is on
        raise EllaError(
            "enable_fast_inference after an offload (enable_low_vram / enable_model_cpu_offload): CUDA graphs "
            "hold fixed weight addresses and offloading moves the weights every call; use one or the other"
        )
    if backend == "inductor":
        _inductor_settings(cache_dir, mode)
    if fuse_qkv:
        unet.fuse_qkv_projections()
        vae.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    options = {"mode": mode} if backend == "inductor" else {}
    unet.forward = _batch_dynamic(torch.compile(unet.forward, backend=backend, fullgraph=True, **options))
    if compile_vae:
        vae.decode = _batch_dynamic(torch.compile(vae.decode, backend=backend, fullgraph=True, **options))
    llm = getattr(pipe, "llm", None)
    if compile_llm and llm is not None:
        # CUDA graphs would keep one static copy of the features per prompt count; the encode runs once
        # per call, so a plain compiled graph (no "reduce-overhead") is the better trade.
        llm_options = {"mode": "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"}
        compiled = torch.compile(llm.forward, backend=backend, **(llm_options if backend == "inductor" else {}))
        llm.forward = _pad_single(_batch_dynamic(compiled))
    pipe._ella_fast = True


def _inductor_settings(cache_dir: str | os.PathLike | None, mode: str = "reduce-overhead") -> None:
    """diffusers' recommended inductor flags, and a compile cache that outlives the process.

    The flags are process-wide (inductor has no per-graph switch for them), which is why they are set
    here, when a user asks for speed, and not at import. Coordinate-descent tuning (benchmarking each
    kernel's launch configurations) comes only with the ``max-autotune`` modes, which already spend
    minutes compiling: with it on, a reduce-overhead compile of the SD1.5 UNet on an H200 had not finished
    after 7.5 minutes (benchmarks/RESULTS.md; the flag is the likely cause, not a proven one).
    """
    import torch._inductor.config as inductor
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    inductor.conv_1x1_as_mm = True
    inductor.epilogue_fusion = False
    if mode.startswith("max-autotune"):
        inductor.coordinate_descent_tuning = True
        inductor.coordinate_descent_check_all_directions = True
    # inductor reads the directory from the environment at each use, and writes its default (under /tmp, gone
    # at reboot) back there the first time: only a value other than that default is the user's own choice.
    if cache_dir is not None or os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        cache = Path(cache_dir or os.environ.get("ELLA_COMPILE_CACHE") or DEFAULT_CACHE_DIR).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    inductor.fx_graph_cache = True
    inductor.autotune_local_cache = True


def _batch_dynamic(fn: Callable) -> Callable:
    """``fn`` with dim 0 of every tensor argument of size >= 2 marked dynamic (one graph for every batch size)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            _mark(value)
        return fn(*args, **kwargs)

    return call


def _mark(value) -> None:
    if isinstance(value, torch.Tensor):
        if value.ndim and value.shape[0] >= 2:
            torch._dynamo.maybe_mark_dynamic(value, 0)
    elif isinstance(value, dict):  # SDXL's added_cond_kwargs
        for v in value.values():
            _mark(v)


def _pad_single(forward: Callable) -> Callable:
    """An LLM forward that runs a batch of one as two identical rows and returns the first.

    dynamo specialises dimensions of size 1, so a one-prompt call would otherwise compile a graph of
    its own; a second row of a 128-token encode costs far less than that recompile.
    """

    @functools.wraps(forward)
    def call(input_ids=None, attention_mask=None, **kwargs):
        if input_ids is None or input_ids.shape[0] != 1:
            return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        two = forward(
            input_ids=input_ids.expand(2, -1).contiguous(),
            attention_mask=None if attention_mask is None else attention_mask.expand(2, -1).contiguous(),
            **kwargs,
        )
        return type(two)(**{k: _first(v) for k, v in two.items()})

    return call


def _first(value):
    if isinstance(value, torch.Tensor):
        return value[:1]
    if isinstance(value, tuple):
        return tuple(_first(v) for v in value)
    return value
