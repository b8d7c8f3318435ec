"""diffusers pipelines with ELLA conditioning; all share :class:`~ella.pipelines.base.EllaMixin`."""

from .base import CONDITION_MODES, EllaMixin, check_mode
from .stable_diffusion import (
    EllaStableDiffusionControlNetImg2ImgPipeline,
    EllaStableDiffusionControlNetPipeline,
    EllaStableDiffusionImg2ImgPipeline,
    EllaStableDiffusionInpaintPipeline,
    EllaStableDiffusionPipeline,
)
from .stable_diffusion_xl import (
    EllaStableDiffusionXLControlNetPipeline,
    EllaStableDiffusionXLImg2ImgPipeline,
    EllaStableDiffusionXLInpaintPipeline,
    EllaStableDiffusionXLPipeline,
    EllaXLMixin,
)

#: ``ella.load_pipeline(kind=...)`` / ``ella generate`` (which picks the kind from its input flags)
PIPELINE_KINDS = {
    "txt2img": EllaStableDiffusionPipeline,
    "img2img": EllaStableDiffusionImg2ImgPipeline,
    "inpaint": EllaStableDiffusionInpaintPipeline,
    "controlnet": EllaStableDiffusionControlNetPipeline,
    "controlnet-img2img": EllaStableDiffusionControlNetImg2ImgPipeline,
}
PIPELINE_KINDS_XL = {
    "txt2img": EllaStableDiffusionXLPipeline,
    "img2img": EllaStableDiffusionXLImg2ImgPipeline,
    "inpaint": EllaStableDiffusionXLInpaintPipeline,
    "controlnet": EllaStableDiffusionXLControlNetPipeline,
}

__all__ = [
    "CONDITION_MODES",
    "PIPELINE_KINDS",
    "PIPELINE_KINDS_XL",
    "EllaMixin",
    "EllaStableDiffusionControlNetImg2ImgPipeline",
    "EllaStableDiffusionControlNetPipeline",
    "EllaStableDiffusionImg2ImgPipeline",
    "EllaStableDiffusionInpaintPipeline",
    "EllaStableDiffusionPipeline",
    "EllaStableDiffusionXLControlNetPipeline",
    "EllaStableDiffusionXLImg2ImgPipeline",
    "EllaStableDiffusionXLInpaintPipeline",
    "EllaStableDiffusionXLPipeline",
    "EllaXLMixin",
    "check_mode",
]
