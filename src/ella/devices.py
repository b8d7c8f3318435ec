"""Where the models run and in which precision, decided in one place for every command."""

from __future__ import annotations

import torch

from .errors import EllaError

DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """fp16 on CUDA (what the release ran), fp32 elsewhere (CPU half precision is slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise EllaError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str | None) -> str:
    """``device`` (or the default) if this machine has it; one clear error for ``gpu9``, ``cuda:7`` on one GPU ...

    Checked before any model loads, so a typo costs nothing."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise EllaError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise EllaError(f"device {device!r}: this machine has no usable CUDA GPU; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise EllaError(f"device {device!r}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise EllaError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise EllaError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return str(device)


def compute_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its parameters' device, or, under accelerate's offload hooks, their execution device.

    With ``enable_sequential_cpu_offload`` the weights wait on the CPU or as ``meta`` tensors and are moved in
    only for the forward, so a module's parameters no longer say where its inputs must go.
    """
    if hasattr(module, "_hf_hook"):
        for m in module.modules():
            device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
            if device is not None:
                return torch.device(device)
    return next(module.parameters()).device
