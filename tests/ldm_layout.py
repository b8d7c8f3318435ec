"""Write a diffusers SD 1.x directory as one original-LDM (CompVis) checkpoint, the layout civitai files use.

Test helper only. It inverts diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``
and ``convert_ldm_clip_checkpoint``; block indices come from the saved configs, so the tiny models
(fewer blocks and layers than SD 1.5) map exactly like the real one:

* UNet ``down_blocks.b.resnets.l`` -> ``model.diffusion_model.input_blocks.{1 + b*(L+1) + l}.0``,
  its attention -> ``... .1``, its downsampler -> ``input_blocks.{1 + b*(L+1) + L}.0.op``;
  ``up_blocks.b`` (L+1 layers) -> ``output_blocks.{b*(L+1) + l}``, the upsampler after the last
  layer's resnet (``.1.conv``) or attention (``.2.conv``); ``mid_block`` -> ``middle_block.{0,1,2}``.
* VAE -> ``first_stage_model.*``: ``down_blocks.i`` -> ``down.i``, ``up_blocks.i`` -> ``up.{n-1-i}``
  (LDM counts decoder blocks from the bottom), mid attention as 1x1 convs (``q``/``k``/``v``/``proj_out``).
* CLIP text encoder -> ``cond_stage_model.transformer.text_model.*``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """``"conv1.weight"`` -> ``"in_layers.2.weight"``: rename the module part of ``module.param``."""
    module, _, param = rest.rpartition(".")
    return f"{table.get(module, module)}.{param}"


def unet_key(key: str, config: dict) -> str:
    layers = config["layers_per_block"]
    assert isinstance(layers, int), "per-block layer counts are not an SD 1.x UNet"
    module, _, param = key.rpartition(".")
    if module in UNET_FIXED:
        return f"{UNET_FIXED[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + b * (layers + 1) + i
        return f"input_blocks.{index}." + (f"0.{_rename_head(rest, UNET_RESNET)}" if kind == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + layers}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = b * (layers + 1) + i
        return f"output_blocks.{index}." + (
            f"0.{_rename_head(rest, UNET_RESNET)}" if kind == "resnets" else f"1.{rest}"
        )
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1  # after the attention, if there is one
        return f"output_blocks.{b * (layers + 1) + layers}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key!r} (not an SD 1.x UNet?)")


def vae_key(key: str, config: dict) -> str:
    n_up = len(config["up_block_types"])
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        block = n_up - 1 - int(m[1])
        return f"decoder.up.{block}.block.{m[2]}.{_rename_head(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_head(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename_head(m[2], VAE_ATTENTION)}"
    return key.replace("conv_norm_out", "norm_out")  # conv_in/out, quant convs keep their names


def clip_key(key: str) -> str:
    """transformers >= 5.6 saves ``CLIPTextModel`` flat (``embeddings.*``); LDM files always have ``text_model.``."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, f"expected one .safetensors in {folder}, found {files}"
    return load_file(str(files[0]))


def ldm_state_dict(diffusers_dir: Path) -> dict[str, torch.Tensor]:
    """The LDM-layout state dict of a diffusers SD 1.x directory (UNet, VAE and, if present, CLIP)."""
    diffusers_dir = Path(diffusers_dir)
    out: dict[str, torch.Tensor] = {}
    unet_config = json.loads((diffusers_dir / "unet" / "config.json").read_text())
    for key, tensor in _weights(diffusers_dir / "unet").items():
        out[UNET_PREFIX + unet_key(key, unet_config)] = tensor
    vae_config = json.loads((diffusers_dir / "vae" / "config.json").read_text())
    for key, tensor in _weights(diffusers_dir / "vae").items():
        new = vae_key(key, vae_config)
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[VAE_PREFIX + new] = tensor
    if (diffusers_dir / "text_encoder").is_dir():
        for key, tensor in _weights(diffusers_dir / "text_encoder").items():
            out[CLIP_PREFIX + clip_key(key)] = tensor
    return out


def write_ldm_checkpoint(diffusers_dir: Path, out_file: Path) -> Path:
    """Convert ``diffusers_dir`` (SD 1.x: unet/, vae/, text_encoder/) to one LDM ``.safetensors`` at ``out_file``."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in ldm_state_dict(diffusers_dir).items()}
    save_file(tensors, str(out_file))
    return out_file
