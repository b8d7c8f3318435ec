"""The frozen models a training run needs, and a connector sized to fit between them.

Sizes are read from config files *before* any weights load, so a mismatch (an LLM whose hidden
size is not the connector's input, a connector narrower than the UNet's cross-attention) costs a
second, not the minutes it takes to load flan-t5-xl and a UNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ..connector import TimestepAwareSemanticConnector
from ..errors import EllaError
from ..hub import check_offline, loading
from ..llm import load_llm
from ..loading import load_connector
from .config import TrainConfig


@dataclass
class Dims:
    """What the connector must fit: LLM hidden size in, UNet cross-attention width (and SDXL pooled size) out."""

    llm_hidden: int
    cross_attention_dim: int
    pooled_dim: int | None  # SDXL-style UNets ("text_time" added conditioning) need a pooled embedding
    unet_config: dict

    @property
    def sdxl_style(self) -> bool:
        return self.pooled_dim is not None


def read_dims(cfg: TrainConfig, cached_llm_hidden: int | None) -> Dims:
    """Config files only; ``cached_llm_hidden`` comes from an ``ella cache`` index that holds features."""
    needed = [("base model", cfg.pretrained_model_name_or_path, "unet/config.json")]
    if cached_llm_hidden is None:
        needed.append(("LLM", cfg.llm_name_or_path, "config.json"))
    check_offline(needed, flags={"base model": "--pretrained_model_name_or_path DIR", "LLM": "--llm_name_or_path DIR"})
    with loading("base model", cfg.pretrained_model_name_or_path):
        unet_config = dict(UNet2DConditionModel.load_config(cfg.pretrained_model_name_or_path, subfolder="unet"))
    cross = unet_config["cross_attention_dim"]
    if not isinstance(cross, int):
        raise EllaError(f"UNet cross_attention_dim {cross!r} varies per block; ELLA needs one width for all blocks")
    pooled = None
    if unet_config.get("addition_embed_type") == "text_time":
        pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    if cached_llm_hidden is not None:
        hidden = cached_llm_hidden
    else:
        with loading("LLM", cfg.llm_name_or_path):
            llm_config = transformers.AutoConfig.from_pretrained(cfg.llm_name_or_path)
        hidden = getattr(llm_config, "d_model", None) or llm_config.hidden_size
        hidden *= len(cfg.llm_layers or [None])  # several layers' states side by side
    return Dims(hidden, cross, pooled, unet_config)


def make_connector(cfg: TrainConfig, dims: Dims) -> TimestepAwareSemanticConnector:
    """A fresh connector (release architecture by default) or ``--init_connector`` weights, checked against dims."""
    if cfg.init_connector:
        connector = load_connector(cfg.init_connector, torch_dtype=torch.float32)
    else:
        width = dims.cross_attention_dim
        if width % cfg.connector_heads:
            raise EllaError(
                f"the UNet's cross_attention_dim {width} is not divisible by --connector_heads "
                f"{cfg.connector_heads}; pick a head count that divides it"
            )
        connector = TimestepAwareSemanticConnector(
            width=width,
            layers=cfg.connector_layers,
            heads=cfg.connector_heads,
            num_latents=cfg.connector_num_latents,
            input_dim=dims.llm_hidden,
            time_embed_dim=width,  # release: time_embed_dim == width (768)
            variant=cfg.connector_variant,
            pooled_dim=dims.pooled_dim,
            llm_layers=list(cfg.llm_layers) if cfg.llm_layers else None,
        )
    got = connector.config
    if got.input_dim != dims.llm_hidden:
        raise EllaError(
            f"connector input_dim {got.input_dim} != LLM hidden size {dims.llm_hidden} "
            f"({cfg.llm_name_or_path}); use the LLM the connector was trained on, or start fresh"
        )
    if got.width != dims.cross_attention_dim:
        raise EllaError(
            f"connector width {got.width} != UNet cross_attention_dim {dims.cross_attention_dim} "
            f"({cfg.pretrained_model_name_or_path}); this connector was made for another UNet"
        )
    if got.pooled_dim != dims.pooled_dim:
        raise EllaError(
            f"connector pooled_dim {got.pooled_dim} but the UNet needs {dims.pooled_dim} "
            "(SDXL-style UNets need a pooling head, SD1.5-style ones none)"
        )
    return connector


def load_frozen(cfg: TrainConfig, weight_dtype: torch.dtype, device, *, need_vae: bool, need_llm: bool):
    """``(unet, vae | None, llm | None, tokenizer | None, noise_scheduler)``, frozen, in ``weight_dtype``.

    Frozen weights never get ``.grad``: the loss still back-propagates *through* the UNet to the
    connector's output (input gradients only), which is all the connector needs.
    """
    base = cfg.pretrained_model_name_or_path
    with loading("base model", base):
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=weight_dtype)
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        vae = None
        if need_vae:
            vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
            # SDXL's VAE overflows in fp16 (config.force_upcast); bf16 has fp32's range and is fine.
            keep_fp32 = weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
            vae = vae.to(device, torch.float32 if keep_fp32 else weight_dtype).requires_grad_(False).eval()
    if cfg.prediction_type:
        scheduler.register_to_config(prediction_type=cfg.prediction_type)
    unet = unet.to(device).requires_grad_(False).eval()
    llm = tokenizer = None
    if need_llm:
        llm, tokenizer = load_llm(cfg.llm_name_or_path, dtype=weight_dtype, device=device)
    return unet, vae, llm, tokenizer, scheduler


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> what the UNet is trained on: ``(mode - shift_factor) * scaling_factor``, fp32.

    The one definition shared by ``ella cache`` and online training, so cached and online latents agree;
    the posterior's mode (not a sample) keeps both deterministic.
    """
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return (z.float() - shift) * vae.config.scaling_factor


#: The UNet modules a LoRA trains: every attention projection (self and cross), as diffusers' LoRA scripts do.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_unet_lora(unet, rank: int, alpha: float | None) -> list[torch.nn.Parameter]:
    """A peft LoRA on the frozen UNet; returns its parameters, in fp32 (the base weights stay in their dtype).

    Gaussian init of A with B = 0 (peft's default): the LoRA starts as the identity, so step 0 is the frozen
    UNet under ELLA exactly.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    unet.add_adapter(config)
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def load_clip(cfg: TrainConfig, dims: Dims, weight_dtype: torch.dtype, device):
    """``(text_encoder, tokenizer)`` of the base, frozen, for ``--condition_mode ella+clip`` (SD1.5-style UNets:
    one CLIP whose width is the UNet's cross-attention width)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if dims.sdxl_style:
        raise EllaError(
            "--condition_mode ella+clip trains SD1.5-style UNets (one CLIP); SDXL's two-CLIP layout is not supported "
            "in training yet: train in ella mode"
        )
    base = cfg.pretrained_model_name_or_path
    with loading("base model's CLIP", base):
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=weight_dtype)
    if encoder.config.hidden_size != dims.cross_attention_dim:
        raise EllaError(
            f"the base's CLIP is {encoder.config.hidden_size}-d but its UNet attends to {dims.cross_attention_dim}-d"
        )
    return encoder.to(device).requires_grad_(False).eval(), tokenizer
