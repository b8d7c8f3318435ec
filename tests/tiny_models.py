"""Tiny, randomly initialised stand-ins for the real ELLA dependencies.

The builders here write *real on-disk layouts* (the same files and folders as
``runwayml/stable-diffusion-v1-5`` and ``google/flan-t5-xl``) filled with tiny
random weights and tiny hand-built tokenizers.  Tests can then point the
project's ordinary ``from_pretrained`` loading code at these directories, so
the real loading path is exercised without any hub access and without
downloading weights.

Everything is deterministic: the same ``seed`` gives byte-identical weight
files, and building never touches the global torch RNG state of the caller.

Summary of what is built (see the builders' docstrings for details):

* ``build_tiny_sd15``: SD-1.5-layout ``StableDiffusionPipeline`` directory.
  ``cross_attention_dim`` (= CLIP hidden size) is ``TINY_SD15_CROSS_ATTENTION_DIM``
  (32), the VAE scale factor is 8 exactly as in SD 1.5, the UNet
  ``sample_size`` is 8 (default image size 64x64), and any height/width that
  is a multiple of 8 works (e.g. 32, 40, 64).
* ``build_tiny_sdxl``: SDXL-base-1.0-layout ``StableDiffusionXLPipeline``
  directory (two CLIP text encoders, ``text_time`` added conditioning).
  ``cross_attention_dim`` is ``TINY_SDXL_CROSS_ATTENTION_DIM`` (48 = 16 + 32,
  the two encoders' hidden sizes concatenated), the pooled text embedding
  (``text_encoder_2``'s ``projection_dim``) is ``TINY_SDXL_POOLED_DIM`` (16),
  ``addition_time_embed_dim`` is ``TINY_SDXL_TIME_EMBED_DIM`` (8); VAE scale
  factor 8 and default image size 64x64 as for the tiny SD 1.5.
* ``build_tiny_t5``: flan-T5-layout directory loadable with
  ``T5EncoderModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``;
  hidden size ``d_model`` (16 by default).

Run ``python tests/tiny_models.py OUT_DIR`` to build all three into
``OUT_DIR/sd15``, ``OUT_DIR/sdxl`` and ``OUT_DIR/flan-t5``.
"""

from __future__ import annotations

import functools
import heapq
import json
import sys
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TINY_CLIP_MAX_LENGTH",
    "TINY_SD15_CROSS_ATTENTION_DIM",
    "TINY_SD15_SAMPLE_SIZE",
    "TINY_SD15_VAE_SCALE_FACTOR",
    "TINY_SDXL_CROSS_ATTENTION_DIM",
    "TINY_SDXL_POOLED_DIM",
    "TINY_SDXL_TIME_EMBED_DIM",
    "build_tiny_clip_tokenizer",
    "build_tiny_sd15",
    "build_tiny_sdxl",
    "build_tiny_t5",
    "build_tiny_t5_tokenizer",
]

#: CLIP text hidden size == UNet ``cross_attention_dim`` of the tiny SD 1.5.
TINY_SD15_CROSS_ATTENTION_DIM = 32
#: ``2 ** (len(vae.block_out_channels) - 1)``; 8 like the real SD 1.5 VAE.
TINY_SD15_VAE_SCALE_FACTOR = 8
#: UNet ``sample_size`` (latent side); default image side = 8 * 8 = 64.
TINY_SD15_SAMPLE_SIZE = 8
#: CLIP ``model_max_length`` / ``max_position_embeddings``, as in SD 1.5.
TINY_CLIP_MAX_LENGTH = 77
#: Hidden sizes of the tiny SDXL ``text_encoder`` / ``text_encoder_2`` (768 / 1280 in SDXL).
_TINY_SDXL_TEXT_DIMS = (16, 32)
#: UNet ``cross_attention_dim`` of the tiny SDXL: both encoders' hidden states concatenated (2048 in SDXL).
TINY_SDXL_CROSS_ATTENTION_DIM = sum(_TINY_SDXL_TEXT_DIMS)
#: ``text_encoder_2.config.projection_dim`` == size of the pooled ``text_embeds`` (1280 in SDXL).
TINY_SDXL_POOLED_DIM = 16
#: UNet ``addition_time_embed_dim`` (256 in SDXL); 6 time ids are each embedded to this size.
TINY_SDXL_TIME_EMBED_DIM = 8

