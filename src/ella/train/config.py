"""Training configuration: plain values, a YAML file, and a flag for every key.

Names follow diffusers' ``examples/text_to_image/train_text_to_image.py`` so that people who know
that script know this one. The defaults *are* the paper's recipe (Sec. 4.1 of Hu et al. 2024):
UNet, VAE and LLM frozen; AdamW, lr 1e-4 (1e-5 for SDXL), weight decay 0.01, constant lr;
captions up to 128 tokens; 512x512 images.

Precedence: built-in default < ``--config run.yaml`` < command-line flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffusers.optimization import SchedulerType

from ..errors import EllaError, require
from ..hub import DEFAULT_BASE, DEFAULT_LLM

#: Seeds go to Python's, NumPy's and torch's global RNGs (accelerate's ``set_seed``); NumPy takes 32 bits.
MAX_SEED = 2**32

#: The ``[train]`` extra (pyproject.toml): tar shards, HF datasets, ``--config`` files, the default tracker.
TRAIN_PACKAGES = ("yaml", "webdataset", "datasets", "tensorboard")  # yaml first: datasets imports it


@dataclass
class TrainConfig:
    # -- models
    pretrained_model_name_or_path: str = DEFAULT_BASE  # diffusers dir / hub id with unet/, vae/, scheduler/
    llm_name_or_path: str = DEFAULT_LLM  # any HF encoder / T5 / decoder-only LM
    llm_max_length: int = 128  # paper: captions up to 128 tokens
    llm_hidden_layer: int | None = None  # None = last hidden state (what the release reads)
    # Several layers' states, concatenated (e.g. -1,-6,-12; Playground v3 / Lumina read several); recorded in the
    # connector's config, so pipelines read the same ones.
    llm_layers: list[int] | None = None
    connector_variant: str = "tsc"  # tsc (paper), tsc_adaln_zero, resampler (no timestep), mlp — Table 6
    connector_layers: int = 6  # release: 6 blocks, 8 heads, 64 latents
    connector_heads: int = 8
    connector_num_latents: int = 64
    init_connector: str | None = None  # start from these weights (official file or save_pretrained dir)
    # A LoRA of this rank on the UNet's attention projections, trained under ELLA's condition (the release's open
    # PR): exported as a diffusers LoRA (pytorch_lora_weights.safetensors) that pipe.load_lora_weights loads.
    train_unet_lora: int | None = None
    unet_lora_alpha: float | None = None  # None = the rank (scale 1)
    freeze_connector: bool = False  # train the LoRA alone under a fixed (--init_connector) connector
    # ella+clip: the UNet gets the base's CLIP tokens (77) before the connector's, the layout the pipelines use in
    # that mode; for a clip_dropout share of the samples the CLIP tokens are masked out of cross-attention, which
    # is exactly `ella` mode (no CLIP tokens), so one connector serves both modes.
    condition_mode: str = "ella"
    clip_dropout: float = 0.3
    # -- data
    dataset_name: str | None = None  # HF datasets name or a save_to_disk directory
    train_data_dir: str | None = None  # image folder with .txt sidecars, webdataset shards, or an `ella cache` dir
    image_column: str = "image"
    caption_column: str = "text"
    dataset_split: str = "train"
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = 0.1  # captions replaced by "" so classifier-free guidance works at inference
    dataloader_num_workers: int = 2
    # Stop with an error once this many samples in a row (counted in whole batches) were unreadable: a few
    # bad files are skipped, but a source where nothing decodes would otherwise keep the run at step 0.
    max_consecutive_skipped: int = 1000
    # -- optimisation
    train_batch_size: int = 16  # per device
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 10000
    # Stop early (checkpoint + export, as at the last step) once this many minutes have passed since the run
    # began, loading and compiling included: for machines lent for a fixed time. Rerunning with
    # --resume_from_checkpoint latest continues.
    max_train_minutes: float | None = None
    learning_rate: float = 1e-4  # paper: 1e-4 for SD1.5, 1e-5 for SDXL
    lr_scheduler: str = "constant"  # paper: constant; any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01  # paper
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False  # bitsandbytes
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, no on CPU), no, fp16, bf16
    gradient_checkpointing: bool = False  # through the frozen UNet: less memory, ~30% slower
    # None: compile on a GPU (the fastest step that keeps the eager gradients, benchmarks/RESULTS.md), not on a CPU
    torch_compile: bool | None = None
    # What --torch_compile compiles (ella.train.speed): `step` = the whole loss (connector, casts, UNet, MSE) in one
    # graph, `unet` = the frozen UNet's forward alone. And how: `default`, `reduce-overhead` (CUDA graphs),
    # `max-autotune-no-cudagraphs`.
    compile_scope: str = "step"
    compile_mode: str = "default"
    attention_backend: str = "auto"  # PyTorch SDPA kernel: auto, flash, cudnn, efficient, math
    fp8_unet: bool = False  # the frozen UNet's large linears in fp8 (torchao float8; Ada/Hopper GPUs)
    # Shard the frozen LLM's weights over the GPUs of each node (FSDP2, ZeRO-3 style) when it runs in the training
    # step: a 7B LLM then costs ~13/N GB per GPU instead of 13 (ella.train.sharding; configs/accelerate/).
    llm_fsdp: bool = False
    allow_tf32: bool = True
    use_ema: bool = False
    ema_decay: float = 0.9999
    snr_gamma: float | None = None  # min-SNR loss weighting (Hang et al. 2023); 5.0 is the usual value
    noise_offset: float = 0.0
    prediction_type: str | None = None  # None = the base scheduler's (epsilon for SD1.5/SDXL)
    seed: int = 0
    # -- output, checkpoints, logging
    output_dir: str = "ella-train"
    logging_dir: str = "logs"  # under output_dir
    report_to: str = "tensorboard"  # tensorboard, wandb, all, none
    logging_steps: int = 10
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None  # keep the newest N checkpoints
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint directory
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 500
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5

    @property
    def layers(self) -> int | list[int] | None:
        """The LLM hidden states the connector reads (``ella.text.encode_tokens``'s ``hidden_layer``)."""
        return list(self.llm_layers) if self.llm_layers else self.llm_hidden_layer

    @property
    def flexible_features(self) -> bool:
        """The MLP's output has one token per text token, so its LLM features are padded to the longest
        caption and carry a mask; the attention connectors take fixed-length features without one."""
        return self.connector_variant == "mlp"

    def validate(self) -> None:
        """Reject impossible values up front, one line naming the flag — before any data or model is touched.

        Every number goes through :data:`RANGES` (finite first: argparse and YAML both read ``nan`` and
        ``inf`` as floats, and an infinite learning rate would train an all-NaN connector).
        """
        # heavy: the connector module pulls in diffusers' models, and the CLI imports this module for every command
        from ..connector import VARIANTS

        for f in dataclasses.fields(self):
            kind, optional, is_list = _field_type(f)
            value = getattr(self, f.name)
            if kind not in (int, float) or is_list or (value is None and optional):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise EllaError(f"--{f.name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise EllaError(f"--{f.name} must be a finite number, got {value}")
            what, ok = RANGES[f.name]
            if not ok(value):
                raise EllaError(f"--{f.name} must be {what}, got {value}")
        if self.resolution % 8:
            raise EllaError(f"--resolution must be a multiple of 8 (the VAE's downsampling), got {self.resolution}")
        if self.connector_variant not in VARIANTS:
            raise EllaError(f"--connector_variant {self.connector_variant!r} is not one of {', '.join(VARIANTS)}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise EllaError(f"--mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise EllaError(f"--prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise EllaError(f"--lr_scheduler must be one of {', '.join(schedulers)}, got {self.lr_scheduler!r}")
        if (self.dataset_name is None) == (self.train_data_dir is None):
            raise EllaError(
                "give exactly one of --train_data_dir (folder, .tar shards or `ella cache` dir) "
                "and --dataset_name (HF datasets name or save_to_disk dir)"
            )
        if self.report_to not in ("tensorboard", "wandb", "all", "none"):
            raise EllaError(f"--report_to must be tensorboard, wandb, all or none, got {self.report_to!r}")
        if self.llm_layers is not None and (self.llm_hidden_layer is not None or len(self.llm_layers) < 2):
            raise EllaError("--llm_layers takes two or more layers (one layer: --llm_hidden_layer), and not both flags")
        if self.condition_mode not in ("ella", "ella+clip"):
            raise EllaError(f"--condition_mode must be ella or ella+clip, got {self.condition_mode!r}")
        if self.freeze_connector and not (self.train_unet_lora and self.init_connector):
            raise EllaError(
                "--freeze_connector trains only a UNet LoRA under a given connector: add --train_unet_lora RANK "
                "and --init_connector PATH"
            )
        from .speed import ATTENTION_BACKENDS, COMPILE_MODES, COMPILE_SCOPES

        for flag, value, allowed in (
            ("compile_scope", self.compile_scope, COMPILE_SCOPES),
            ("compile_mode", self.compile_mode, COMPILE_MODES),
            ("attention_backend", self.attention_backend, ATTENTION_BACKENDS),
        ):
            if value not in allowed:
                raise EllaError(f"--{flag} must be one of {', '.join(allowed)}, got {value!r}")
        if self.resume_from_checkpoint == "":
            raise EllaError("--resume_from_checkpoint needs 'latest' or a checkpoint directory, got ''")


_at_least_1 = ("at least 1", lambda v: v >= 1)
_positive = ("positive", lambda v: v > 0)
_not_negative = ("0 or more", lambda v: v >= 0)

#: What each number of :class:`TrainConfig` must be. Every int and float field has an entry (a test
#: holds it to that), so a new field can't skip the check. ``None`` (an optional field left unset) passes.
RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "llm_max_length": _at_least_1,
    "llm_hidden_layer": ("a layer index (negative counts from the last)", lambda v: True),
    "llm_layers": ("layer indices (negative count from the last)", lambda v: True),
    "train_unet_lora": ("a LoRA rank of at least 1", lambda v: v >= 1),
    "clip_dropout": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "unet_lora_alpha": _positive,
    "connector_layers": _at_least_1,
    "connector_heads": _at_least_1,
    "connector_num_latents": _at_least_1,
    "resolution": _at_least_1,
    "caption_dropout": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "dataloader_num_workers": ("0 (load in the training process) or more", lambda v: v >= 0),
    "max_consecutive_skipped": _at_least_1,
    "train_batch_size": _at_least_1,
    "gradient_accumulation_steps": _at_least_1,
    "max_train_steps": _at_least_1,
    "max_train_minutes": _positive,
    "learning_rate": _positive,
    "lr_warmup_steps": _not_negative,
    "adam_beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "adam_beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "adam_weight_decay": _not_negative,
    "adam_epsilon": _positive,
    "max_grad_norm": _positive,
    "ema_decay": ("in (0, 1)", lambda v: 0 < v < 1),
    "snr_gamma": ("positive (5.0 is the usual value)", lambda v: v > 0),
    "noise_offset": _not_negative,
    "seed": ("in [0, 2**32)", lambda v: 0 <= v < MAX_SEED),
    "logging_steps": _at_least_1,
    "checkpointing_steps": _at_least_1,
    "checkpoints_total_limit": _at_least_1,
    "validation_steps": _at_least_1,
    "validation_inference_steps": _at_least_1,
    "validation_guidance_scale": ("a finite number", lambda v: True),
}


def require_train_extra() -> None:
    """`ella train` and `ella cache` need the ``[train]`` extra: one line saying so, before any data or model."""
    for module in TRAIN_PACKAGES:
        require(module, "train")


def require_optional_packages(cfg: TrainConfig) -> None:
    """Packages outside the extra that an option asks for, checked before any data or model."""
    wanted = []
    if cfg.report_to == "wandb":
        wanted.append(("wandb", "--report_to wandb"))
    if cfg.use_8bit_adam:
        wanted.append(("bitsandbytes", "--use_8bit_adam"))
    if cfg.train_unet_lora:
        wanted.append(("peft", "--train_unet_lora"))
    if cfg.fp8_unet:
        wanted.append(("torchao", "--fp8_unet"))
    for module, flag in wanted:
        if importlib.util.find_spec(module) is None:
            raise EllaError(f"{flag} needs {module}, which is not installed: pip install {module}")


# ------------------------------------------------------------------------------- YAML and flags


@functools.cache
def _hints() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


def _field_type(f: dataclasses.Field) -> tuple[type, bool, bool]:
    """(scalar type, is_optional, is_list) of a TrainConfig field from its annotation."""
    hint = _hints()[f.name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


#: Fields whose default (None) is decided by the device the run gets, as `--help` says it.
_DEVICE_DEFAULTS = {"torch_compile": "on a GPU (the whole step compiled), off on a CPU"}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` per field; defaults are suppressed so we can tell a given flag from a default."""
    parser.add_argument("--config", help="YAML file with any of these keys (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        kind, optional, is_list = _field_type(f)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f"default: {_DEVICE_DEFAULTS.get(f.name, repr(default))}"
        if kind is bool:
            parser.add_argument(
                f"--{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        elif is_list:
            parser.add_argument(f"--{f.name}", nargs="*", type=kind, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(
                f"--{f.name}", type=_none_or(kind) if optional else kind, default=argparse.SUPPRESS, help=help_text
            )


def _none_or(kind: type):
    def convert(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    convert.__name__ = kind.__name__
    return convert


def load_yaml(path: str | Path) -> dict:
    yaml = require("yaml", "train")  # optional: only --config files need it, and the CLI imports this module always
    path = Path(path)
    if not path.is_file():
        raise EllaError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise EllaError(f"--config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise EllaError(f"--config {path} must be a mapping of key: value, got a {type(data).__name__}")
    return data


def build_config(values: dict, source: str = "config") -> TrainConfig:
    """A TrainConfig from a dict, with unknown keys and wrong types reported by name."""
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise EllaError(f"unknown key(s) in {source}: {', '.join(unknown)} (see `ella train --help` for the keys)")
    checked = {}
    for name, value in values.items():
        kind, optional, is_list = _field_type(known[name])
        if value is None and optional:
            checked[name] = None
        elif is_list:
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
                raise EllaError(f"{name} in {source} must be a list of {kind.__name__}, got {value!r}")
            checked[name] = value
        elif kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads `1e-4` (no dot) as a string
                checked[name] = float(value)
            except (ValueError, OverflowError):
                raise EllaError(f"{name} in {source} must be a number, got {value!r}") from None
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise EllaError(f"{name} in {source} must be {kind.__name__}, got {value!r}")
        else:
            checked[name] = value
    config = TrainConfig(**checked)
    config.validate()
    return config


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """default < YAML < flags; the packages and every value checked before any data or model is touched."""
    require_train_extra()
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values.update(flags)
    config = build_config(values, source=args.config or "flags")
    require_optional_packages(config)
    return config
