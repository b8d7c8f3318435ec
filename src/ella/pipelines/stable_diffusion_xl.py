"""ELLA for SDXL-style UNets (two CLIPs, a pooled text embedding, ``text_time`` added conditioning).

A connector trained for such a UNet with ``ella train`` (2048-d tokens, ``pooled_dim`` head) gives
the UNet both parts of its text condition at every timestep: the tokens, and the pooling head's
embedding of those same tokens as ``added_cond_kwargs["text_embeds"]`` — exactly what it was
trained with (``ella.train.train.diffusion_loss``). ``time_ids`` (original size, crop, target) are
diffusers' own.

In ``ella+clip`` mode the UNet also gets the two CLIPs' 77 tokens (768 + 1280 = 2048-d, encoded as
diffusers' SDXL pipeline does, so LoRA trigger words and textual inversions work; ``prompt_2`` is the
second CLIP's text); the pooled embedding still comes from the connector when it has a pooling head,
else from CLIP (``text_encoder_2``'s projection, what SDXL was trained with; with prompt editing, of
the text active at the first step). Without a pooling head, ``ella`` mode has no pooled
embedding to give and says so.
"""

from __future__ import annotations

import torch
from diffusers import (
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from ..conditioning import placeholder_rows
from ..errors import EllaError
from .base import EllaMixin
from .memory import EllaOffloadMixin


class EllaXLMixin(EllaMixin):
    """SDXL's ``encode_prompt`` contract (tokens + pooled, positive + negative) on top of :class:`EllaMixin`."""

    _clip_pooled: torch.Tensor | None = None

    def _pooled_from_connector(self) -> bool:
        return getattr(self.connector.config, "pooled_dim", None) is not None

    def encode_prompt(
        self,
        prompt,
        prompt_2=None,
        device=None,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        lora_scale=None,
        clip_skip=None,
    ):
        # prompt_2 / negative_prompt_2: read from the call's options by EllaMixin (the second CLIP's text in
        # ella+clip mode; refused in ella mode, where no CLIP runs)
        if pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise EllaError("ELLA pipelines compute the pooled embedding; pass text, not pooled_prompt_embeds")
        self._clip_pooled = None
        positive, negative = EllaMixin.encode_prompt(
            self,
            prompt,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        return positive, negative, self._pooled_for(positive), self._pooled_for(negative)

    def _pooled_for(self, placeholder: torch.Tensor | None) -> torch.Tensor | None:
        """Per sample: the row id spread over ``pooled_dim`` (swapped for the connector's per-timestep pooled
        embedding at each UNet call), or CLIP's pooled embedding of the sample's text."""
        if placeholder is None:
            return None
        if self._pooled_from_connector():
            return placeholder.view(-1, 1).expand(-1, self.connector.config.pooled_dim).contiguous()
        if self._clip_pooled is None:
            raise EllaError(
                "this connector has no pooling head, and an SDXL UNet needs a pooled text embedding: "
                "use condition_mode='ella+clip' (CLIP's pooled embedding) or a connector trained "
                "with pooled_dim"
            )
        rows = self._ella_plan.first_clip_rows()[placeholder_rows(placeholder).cpu()]
        return self._clip_pooled[rows.to(self._clip_pooled.device)].to(placeholder.dtype)


class EllaStableDiffusionXLPipeline(EllaXLMixin, EllaOffloadMixin, StableDiffusionXLPipeline):
    """SDXL text-to-image with an ELLA connector (tokens + pooled head, per timestep)."""


class EllaStableDiffusionXLImg2ImgPipeline(EllaXLMixin, EllaOffloadMixin, StableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image (``image``, ``strength``) with an ELLA connector."""


class EllaStableDiffusionXLInpaintPipeline(EllaXLMixin, EllaOffloadMixin, StableDiffusionXLInpaintPipeline):
    """SDXL inpainting (``image``, ``mask_image``) with an ELLA connector."""


class EllaStableDiffusionXLControlNetPipeline(EllaXLMixin, EllaOffloadMixin, StableDiffusionXLControlNetPipeline):
    """SDXL + ControlNet: the ControlNet gets the same per-timestep tokens and pooled embedding as the UNet."""
