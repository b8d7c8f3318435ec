"""Scheduler names users type (``dpm++``, ``euler_a`` …) and the diffusers classes they mean.

Any scheduler is built on the base model's own scheduler config (betas, timestep spacing,
prediction type), so swapping one never changes what the base was trained with.
"""

from __future__ import annotations

from .errors import EllaError

SCHEDULER_ALIASES = {
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def scheduler_class(name: str) -> tuple[type, dict]:
    """``(diffusers scheduler class, config overrides)`` for an alias (``dpm++``, ``euler_a`` ...) or class name."""
    import diffusers  # heavy: the CLI imports this module to list the aliases in --help

    cls_name, extra = SCHEDULER_ALIASES.get(name, (name, {}))
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise EllaError(
            f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULER_ALIASES)} or a diffusers class name "
            "such as EulerDiscreteScheduler"
        )
    return cls, extra


def make_scheduler(name: str, base_config):
    """The named scheduler on the base model's scheduler config (betas, timestep spacing ...)."""
    cls, extra = scheduler_class(name)
    return cls.from_config(base_config, **extra)
