"""ELLA for Stable Diffusion 1.x/2.x-style UNets: diffusers' ``StableDiffusionPipeline`` + the mixin."""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from ..text import DEFAULT_MAX_LENGTH
from .base import ELLA_COMPONENTS, EllaMixin


class EllaStableDiffusionPipeline(EllaMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` whose text condition comes from an LLM through an ELLA connector.

    ``pipe.unet`` is the real ``UNet2DConditionModel``: ``load_lora_weights``, ``load_ip_adapter``,
    ``fuse_lora``, attention processors and ``torch.compile`` work as in diffusers. The CLIP
    ``text_encoder``/``tokenizer`` are optional (ELLA does not use them for its own condition).

    Build it with :func:`ella.load_pipeline`, or with diffusers' loaders, passing the extra parts::

        pipe = EllaStableDiffusionPipeline.from_pretrained(
            "stable-diffusion-v1-5/stable-diffusion-v1-5", connector=connector, llm=t5, llm_tokenizer=tok,
            text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None)

    ``save_pretrained`` writes all of it (``model_index.json`` names ``ella`` as the connector's
    library), and ``from_pretrained`` of that directory restores it.
    """

    _optional_components = StableDiffusionPipeline._optional_components + ["text_encoder", "tokenizer"] + ELLA_COMPONENTS

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
        connector=None,
        llm=None,
        llm_tokenizer=None,
        llm_max_length: int = DEFAULT_MAX_LENGTH,
        llm_flexible: bool = False,
        llm_hidden_layer: int | None = None,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
            requires_safety_checker,
        )
        self._register_ella(connector, llm, llm_tokenizer, llm_max_length, llm_flexible, llm_hidden_layer)