# Word list the tiny tokenizers are built from: typical text-to-image prompt
# vocabulary.  Words outside it still tokenize (CLIP: byte-level BPE pieces;
# T5: single-character pieces, or ``<unk>`` for characters not covered).
_CORPUS = """
a an the of and or with without in on at to from by for into onto over under
above below near next beside behind between inside outside around through
is are was were be being been has have had this that these those it its
there here very more most some many few one two three four five six seven
eight nine ten first second third left right top bottom front back middle
red orange yellow green blue purple pink brown black white gray grey gold
silver dark light bright pale colorful colourful vivid golden
cat cats dog dogs bird birds horse horses cow fish lion tiger bear wolf fox
rabbit mouse elephant monkey owl eagle duck chicken frog snake butterfly
man woman men women boy girl child children person people baby king queen
knight wizard robot astronaut soldier chef farmer doctor painter dancer
sitting standing running walking flying jumping sleeping eating drinking
reading writing playing holding wearing looking smiling swimming riding
table chair lamp sofa bed desk window door wall floor ceiling room house
kitchen bedroom garden street road city town village forest tree trees
flower flowers grass mountain mountains river lake ocean sea beach sky cloud
clouds sun moon star stars rain snow fog night day morning evening sunset
sunrise car bus train boat ship plane bicycle bike truck rocket castle
bridge tower building church temple park field farm desert island cave
book books cup mug bottle glass plate bowl apple banana orange cake bread
pizza coffee tea wine hat shirt dress coat shoes glasses umbrella bag ball
guitar piano clock phone computer camera painting picture photo photograph
portrait landscape style art artwork illustration drawing sketch render
realistic photorealistic detailed highly high quality resolution masterpiece
beautiful cute small large big tiny huge tall short long old young new
happy sad angry calm wooden metal stone glass plastic paper fluffy soft
hard wet dry hot cold warm cool shiny smooth rough cinematic lighting
dramatic studio soft sharp focus bokeh background foreground scene view
close closeup shot angle wide lens camera digital oil watercolor canvas
anime cartoon fantasy science fiction futuristic vintage retro modern
ancient medieval magical mysterious peaceful quiet busy crowded empty
trending artstation unreal engine octane 4k 8k hd
""".split()  # noqa: SIM905

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"


