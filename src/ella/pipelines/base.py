"""What every ELLA pipeline shares: LLM encoding, the condition table, and the UNet feed.

A pipeline class is ``class EllaX(EllaMixin, diffusers.X)``: the mixin overrides ``encode_prompt``
(LLM + connector instead of CLIP) and wraps ``__call__`` so the UNet (and ControlNet) receive the
per-timestep condition; the diffusers loop, schedulers, LoRA/IP-Adapter loaders, callbacks and
``output_type`` handling are the parent's, unchanged.
"""

from __future__ import annotations

import warnings

import torch

from ..conditioning import ConditionTable, feed_conditions, placeholder_embeds
from ..errors import EllaError
from ..text import TextFeatures, encode_text

# bf16 holds integers exactly only up to 256: the placeholder row ids must survive the loop's dtype.
_MAX_ROWS = {torch.bfloat16: 256, torch.float16: 2048}

ELLA_COMPONENTS = ["connector", "llm", "llm_tokenizer"]


class EllaMixin:
    """Turns a diffusers text-to-image pipeline into an ELLA one (see module docstring)."""

    _ella_table: ConditionTable | None = None
    _warned_feature_dtype = False

    def _register_ella(self, connector, llm, llm_tokenizer, llm_max_length, llm_flexible, llm_hidden_layer):
        self.register_modules(connector=connector, llm=llm, llm_tokenizer=llm_tokenizer)
        self.register_to_config(
            llm_max_length=llm_max_length, llm_flexible=llm_flexible, llm_hidden_layer=llm_hidden_layer
        )
        self.check_compatible()

    def check_compatible(self) -> None:
        """Refuse mismatched parts up front (not as a matmul error at the first denoising step)."""
        connector, unet, llm = self.connector, getattr(self, "unet", None), self.llm
        if connector is None:
            return
        width = connector.config.width
        if unet is not None and width != unet.config.cross_attention_dim:
            raise EllaError(
                f"connector width {width} does not match the UNet's cross_attention_dim "
                f"{unet.config.cross_attention_dim}: these ELLA weights were made for another base model"
            )
        hidden = getattr(getattr(llm, "config", None), "hidden_size", None)
        if hidden is not None and self.config.llm_hidden_layer is None and hidden != connector.config.input_dim:
            raise EllaError(
                f"the LLM's hidden size {hidden} does not match the connector's input_dim "
                f"{connector.config.input_dim}: use the LLM these ELLA weights were trained with"
            )

    def encode_text(self, prompts: list[str]) -> TextFeatures:
        """LLM features for ``prompts`` with the pipeline's length policy (``llm_max_length``/``llm_flexible``)."""
        if self.llm is None or self.llm_tokenizer is None or self.connector is None:
            raise EllaError("this pipeline has no connector/llm/llm_tokenizer; load it with ella.load_pipeline(...)")
        trained = getattr(self.connector.config, "text_feature_dtype", None)
        if trained and str(self.llm.dtype) != f"torch.{trained}" and not self._warned_feature_dtype:
            self._warned_feature_dtype = True
            warnings.warn(
                f"these ELLA weights were trained on {trained} LLM features, but the LLM runs in "
                f"{str(self.llm.dtype).replace('torch.', '')}; images will differ slightly from the official ones "
                f"(use --dtype float16 on a GPU to match)",
                stacklevel=3,
            )
        return encode_text(
            self.llm,
            self.llm_tokenizer,
            prompts,
            max_length=self.config.llm_max_length,
            flexible=self.config.llm_flexible,
            hidden_layer=self.config.llm_hidden_layer,
        )

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        lora_scale=None,
        clip_skip=None,
        **kwargs,
    ):
        """LLM-encode positive and negative prompts into a condition table; return row placeholders.

        The negative prompt defaults to ``""`` (the release's unconditional branch: the LLM
        features of the empty string). Identical strings share one table row.
        """
        if prompt_embeds is not None or negative_prompt_embeds is not None:
            raise EllaError(
                "ELLA pipelines take text (`prompt`, `negative_prompt`), not CLIP `prompt_embeds`: "
                "the LLM and connector compute the condition"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise EllaError(f"prompt {i} is empty: describe the image (the empty prompt is the negative branch)")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise EllaError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one or one each")

        texts = prompts + (negatives if do_classifier_free_guidance else [])
        unique = list(dict.fromkeys(texts))
        dtype = self.connector.dtype
        if len(unique) > _MAX_ROWS.get(dtype, 1 << 24):
            raise EllaError(f"at most {_MAX_ROWS[dtype]} distinct prompts per call in {dtype}; split the batch")
        self._ella_table = ConditionTable(
            self.connector, self.encode_text(unique), timesteps=lambda: self.scheduler.timesteps
        )
        row = {text: i for i, text in enumerate(unique)}

        def embeds(strings):
            rows = torch.tensor([row[s] for s in strings]).repeat_interleave(num_images_per_prompt)
            return placeholder_embeds(rows, device).to(dtype)

        return embeds(prompts), (embeds(negatives) if do_classifier_free_guidance else None)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """The parent pipeline's ``__call__`` — same arguments and outputs — with ELLA conditioning.

        Per call: the LLM runs once per distinct prompt; the connector runs once, batched, for
        all scheduler timesteps and all prompts (positive and negative); each UNet/ControlNet
        call gets the condition of its own timestep.
        """
        modules = [self.unet, getattr(self, "controlnet", None)]
        try:
            with feed_conditions(modules, lambda: self._ella_table):
                return super().__call__(*args, **kwargs)
        finally:
            self._ella_table = None
