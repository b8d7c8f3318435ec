"""The Timestep-Aware Semantic Connector (TSC) and the connector variants of the ELLA paper's Table 6.

The TSC turns a frozen LLM's token features into the tokens that a frozen UNet's cross-attention
reads, and it does so *per diffusion timestep*: the paper's observation is that early (noisy) steps
need the layout-level semantics of a prompt and late steps its details, so the connector is
modulated by the timestep through AdaLN.

Everything below that is marked "release fact" is what the released weights
(`QQGYLab/ELLA`, `ella-sd1.5-tsc-t5xl.safetensors`) were trained with; changing it silently breaks
them, which `tests/test_connector.py` checks against an independent reference.
"""

from __future__ import annotations

import inspect
import json
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .devices import compute_device
from .errors import EllaError
from .hub import resolve_file
from .io import atomic_path

TimestepsLike = torch.Tensor | int | float | Sequence[int | float]

#: The connector variants of the paper's Table 6 ablation, selectable with ``variant=``.
#: ``tsc`` is the released model; the others exist to reproduce the ablation (the shapes world trains all of them).
VARIANTS = ("tsc", "tsc_adaln_zero", "resampler", "mlp")

#: safetensors metadata key holding the connector config in files written by ``save_single_file``.
CONFIG_METADATA_KEY = "ella_config"


class CheckpointMismatchError(EllaError):
    """A connector checkpoint whose tensors do not fit the model it is loaded into."""


class AdaLayerNorm(nn.Module):
    """LayerNorm whose shift/scale (and, for AdaLN-Zero, a residual gate) come from the timestep.

    Release fact: no affine parameters, eps 1e-6, ``[shift | scale]`` with shift the *first* half,
    and the projection zero-initialised so that a fresh connector starts as a plain LayerNorm.
    """

    def __init__(self, width: int, time_embed_dim: int, with_gate: bool = False):
        super().__init__()
        self.chunks = 3 if with_gate else 2
        self.linear = nn.Linear(time_embed_dim, self.chunks * width)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mod = self.linear(F.silu(temb)).unsqueeze(1)  # [B, 1, chunks * width]
        shift, scale, *gate = mod.chunk(self.chunks, dim=-1)
        return self.norm(x) * (1 + scale) + shift, (gate[0] if gate else None)


