"""ELLA for Stable Diffusion 1.x/2.x-style UNets: each diffusers SD pipeline + the mixin, one definition each.

``pipe.unet`` is the real ``UNet2DConditionModel``: ``load_lora_weights``, ``load_ip_adapter``,
``load_textual_inversion``, ``fuse_lora``, attention processors and ``torch.compile`` work as in
diffusers, and a ControlNet receives the same per-timestep condition as the UNet. The CLIP
``text_encoder``/``tokenizer`` are optional: ELLA does not use them, except in ``ella+clip`` mode.

Build one with :func:`ella.load_pipeline` (``kind=`` picks the class), or with diffusers' loaders,
passing the extra parts::

    pipe = EllaStableDiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", connector=connector, llm=t5, llm_tokenizer=tok,
        text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None)

``save_pretrained`` writes all of it (``model_index.json`` names ``ella`` as the connector's
library), and ``from_pretrained`` of that directory restores it.

:class:`~ella.pipelines.memory.EllaOffloadMixin` makes diffusers' CPU offload (``enable_model_cpu_offload``,
``enable_sequential_cpu_offload``) move the LLM and the connector too; see
:func:`ella.pipelines.memory.enable_low_vram`.
"""

from __future__ import annotations

from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from .base import EllaMixin
from .memory import EllaOffloadMixin


class EllaStableDiffusionPipeline(EllaMixin, EllaOffloadMixin, StableDiffusionPipeline):
    """Text-to-image: ``StableDiffusionPipeline`` whose text condition comes from an LLM through an ELLA connector."""


class EllaStableDiffusionImg2ImgPipeline(EllaMixin, EllaOffloadMixin, StableDiffusionImg2ImgPipeline):
    """Image-to-image (``image``, ``strength``): the loop starts part-way down the schedule, and every step still
    gets its own timestep's condition."""


class EllaStableDiffusionInpaintPipeline(EllaMixin, EllaOffloadMixin, StableDiffusionInpaintPipeline):
    """Inpainting (``image``, ``mask_image``, ``strength``), with 9-channel inpainting UNets or plain 4-channel ones."""


class EllaStableDiffusionControlNetPipeline(EllaMixin, EllaOffloadMixin, StableDiffusionControlNetPipeline):
    """ControlNet (``image`` = the control image; one ControlNet or a list): the ControlNet receives the same
    per-timestep ELLA condition as the UNet (the official wrapper handed it raw T5 features)."""


class EllaStableDiffusionControlNetImg2ImgPipeline(
    EllaMixin, EllaOffloadMixin, StableDiffusionControlNetImg2ImgPipeline
):
    """ControlNet + image-to-image (``image``, ``control_image``, ``strength``)."""