# --------------------------------------------------------------------------- #
# CLIP tokenizer (byte-level BPE, same files/format as openai/clip-vit-large)  #
# --------------------------------------------------------------------------- #
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable-unicode mapping (same order as CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _train_clip_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Tiny deterministic BPE trainer in CLIP's word representation.

    Each word is a sequence of byte-level symbols whose last symbol carries the
    ``</w>`` end-of-word suffix.  Merges are learned (most frequent pair first,
    ties broken lexicographically, so the result only depends on ``words``)
    until every word of ``words`` is a single symbol, i.e. each training word
    is one token.  Pair counts are updated incrementally (lazy max-heap), so
    this takes a few milliseconds.
    """
    b2u = _bytes_to_unicode()
    freqs = Counter("".join(b2u[b] for b in w.encode("utf-8")) for w in words)
    keys = sorted(freqs)
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in keys]
    wfreq = [freqs[w] for w in keys]
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(seqs):
        for pair in pairwise(syms):
            counts[pair] += wfreq[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        neg, best = heapq.heappop(heap)
        if -neg <= 0 or counts.get(best, 0) != -neg:
            continue  # stale heap entry
        merges.append(best)
        merged = best[0] + best[1]
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(best, ())):
            syms, f = seqs[i], wfreq[i]
            for pair in pairwise(syms):
                counts[pair] -= f
                touched.add(pair)
            out: list[str] = []
            j = 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == best[0] and syms[j + 1] == best[1]:
                    out.append(merged)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            for pair in pairwise(out):
                counts[pair] += f
                where[pair].add(i)
                touched.add(pair)
            seqs[i] = out
        counts.pop(best, None)
        for pair in sorted(touched):
            if counts.get(pair, 0) > 0:
                heapq.heappush(heap, (-counts[pair], pair))
    return merges


def build_tiny_clip_tokenizer(path: Path) -> Path:
    """Write a tiny CLIP tokenizer folder in the exact SD-1.5 ``tokenizer/`` layout.

    Files: ``vocab.json``, ``merges.txt`` (``#version: 0.2`` header),
    ``tokenizer_config.json`` and ``special_tokens_map.json`` -- the same four
    files the real ``runwayml/stable-diffusion-v1-5/tokenizer`` has, so
    ``CLIPTokenizer.from_pretrained`` goes through its real conversion path.
    The vocab follows CLIP's structure: 256 byte symbols, the same 256 with
    ``</w>``, the learned merges, then ``<|startoftext|>`` and
    ``<|endoftext|>`` as the two highest ids (so legacy "argmax = EOS"
    pooling in ``CLIPTextModel`` also works).  Byte-level symbols make every
    input string tokenizable.  ``model_max_length`` is 77 and the pad token is
    ``<|endoftext|>`` as in SD 1.5.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, text in _clip_tokenizer_files().items():
        (path / name).write_text(text, encoding="utf-8")
    return path


@functools.lru_cache(maxsize=1)
def _clip_tokenizer_files() -> dict[str, str]:
    """File name -> contents of the tiny CLIP tokenizer (computed once)."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    seen = set(vocab_list)
    merges = _train_clip_bpe(_CORPUS)
    for a, b in merges:
        if a + b not in seen:  # two merges may yield the same string
            seen.add(a + b)
            vocab_list.append(a + b)
    vocab_list += [_CLIP_BOS, _CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}

    def special(content: str) -> dict[str, object]:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special_map = {
        "bos_token": special(_CLIP_BOS),
        "eos_token": special(_CLIP_EOS),
        "pad_token": _CLIP_EOS,
        "unk_token": special(_CLIP_EOS),
    }
    config = {
        "add_prefix_space": False,
        "bos_token": special(_CLIP_BOS),
        "do_lower_case": True,
        "eos_token": special(_CLIP_EOS),
        "errors": "replace",
        "model_max_length": TINY_CLIP_MAX_LENGTH,
        "pad_token": _CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special(_CLIP_EOS),
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


# --------------------------------------------------------------------------- #
# Stable Diffusion 1.5                                                        #
# --------------------------------------------------------------------------- #
# The real SD 1.5 scheduler_config.json values (SDXL's file has these plus its own keys).
_SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "trained_betas": None,
}


def _restore_tokenizer_layout(tok_dir: Path, build) -> None:
    """Replace what transformers v5's ``save_pretrained`` wrote with the real four-file CLIP layout."""
    for f in tok_dir.iterdir():
        if f.is_file():
            f.unlink()
    build(tok_dir)


def _tiny_vae(scaling_factor: float, **extra):
    """4 blocks of 8 channels: ``vae_scale_factor == 8`` as in SD's VAE; SD1.5 and SDXL differ in scaling only."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_SD15_SAMPLE_SIZE * TINY_SD15_VAE_SCALE_FACTOR,
        scaling_factor=scaling_factor,
        **extra,
    )


def build_tiny_sd15(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion 1.5 pipeline to ``path`` and return it.

    Why: tests must exercise the real ``StableDiffusionPipeline.from_pretrained``
    (and ``UNet2DConditionModel.from_pretrained(path, subfolder="unet")`` etc.)
    loading path, with no hub access and no real weights.  The directory is
    written by ``StableDiffusionPipeline.save_pretrained(safe_serialization=True)``
    so it has SD 1.5's layout: ``model_index.json`` and ``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (no safety checker /
    feature extractor; ``requires_safety_checker=False``).

    Tiny configuration:

    * UNet: ``block_out_channels=(32, 64)``, one layer per block,
      ``CrossAttnDownBlock2D/DownBlock2D`` + ``UpBlock2D/CrossAttnUpBlock2D``,
      ``cross_attention_dim=32``, ``attention_head_dim=8``,
      ``norm_num_groups=8``, ``sample_size=8``, 4 in/out channels.
    * VAE: ``AutoencoderKL`` with 4 blocks of 8 channels
      (``norm_num_groups=4``), ``latent_channels=4`` and SD's
      ``scaling_factor=0.18215``, so ``vae_scale_factor == 8`` exactly as in
      SD 1.5.  Default image size is ``8 * 8 = 64``; any height/width that is
      a multiple of 8 works (the pipeline requires that anyway; the UNet
      handles odd latent sizes such as 5 for 40px).
    * Text encoder: ``CLIPTextModel`` with hidden size 32, 2 layers, 4 heads,
      intermediate size 37, 77 positions, ``quick_gelu``.
    * Tokenizer: tiny byte-level BPE ``CLIPTokenizer`` (see
      :func:`build_tiny_clip_tokenizer`), ``model_max_length=77``.
    * Scheduler: ``PNDMScheduler`` with SD 1.5's config values.

    Same ``seed`` => byte-identical safetensors files.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tok_dir = build_tiny_clip_tokenizer(path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_SD15_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_SD15_CROSS_ATTENTION_DIM,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(scaling_factor=0.18215)
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_SD15_CROSS_ATTENTION_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_CLIP_MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=TINY_SD15_CROSS_ATTENTION_DIM,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config).eval()

    # SD 1.5's scheduler_config.json values.  ``clip_sample`` is not a
    # PNDMScheduler.__init__ argument in diffusers 0.42 (passing it raises
    # TypeError), but the real config file carries it; ``from_config`` accepts
    # it and keeps it in the saved config, like the real file.
    scheduler = PNDMScheduler.from_config(_SD_SCHEDULER)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # transformers v5 re-saves the tokenizer as tokenizer.json +
    # tokenizer_config.json (the latter polluted with load kwargs such as
    # "is_local"/"local_files_only").  Put back the original SD 1.5 four-file
    # layout so loading goes through the vocab.json/merges.txt path the real
    # checkpoint uses.
    _restore_tokenizer_layout(tok_dir, build_tiny_clip_tokenizer)
    return path


# --------------------------------------------------------------------------- #
# Stable Diffusion XL                                                         #
# --------------------------------------------------------------------------- #
def _build_tiny_clip_tokenizer_2(path: Path) -> Path:
    """The tiny CLIP tokenizer in SDXL's ``tokenizer_2/`` layout.

    Same four files and vocab as :func:`build_tiny_clip_tokenizer`; the only
    difference is the one the real ``stabilityai/stable-diffusion-xl-base-1.0``
    has between its two tokenizers: ``tokenizer_2`` (OpenCLIP ViT-bigG) pads
    with ``"!"`` (id 0) instead of ``<|endoftext|>``.
    """
    path = build_tiny_clip_tokenizer(path)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = json.loads((path / name).read_text(encoding="utf-8"))
        data["pad_token"] = "!"
        (path / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion XL base pipeline to ``path`` and return it.

    Why: tests of SDXL-style code (two text encoders, pooled text embedding,
    ``text_time`` added conditioning) must exercise the real
    ``StableDiffusionXLPipeline.from_pretrained`` /
    ``UNet2DConditionModel.from_pretrained(path, subfolder="unet")`` loading
    path with no hub access and no real weights.  The directory is written by
    ``StableDiffusionXLPipeline.save_pretrained(safe_serialization=True)`` so
    it has ``stabilityai/stable-diffusion-xl-base-1.0``'s layout:
    ``model_index.json`` and ``unet/``, ``vae/``, ``text_encoder/``,
    ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/`` (no
    image encoder / feature extractor; ``force_zeros_for_empty_prompt=True``).

    Tiny configuration (SDXL's real values in brackets):

    * UNet: ``block_out_channels=(32, 64)``, one layer per block,
      ``DownBlock2D/CrossAttnDownBlock2D`` + ``CrossAttnUpBlock2D/UpBlock2D``
      (SDXL's pattern: no attention at the highest resolution),
      ``transformer_layers_per_block=1``, ``attention_head_dim=(2, 4)`` (in
      diffusers this is the number of heads: head size 16 in both blocks),
      ``use_linear_projection=True``, ``norm_num_groups=8``,
      ``sample_size=8``, 4 in/out channels.
      ``cross_attention_dim=48`` [2048] = 16 + 32, the two text encoders'
      penultimate hidden states concatenated; ``addition_embed_type="text_time"``,
      ``addition_time_embed_dim=8`` [256] and
      ``projection_class_embeddings_input_dim = 16 + 6 * 8 = 64``
      [1280 + 6 * 256 = 2816]: pooled text embedding + 6 time ids (original
      size, crop top-left, target size).
    * VAE: the tiny SD 1.5 ``AutoencoderKL`` (4 blocks of 8 channels,
      ``vae_scale_factor == 8``, ``latent_channels=4``) with SDXL's
      ``scaling_factor=0.13025`` and ``force_upcast=True``.  Default image
      size is ``8 * 8 = 64``; any multiple of 8 works.
    * ``text_encoder``: ``CLIPTextModel``, hidden size 16 [768], 2 layers,
      2 heads, intermediate size 37, 77 positions, ``quick_gelu``.
    * ``text_encoder_2``: ``CLIPTextModelWithProjection``, hidden size 32
      [1280], ``projection_dim=16`` [1280] (the pooled ``text_embeds``),
      2 layers, 4 heads, intermediate size 37, 77 positions, ``gelu``.
    * ``tokenizer`` / ``tokenizer_2``: the tiny byte-level BPE
      ``CLIPTokenizer`` (see :func:`build_tiny_clip_tokenizer`) in the
      four-file layout; ``tokenizer_2`` pads with ``"!"`` like SDXL's.
    * Scheduler: ``EulerDiscreteScheduler`` with SDXL base's
      ``scheduler_config.json`` values.

    Same ``seed`` => byte-identical safetensors files.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tok_dir = build_tiny_clip_tokenizer(path / "tokenizer")
    tok_dir_2 = _build_tiny_clip_tokenizer_2(path / "tokenizer_2")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir_2)
    dim_1, dim_2 = _TINY_SDXL_TEXT_DIMS

    def text_config(tok: CLIPTokenizer, hidden: int, heads: int, act: str, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=heads,
            max_position_embeddings=TINY_CLIP_MAX_LENGTH,
            hidden_act=act,
            projection_dim=projection,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_SD15_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=1,
            cross_attention_dim=TINY_SDXL_CROSS_ATTENTION_DIM,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=TINY_SDXL_POOLED_DIM + 6 * TINY_SDXL_TIME_EMBED_DIM,
            norm_num_groups=8,
        )
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config(tokenizer, dim_1, 2, "quick_gelu", dim_1)).eval()
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(
            text_config(tokenizer_2, dim_2, 4, "gelu", TINY_SDXL_POOLED_DIM)
        ).eval()

    # SDXL base's scheduler_config.json values.  ``clip_sample``,
    # ``sample_max_value``, ``set_alpha_to_one`` and ``skip_prk_steps`` are not
    # EulerDiscreteScheduler.__init__ arguments, but the real file carries
    # them; ``from_config`` accepts them and keeps them in the saved config.
    scheduler = EulerDiscreteScheduler.from_config(
        {
            **_SD_SCHEDULER,
            "timestep_spacing": "leading",
            "prediction_type": "epsilon",
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "sample_max_value": 1.0,
        }
    )

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # As in build_tiny_sd15: put back the four-file tokenizer layouts that
    # transformers v5's save_pretrained replaced.
    _restore_tokenizer_layout(tok_dir, build_tiny_clip_tokenizer)
    _restore_tokenizer_layout(tok_dir_2, _build_tiny_clip_tokenizer_2)
    return path


# --------------------------------------------------------------------------- #
# flan-T5                                                                     #
# --------------------------------------------------------------------------- #
def _t5_unigram_vocab() -> list[tuple[str, float]]:
    """T5-ordered Unigram vocab: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then pieces.

    Whole words (``▁word``) score higher than single characters so known words
    become one token each; printable ASCII characters (with and without the
    ``▁`` word-start marker) let unknown words fall back to characters.
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    seen = {p for p, _ in vocab}
    for word in sorted(set(_CORPUS)):
        for piece in (f"▁{word}", f"▁{word.capitalize()}"):
            if piece not in seen:
                seen.add(piece)
                vocab.append((piece, -8.0))
    for code in range(33, 127):
        for piece in (f"▁{chr(code)}", chr(code)):
            if piece not in seen:
                seen.add(piece)
                vocab.append((piece, -12.0))
    return vocab


def build_tiny_t5_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Build (and save to ``path``) a tiny T5-style fast tokenizer; return it.

    It is transformers' own ``T5Tokenizer`` class (in transformers v5 this is
    the ``tokenizers``-backed Unigram tokenizer, the former ``T5TokenizerFast``)
    constructed from a hand-made Unigram vocab: ``<pad>``=0, ``</s>``=1,
    ``<unk>``=2, WhitespaceSplit + Metaspace pre-tokenizer and a
    ``$A </s>`` post-processor, so every sequence ends with ``</s>`` like T5.
    No sentinel ``<extra_id_*>`` tokens (``extra_ids=0``).  ``AutoTokenizer``
    resolves it via ``tokenizer_config.json``'s ``tokenizer_class``.
    """
    from transformers import T5Tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = T5Tokenizer(vocab=_t5_unigram_vocab(), extra_ids=0, model_max_length=512)
    tok.save_pretrained(path)
    return tok


def build_tiny_t5(path: Path, d_model: int = 16, seed: int = 0) -> Path:
    """Write a tiny random flan-T5 checkpoint + tokenizer to ``path`` and return it.

    Why: ELLA encodes prompts with ``T5EncoderModel.from_pretrained(flan-t5)``
    and ``AutoTokenizer.from_pretrained(flan-t5)``; tests must exercise that
    real loading path with no hub access and no real weights.  Like the real
    ``google/flan-t5-*`` repos this saves a full encoder-decoder
    ``T5ForConditionalGeneration`` (``config.json``, ``generation_config.json``,
    ``model.safetensors``) -- ``T5EncoderModel.from_pretrained`` then drops the
    decoder weights exactly as it does for the real checkpoint -- next to the
    tokenizer files (``tokenizer.json``, ``tokenizer_config.json``).

    Config: ``d_model`` (default 16), ``d_kv=4``, ``d_ff=32``, 2 encoder +
    2 decoder layers, 4 heads, ``feed_forward_proj="gated-gelu"``,
    ``relative_attention_num_buckets=8``, ``vocab_size == len(tokenizer)``,
    ``pad=0``, ``eos=1``, ``decoder_start_token_id=0``.  We pass flan-T5's
    ``tie_word_embeddings=False``; transformers v5's ``T5Config`` turns that
    into ``scale_decoder_outputs=False`` and always stores
    ``tie_word_embeddings=True`` (the LM head shares ``shared.weight``, which
    is the only embedding tensor in the file).  Same ``seed`` =>
    byte-identical weights.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_t5_tokenizer(path)

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_lora(sd_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A UNet LoRA for the tiny SD1.5 in diffusers' file layout (``pytorch_lora_weights.safetensors``)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # peft zero-inits B; a LoRA that changes nothing proves nothing
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=get_peft_model_state_dict(unet))
    return out_dir / "pytorch_lora_weights.safetensors"


def main(argv: list[str] | None = None) -> int:
    """``python tests/tiny_models.py OUT_DIR``: build the tiny SD 1.5, SDXL and flan-T5 under OUT_DIR."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python {Path(__file__).name} OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    sd = build_tiny_sd15(out / "sd15")
    sdxl = build_tiny_sdxl(out / "sdxl")
    t5 = build_tiny_t5(out / "flan-t5")
    print(f"tiny SD 1.5 pipeline: {sd}")
    print(f"tiny SDXL pipeline:   {sdxl}")
    print(f"tiny flan-T5:         {t5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