class PlainLayerNorm(nn.Module):
    """The Resampler ablation's norm: the same call as AdaLayerNorm, but blind to the timestep."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        return self.norm(x), None


class SquaredReLU(nn.Module):
    """relu(x)**2 — the MLP activation of the release (Primer-style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


class PerceiverBlock(nn.Module):
    """One resampler block: latents attend to ``[latents; text]``, then a 4x squared-ReLU MLP.

    Release fact: the keys/values are ``concat(AdaLN_1(latents), AdaLN_2(text))`` with the latents
    *first*, and the query is the same ``AdaLN_1(latents)``; attention is torch's
    ``nn.MultiheadAttention`` (packed ``in_proj`` weight, with biases).
    """

    def __init__(self, width: int, heads: int, time_embed_dim: int | None, norm: str):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("sq_relu", SquaredReLU()),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )

        def make_norm(with_gate: bool) -> nn.Module:
            if norm == "layernorm":
                return PlainLayerNorm(width)
            return AdaLayerNorm(width, time_embed_dim, with_gate=with_gate and norm == "adaln_zero")

        self.ln_1 = make_norm(with_gate=True)
        self.ln_2 = make_norm(with_gate=False)
        self.ln_ff = make_norm(with_gate=True)

    def forward(
        self,
        text: torch.Tensor,
        latents: torch.Tensor,
        temb: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        normed, gate = self.ln_1(latents, temb)
        kv = torch.cat([normed, self.ln_2(text, temb)[0]], dim=1)
        out = self.attn(normed, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
        latents = latents + (out if gate is None else gate * out)
        normed, gate = self.ln_ff(latents, temb)
        out = self.mlp(normed)
        return latents + (out if gate is None else gate * out)


class PerceiverResampler(nn.Module):
    """Learnable latents that read the text features through a stack of PerceiverBlocks.

    Release facts: latents are initialised ``width**-0.5 * randn``; the timestep enters once more
    as ``time_aware_linear(silu(T))`` added to every latent; text is projected once by ``proj_in``
    and reused by every block; the output has no projection and no final norm.
    """

    def __init__(self, width, layers, heads, num_latents, input_dim, time_embed_dim, norm):
        super().__init__()
        self.latents = nn.Parameter(width**-0.5 * torch.randn(num_latents, width))
        if time_embed_dim is not None:
            self.time_aware_linear = nn.Linear(time_embed_dim, width)
        self.proj_in = nn.Linear(input_dim, width)
        self.perceiver_blocks = nn.ModuleList(PerceiverBlock(width, heads, time_embed_dim, norm) for _ in range(layers))

    def forward(self, text, temb, text_mask, text_weights=None):
        batch, num_latents = text.shape[0], self.latents.shape[0]
        latents = self.latents.unsqueeze(0).expand(batch, -1, -1)
        if temb is not None:
            latents = latents + self.time_aware_linear(F.silu(temb)).unsqueeze(1)
        key_padding_mask = None
        if text_mask is not None:
            # Keys are [latents; text]: latents are always visible, padded text tokens are not.
            visible = torch.cat([text_mask.new_ones(batch, num_latents), text_mask], dim=1)
            key_padding_mask = ~visible.bool()
        if text_weights is not None:
            key_padding_mask = weighted_key_bias(text_weights, num_latents, key_padding_mask, text.dtype)
        text = self.proj_in(text)
        for block in self.perceiver_blocks:
            latents = block(text, latents, temb, key_padding_mask)
        return latents


def weighted_key_bias(
    text_weights: torch.Tensor, num_latents: int, key_padding_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """An additive attention-logit bias over the keys ``[latents; text]``: ``log(w)`` on each text key.

    Why a logit bias, and not scaled features (what A1111 does to CLIP's output): every block normalises
    the text keys first (``ln_2``, a LayerNorm per token), which would undo any scaling of a token's
    features. Adding ``log(w)`` to a key's logit multiplies its unnormalised attention weight by ``w`` for
    every latent query, in every head and block: with weight 2 the connector listens to those words twice
    as much relative to the rest, and what the LLM said about them is untouched. The attention mass on the
    weighted tokens rises strictly with ``w``; ``w = 1`` adds exactly 0. Latent keys and the padding
    (``-inf``, from ``key_padding_mask``) are unaffected.
    """
    if not torch.isfinite(text_weights).all() or (text_weights <= 0).any():
        raise ValueError("text_weights must be finite and positive (1 = unchanged)")
    bias = torch.cat([text_weights.new_zeros(text_weights.shape[0], num_latents), text_weights.log()], dim=1)
    if key_padding_mask is not None:
        bias = bias.masked_fill(key_padding_mask, float("-inf"))
    return bias.to(dtype)


class MLPConnector(nn.Module):
    """Table 6's MLP baseline: each LLM token mapped independently, no latents, no timestep.

    Its output keeps the text's length, so padded positions must be masked in the UNet's
    cross-attention (the conditioning module passes the mask on as ``encoder_attention_mask``).
    """

    def __init__(self, width: int, input_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            OrderedDict([("fc_1", nn.Linear(input_dim, width)), ("act", nn.GELU()), ("fc_2", nn.Linear(width, width))])
        )

    def forward(self, text, temb, text_mask, text_weights=None):
        out = self.mlp(text)
        if text_weights is None:
            return out
        # No attention to bias: the output tokens go to the UNet as they are, so weigh them as A1111 weighs
        # CLIP's tokens (scale each, then restore the sequence mean).
        mean = out.float().mean(dim=(1, 2), keepdim=True)
        scaled = out.float() * text_weights.unsqueeze(-1).float()
        return (scaled * (mean / scaled.mean(dim=(1, 2), keepdim=True))).to(out.dtype)


class AttentionPool(nn.Module):
    """SDXL's pooled text embedding, made from the connector's tokens by one learned query.

    SDXL's added conditioning wants a single vector (CLIP-G's pooled output, 1280-d) beside the
    cross-attention tokens. ELLA has no such vector, so a small trained head attends over the
    connector output and projects the result — the authors' "attention pooling" for ELLA-SDXL.
    Because it reads the per-timestep tokens, the pooled vector is timestep-aware too.
    """

    def __init__(self, width: int, heads: int, pooled_dim: int):
        super().__init__()
        self.query = nn.Parameter(width**-0.5 * torch.randn(1, width))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, pooled_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        query = self.query.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        key_padding_mask = None if mask is None else ~mask.bool()
        pooled = self.attn(query, tokens, tokens, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.proj(self.norm(pooled[:, 0]))


class TimestepAwareSemanticConnector(ModelMixin, ConfigMixin):
    """ELLA's connector: ``forward(text_features, timesteps, attention_mask=None) -> [B, N, width]``.

    The defaults are the released SD1.5 model (66,820,608 parameters in 93 tensors) and its
    ``state_dict()`` keys are exactly those of ``ella-sd1.5-tsc-t5xl.safetensors``, so the official
    file loads with ``strict=True`` (use :meth:`from_single_file`).

    ``attention_mask`` ([B, S], 1 = real token) excludes padded text tokens as attention keys. The
    release has no mask and runs each prompt separately at its own length in "flexible" mode; with
    the mask a padded batch gives the same result in one call. Omit it to reproduce "fixed"
    (pad-to-128) mode, where the release attends to the pad positions' features too.

    ``variant`` selects the Table 6 ablations: ``tsc`` (release), ``tsc_adaln_zero`` (AdaLN-Zero
    gated residuals, DiT-style), ``resampler`` (the same resampler with no timestep input) and
    ``mlp`` (per-token MLP, output length = text length).
    ``text_feature_dtype`` records the dtype of the LLM features the weights were trained on
    (``"float16"`` for the release), so a pipeline can warn when fed another.
    ``llm_layers`` records which hidden layers of the LLM the connector was trained on when it read several
    (their states concatenated; ``input_dim`` is then that many times the LLM's width), so a pipeline reads the
    same ones; None: the layer the pipeline is told (the last by default), as for the release.
    ``pooled_dim`` adds the :class:`AttentionPool` head (``pool(tokens)``) that SDXL-style UNets
    need for their pooled text embedding; it is None for SD1.5-style UNets and the release.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        width: int = 768,
        layers: int = 6,
        heads: int = 8,
        num_latents: int = 64,
        input_dim: int = 2048,
        time_channel: int = 320,
        time_embed_dim: int = 768,
        variant: str = "tsc",
        act_fn: str = "silu",
        text_feature_dtype: str | None = None,
        pooled_dim: int | None = None,
        llm_layers: list[int] | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown connector variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.timestep_aware = variant in ("tsc", "tsc_adaln_zero")
        if self.timestep_aware:
            # Release fact: cos half first, frequency shift 0, max period 10000 (diffusers' Timesteps
            # computes in fp32); then Linear -> SiLU -> Linear.
            self.time_proj = Timesteps(time_channel, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embedding = TimestepEmbedding(time_channel, time_embed_dim, act_fn=act_fn)
        if variant == "mlp":
            self.connector = MLPConnector(width, input_dim)
        else:
            norm = {"tsc": "adaln", "tsc_adaln_zero": "adaln_zero", "resampler": "layernorm"}[variant]
            self.connector = PerceiverResampler(
                width, layers, heads, num_latents, input_dim, time_embed_dim if self.timestep_aware else None, norm
            )
        if pooled_dim is not None:
            self.pooler = AttentionPool(width, heads, pooled_dim)

    @property
    def output_follows_text(self) -> bool:
        """True when the output has one token per text token (so the text mask applies to it)."""
        return self.config.variant == "mlp"

    def embed_timesteps(self, timesteps: TimestepsLike, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """Timesteps (0-d, [B], int, float or list) -> T of shape [batch, time_embed_dim]."""
        t = torch.as_tensor(timesteps, device=compute_device(self)).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise ValueError(f"got {t.numel()} timesteps for a batch of {batch}; pass one, or one per sample")
        return self.time_embedding(self.time_proj(t).to(dtype))

    def forward(
        self,
        text_features: torch.Tensor,
        timesteps: TimestepsLike | None = None,
        attention_mask: torch.Tensor | None = None,
        text_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``text_weights`` ([B, S], positive, 1 = unchanged): prompt emphasis, as an attention-logit bias
        ``log(w)`` on those text tokens (:func:`weighted_key_bias` says why); None is exactly the unweighted
        connector."""
        if text_features.ndim != 3 or text_features.shape[-1] != self.config.input_dim:
            raise ValueError(
                f"text_features must be [batch, tokens, {self.config.input_dim}]; got {tuple(text_features.shape)}"
            )
        batch = text_features.shape[0]
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(text_features.shape[:2]):
            raise ValueError(
                f"attention_mask must be [batch, tokens] = {tuple(text_features.shape[:2])}; "
                f"got {tuple(attention_mask.shape)}"
            )
        if text_weights is not None and tuple(text_weights.shape) != tuple(text_features.shape[:2]):
            raise ValueError(
                f"text_weights must be [batch, tokens] = {tuple(text_features.shape[:2])}; "
                f"got {tuple(text_weights.shape)}"
            )
        text_features = text_features.to(self.dtype)
        temb = None
        if self.timestep_aware:
            if timesteps is None:
                raise ValueError("this connector is timestep-aware: pass the diffusion timestep(s)")
            temb = self.embed_timesteps(timesteps, batch, text_features.dtype)
        if text_weights is None:
            return self.connector(text_features, temb, attention_mask)
        return self.connector(text_features, temb, attention_mask, text_weights.to(text_features.device))

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled embedding ``[B, pooled_dim]`` of this connector's output tokens (SDXL's ``text_embeds``).

        ``attention_mask`` matters only for the ``mlp`` variant, whose tokens follow the text.
        """
        if self.config.pooled_dim is None:
            raise ValueError("this connector has no pooling head; create it with pooled_dim=... for SDXL-style UNets")
        return self.pooler(tokens, attention_mask if self.output_follows_text else None)

    # ----------------------------------------------------------------------------- official files

    @classmethod
    def config_from_state_dict(cls, state_dict: dict[str, torch.Tensor], **overrides) -> dict:
        """Read sizes off a TSC checkpoint's tensor shapes (heads can't be read: pass it if not 8)."""
        try:
            width, input_dim = state_dict["connector.proj_in.weight"].shape
            num_latents = state_dict["connector.latents"].shape[0]
            time_embed_dim, time_channel = state_dict["time_embedding.linear_1.weight"].shape
        except KeyError as err:
            raise CheckpointMismatchError(
                f"not an ELLA TSC checkpoint: tensor {err.args[0]!r} is missing "
                f"(found {len(state_dict)} tensors, e.g. {sorted(state_dict)[:3]})"
            ) from None
        if "pooler.proj.weight" in state_dict:
            overrides.setdefault("pooled_dim", state_dict["pooler.proj.weight"].shape[0])
        prefix = "connector.perceiver_blocks."
        layers = len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})
        config = dict(
            width=width,
            layers=layers,
            num_latents=num_latents,
            input_dim=input_dim,
            time_channel=time_channel,
            time_embed_dim=time_embed_dim,
        )
        config.update(overrides)
        return config

    def load_checked_state_dict(
        self, state_dict: dict[str, torch.Tensor], source: str = "checkpoint", assign: bool = False
    ) -> None:
        """``load_state_dict(strict=True)``, but a misfit lists every missing/unexpected/misshapen key.

        ``assign=True`` takes the tensors themselves (for a model built on the meta device)."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        misshapen = [
            f"{k}: {tuple(state_dict[k].shape)} in {source}, {tuple(own[k].shape)} in model"
            for k in sorted(set(own) & set(state_dict))
            if own[k].shape != state_dict[k].shape
        ]
        if missing or unexpected or misshapen:
            problems = []
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
                if items:
                    shown = "; ".join(items[:8]) + (f"; ... and {len(items) - 8} more" if len(items) > 8 else "")
                    problems.append(f"{len(items)} {label}: {shown}")
            raise CheckpointMismatchError(
                f"{source} does not fit the connector {dict(self.config)}: " + " | ".join(problems)
            )
        self.load_state_dict(state_dict, strict=True, assign=assign)

    @classmethod
    def from_single_file(
        cls,
        path_or_repo: str | os.PathLike,
        filename: str | None = None,
        *,
        torch_dtype: torch.dtype | None = None,
        **config_overrides,
    ) -> TimestepAwareSemanticConnector:
        """Load an official single-file ELLA checkpoint (a local ``.safetensors`` or hub repo + filename).

        The config is read from the tensor shapes, so the released SD1.5 file needs no arguments;
        its weights were trained on fp16 T5 features, recorded as ``text_feature_dtype``.
        """
        path = resolve_file(path_or_repo, filename, what="ELLA connector weights")
        try:
            state_dict = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise CheckpointMismatchError(f"{path} is not a readable safetensors file: {err}") from None
        # Files we write carry their config (variant, heads ...) as metadata; the release's don't.
        saved = cls._metadata_config(metadata, path)
        if saved:
            config = {**saved, **config_overrides}
        else:
            config = cls.config_from_state_dict(state_dict, **config_overrides)
        config.setdefault("text_feature_dtype", "float16")
        # The metadata is not trusted: the model is built on the meta device (no memory) and checked against
        # the tensors before any weight is materialised, so a file claiming width 65536 costs nothing.
        try:
            with torch.device("meta"):
                model = cls(**config)
        except (TypeError, ValueError) as err:
            raise CheckpointMismatchError(f"{path}: its config is not a connector config ({err})") from None
        dtype = torch_dtype or torch.get_default_dtype()
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.load_checked_state_dict(state_dict, source=str(path), assign=True)
        return model

    @classmethod
    def _metadata_config(cls, metadata: dict[str, str], path) -> dict:
        """The config our files store as metadata: valid JSON, known keys, or one clear error."""
        text = metadata.get(CONFIG_METADATA_KEY)
        if text is None:
            return {}
        try:
            saved = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointMismatchError(
                f"{path}: its {CONFIG_METADATA_KEY!r} metadata is not valid JSON ({err})"
            ) from None
        if not isinstance(saved, dict):
            raise CheckpointMismatchError(f"{path}: its {CONFIG_METADATA_KEY!r} metadata is not a JSON object")
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise CheckpointMismatchError(
                f"{path}: its {CONFIG_METADATA_KEY!r} metadata has unknown keys {unknown}; "
                f"expected some of {sorted(known)}"
            )
        return saved

    def save_single_file(self, path: str | os.PathLike) -> None:
        """Write the official single-file layout (what ``from_single_file`` and the release read).

        The tensors are exactly the release's keys; our config rides along as safetensors metadata
        so that non-default connectors (other variants, head counts) load from one file too.
        """
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={CONFIG_METADATA_KEY: json.dumps(config)})
