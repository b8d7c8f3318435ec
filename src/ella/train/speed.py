"""How the training step runs fast: attention kernels, fp8 matmuls for the frozen UNet, what gets compiled.

None of these change what is trained, only how fast: each is a flag of ``ella train`` and a row of
``benchmarks/bench_train.py``, which measured them against each other on one H200 (benchmarks/RESULTS.md,
"Training v2"). The defaults are the fastest settings whose loss curve matched the plain bf16 step's.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch

from ..errors import EllaError

#: ``--attention_backend``: which of PyTorch's scaled-dot-product-attention kernels may run (``auto``: torch
#: picks per call, cuDNN's first on Hopper). SD1.5's largest attention has head dim 40, a shape that every
#: kernel pads internally, so which one is fastest is measured rather than assumed.
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")

#: ``--compile_mode``: torch.compile modes. ``reduce-overhead`` adds CUDA graphs (static shapes only).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")

#: ``--compile_scope``: ``unet`` compiles the frozen UNet's forward alone (the first trainer's choice); ``step``
#: compiles the whole loss — noise, connector, the casts between it and the UNet, the UNet and the MSE — so the
#: dtype casts and copies around the UNet fuse into the graph instead of running as separate kernels.
COMPILE_SCOPES = ("unet", "step")


_cache_setting: dict[str, bool] = {}  # the compile cache switch as it was before a backend was forced


def set_attention_backend(name: str) -> None:
    """Allow only ``name``'s SDPA kernel (process-wide: every attention of the run, forward and backward)."""
    if name not in ATTENTION_BACKENDS:
        raise EllaError(f"--attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "auto":
        return
    # torch.compile picks the kernel while tracing, but its compiled-graph cache is not keyed on these switches:
    # a graph traced under another backend (an earlier run, or row) would be served from it. Trace afresh.
    import torch._functorch.config as functorch_config

    _cache_setting.setdefault("autograd", functorch_config.enable_autograd_cache)
    functorch_config.enable_autograd_cache = False
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(name == "flash")
    cuda.enable_cudnn_sdp(name == "cudnn")
    cuda.enable_mem_efficient_sdp(name == "efficient")
    cuda.enable_math_sdp(name == "math")


def reset_attention_backend() -> None:
    """Every kernel allowed again (torch's default), so one process can measure several backends in turn."""
    import torch._functorch.config as functorch_config

    functorch_config.enable_autograd_cache = _cache_setting.pop("autograd", functorch_config.enable_autograd_cache)
    cuda = torch.backends.cuda
    for enable in (cuda.enable_flash_sdp, cuda.enable_cudnn_sdp, cuda.enable_mem_efficient_sdp, cuda.enable_math_sdp):
        enable(True)


def check_fp8(device: torch.device) -> None:
    """fp8 matmuls need torchao and a GPU with fp8 tensor cores (compute capability 8.9: Ada, Hopper and newer)."""
    if importlib.util.find_spec("torchao") is None:
        raise EllaError("--fp8_unet needs torchao, which is not installed: pip install torchao")
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        what = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise EllaError(f"--fp8_unet needs a GPU with fp8 tensor cores (Ada/Hopper or newer); this run has {what}")


def _worth_fp8(module: torch.nn.Module, fqn: str) -> bool:
    """torchao's own rule for tensorwise scaling: both dims multiples of 16 (the hardware's), and not a small
    matmul (there the casts to fp8 cost more than the faster matmul saves)."""
    if not isinstance(module, torch.nn.Linear) or module.weight.requires_grad or "lora_" in fqn:
        return False  # a LoRA's own layers learn: they stay in full precision
    out_features, in_features = module.weight.shape
    if in_features % 16 or out_features % 16:
        return False
    return not (in_features <= 4096 and out_features <= 1024)


def fp8_unet(unet: torch.nn.Module, recipe: str = "tensorwise") -> list[str]:
    """The frozen UNet's large linear layers run their matmuls in fp8 (torchao float8 training, dynamic scaling).

    The weights stay bf16 and frozen (torchao casts them per step); the input gradient the connector needs is
    computed in fp8 too. Convolutions and attention stay bf16. Returns the converted layers' names.
    Compile the step afterwards: eager float8 casts are separate kernels and slower than plain bf16.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    converted: list[str] = []

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        if _worth_fp8(module, fqn):
            converted.append(fqn)
            return True
        return False

    convert_to_float8_training(unet, module_filter_fn=keep, config=Float8LinearConfig.from_recipe_name(recipe))
    return converted


def resolve_compile(requested: bool | None, device: torch.device | str) -> bool:
    """Whether a run compiles: ``None`` (the default) compiles on a GPU, where the compiled step is the fastest
    setting that keeps the eager step's gradients (benchmarks/RESULTS.md), and stays eager elsewhere without a
    word; ``False`` never compiles; ``True`` compiles anywhere but on a CPU, where it warns and runs eagerly:
    it is slower there, and inductor's C++ kernels miscompile SD's UNet backward (torch 2.13: the input gradient
    through a ResnetBlock2D followed by an Upsample2D comes out as zeros, so a connector would train on part of
    its gradient; reproduced by tests/test_train_speed.py, fixed by disabling kernel fusion)."""
    if requested is None:
        return torch.device(device).type == "cuda"
    if requested and torch.device(device).type == "cpu":
        warnings.warn(
            "--torch_compile is ignored on a CPU: it is slower there, and inductor's CPU kernels give wrong "
            "gradients through SD's UNet (zeros after an upsampler); training runs eagerly",
            stacklevel=2,
        )
        return False
    return requested


def compiled(fn: Callable, mode: str = "default") -> Callable:
    """``torch.compile`` with static shapes (dynamic ones crashed inductor's GroupNorm backward on a small UNet;
    the loader drops an epoch's short last batch so nothing recompiles)."""
    if mode not in COMPILE_MODES:
        raise EllaError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode)
