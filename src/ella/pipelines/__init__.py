"""diffusers pipelines with ELLA conditioning; all share :class:`~ella.pipelines.base.EllaMixin`."""

from .base import EllaMixin
from .stable_diffusion import EllaStableDiffusionPipeline

__all__ = ["EllaMixin", "EllaStableDiffusionPipeline"]
