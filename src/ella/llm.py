"""Loading the LLM ELLA reads: a hub id or folder (any encoder, T5 family, decoder-only), an encoder-only T5 file,
and quantised weights.

ELLA needs only T5's encoder (~2.8 GB in fp16 for XL, against ~11 GB for the whole flan-t5-xl), so an
encoder-only folder or a single ``.safetensors`` of encoder weights loads too, a single file's config read
off its tensor shapes. ``quantization`` (int8 / fp8 / nf4, weight-only) shrinks the LLM's weights further.
What the loaded model does with prompts is :mod:`ella.text`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .errors import EllaError, require
from .hub import DEFAULT_LLM, check_offline, loading, resolve_file

#: google/flan-t5-xl's config.json, the release's LLM. A single ``.safetensors`` of encoder weights has no
#: config: its tensor shapes give the sizes (:func:`_t5_config_from_shapes`) and these values the rest.
FLAN_T5_XL_CONFIG = dict(
    vocab_size=32128,
    d_model=2048,
    d_kv=64,
    d_ff=5120,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=32,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

#: ``quantization=`` values. All are weight-only: T5's activations (its FFN outputs reach the thousands, the
#: reason the release's fp16 T5 keeps ``wo`` in fp32) stay in the LLM's dtype, and the weights are dequantised
#: into an ordinary matmul, so every value runs on CPU and on any CUDA GPU. fp8 *activations* would use
#: Hopper's fp8 tensor cores but need sm89+ and quantise those activations; the LLM runs once per prompt, so
#: its memory matters here, not its speed.
QUANTIZATIONS = {
    "int8": "int8 weights with per-row scales (torchao Int8WeightOnlyConfig)",
    "fp8": "float8 e4m3 weights with per-row scales (torchao Float8WeightOnlyConfig)",
    "nf4": "4-bit NormalFloat weights in blocks of 64 (bitsandbytes)",
}
#: Verified with torch 2.13, torchao 0.18 and bitsandbytes 0.50; other devices (mps, xpu ...) are refused up
#: front rather than left to fail deep inside a library.
QUANTIZATION_DEVICES = ("cpu", "cuda")

#: Any of these in a model folder means it brings its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model", "vocab.txt")


def _is_t5_family(config) -> bool:
    return config.model_type in ("t5", "mt5", "umt5")


def is_single_file(name_or_path: str | os.PathLike) -> bool:
    """A single ``.safetensors`` of encoder weights (local or ``owner/repo/file.safetensors``), not a model folder."""
    return str(name_or_path).endswith(".safetensors")


#: Loggers that talk when the quantisation libraries are imported (diffusers and transformers import them as
#: soon as they are installed): on a CPU-only machine torchao warns about each CUDA kernel library it can't
#: load, bitsandbytes about an optional CPU kernel package, and torch about torchao's pytree registrations.
#: None of it changes what runs; a command line may set these to ERROR before importing diffusers.
QUANT_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet(loggers: Sequence[str] = QUANT_LOGGERS) -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def check_quantization(quantization: str | None, device: str | torch.device | None = None) -> None:
    """Refuse an LLM quantization that is unknown, can't run on ``device`` or lacks its library — in one line,
    before any weights load (``load_llm`` and ``load_pipeline`` call it first)."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise EllaError(f"unknown LLM quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)} (or none)")
    kind = str(device or "cpu").split(":")[0]
    if kind not in QUANTIZATION_DEVICES:
        raise EllaError(
            f"LLM quantization {quantization!r} runs on {' and '.join(QUANTIZATION_DEVICES)}, not {kind}: "
            "drop the quantization (or run on cpu)"
        )
    with _quiet():
        require("bitsandbytes" if quantization == "nf4" else "torchao", "quant")


def _quantization_config(quantization: str, dtype: torch.dtype):
    """The transformers ``quantization_config`` for a value of :data:`QUANTIZATIONS`: weights are quantised
    layer by layer as they load, so the full-precision model never sits in memory whole."""
    import transformers

    if quantization == "nf4":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: torchao would otherwise retune torch.compile's global settings for the whole
    # process (the UNet's compile included) just because the LLM was quantised.
    config = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}[quantization]
    return transformers.TorchAoConfig(config(set_inductor_config=False))


def _device_map(device: str | torch.device | None) -> dict[str, str]:
    """Quantised weights are made on the device they run on (moving them afterwards is not supported everywhere)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"": str(device)}


def _check_nf4_widths(model: torch.nn.Module, name: str | os.PathLike) -> None:
    """bitsandbytes' 4-bit CPU kernel (on CPUs with AVX512-BF16) packs output rows in blocks of 32 and fails an
    assert in the first forward pass otherwise: say so at load time, in one line. T5 and MiniLM widths pass."""
    for layer, module in model.named_modules():
        if getattr(getattr(module, "weight", None), "quant_state", None) is not None and module.out_features % 32:
            raise EllaError(
                f"nf4 on cpu needs linear layers whose output width is a multiple of 32 (bitsandbytes' CPU kernel); "
                f"{name}'s {layer} has {module.out_features}: use int8 or fp8"
            )


def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):  # torchao's quantised tensors: their stored parts (int8/fp8 data + scales)
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in names)
    size = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: packed uint8 data + block scales beside it
    while state is not None:
        size += sum(v.numel() * v.element_size() for v in vars(state).values() if isinstance(v, torch.Tensor))
        state = getattr(state, "state2", None)
    return size


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes that ``model``'s parameters and buffers occupy, counting quantised weights by what they store.

    ``numel() * element_size()`` (and transformers' ``get_memory_footprint``) reports a torchao int8 weight
    at its logical dtype, i.e. unquantised; this counts its int8 values and scales. Tied weights count once.
    """
    return sum(_tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


# --- a single file of T5 encoder weights -------------------------------------------------------------


def _encoder_name(key: str) -> str | None:
    """A file's tensor name as ``T5EncoderModel`` names it; None for a whole-T5 file's decoder (not needed).

    Encoder-only files come both with the full model's prefix (``encoder.block.0...``, ``shared.weight``)
    and without it (``block.0...``, ``embed_tokens.weight``: a bare T5 stack's state dict).
    """
    if key.startswith(("decoder.", "lm_head.")):
        return None
    if key.startswith(("block.", "final_layer_norm.", "embed_tokens.")):
        key = "encoder." + key
    return "shared.weight" if key == "encoder.embed_tokens.weight" else key  # tied to shared.weight


def _t5_config_from_shapes(shapes: dict[str, tuple[int, ...]], path: Path):
    """A ``T5Config`` whose sizes are read off the tensors (so T5 small ... XXL files all load) and whose other
    values (activation for gated FFNs, epsilon, relative-attention distance) are flan-t5-xl's."""
    import transformers

    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    wi = f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"
    lacking = [k for k in ("shared.weight", q, bias, wi) if len(shapes.get(k, ())) != 2]
    if lacking:
        found = ", ".join(list(shapes)[:3]) or "none"
        raise EllaError(
            f"{path} is not a T5 encoder checkpoint: no {', '.join(lacking)} tensor (its first tensors: {found})"
        )
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    (vocab, d_model), (buckets, heads) = shapes["shared.weight"], shapes[bias]
    sizes = dict(
        vocab_size=vocab,
        d_model=d_model,
        num_heads=heads,
        d_kv=shapes[q][0] // heads,
        d_ff=shapes[wi][0],
        num_layers=max(blocks) + 1,
        num_decoder_layers=max(blocks) + 1,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",  # T5 v1.1 / flan: gated GELU; the original T5: ReLU
    )
    return transformers.T5Config(**{**FLAN_T5_XL_CONFIG, **sizes})


def read_t5_file(path: str | os.PathLike):
    """``(config, names)`` of a single-file T5 encoder, from its header alone (no weights are read).

    ``names`` maps ``T5EncoderModel``'s tensor names to the file's. A damaged file, a file of another model
    and one whose tensors don't form one T5 encoder are refused in one line, naming what is wrong.
    """
    import transformers
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            header = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # SafetensorError: a truncated download, not a safetensors file at all
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EllaError(f"{path} is not a readable .safetensors file ({reason}); download it again") from None
    names: dict[str, str] = {}
    for key in header:
        name = _encoder_name(key)
        if name is not None and (name not in names or key == "shared.weight"):
            names[name] = key
    shapes = {name: header[key] for name, key in names.items()}
    config = _t5_config_from_shapes(shapes, path)
    with torch.device("meta"):  # the shapes T5EncoderModel(config) expects, without allocating it
        expected = {k: tuple(v.shape) for k, v in transformers.T5EncoderModel(config).state_dict().items()}
    expected.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = [f"{k} is {list(shapes[k])}, not {list(v)}" for k, v in expected.items() if shapes.get(k, v) != v]
    problems = [
        f"{len(items)} {what} (e.g. {items[0]})"
        for what, items in (("missing", missing), ("unexpected", [names[k] for k in unexpected]), ("misshapen", wrong))
        if items
    ]
    if problems:
        raise EllaError(
            f"{path} is not a complete T5 encoder (read as d_model={config.d_model}, {config.num_layers} layers, "
            f"{config.num_heads} heads): tensors " + "; ".join(problems)
        )
    return config, names


def _llm_file(name_or_path: str | os.PathLike) -> Path:
    check_offline([("LLM", str(name_or_path), "config.json")])  # offline: say so now, not after timeouts
    return resolve_file(name_or_path, what="LLM")


def llm_config(name_or_path: str | os.PathLike):
    """The LLM's transformers config without loading its weights (a single file: read off its header)."""
    import transformers  # heavy: see load_llm

    if is_single_file(name_or_path):
        return read_t5_file(_llm_file(name_or_path))[0]
    check_offline([("LLM", str(name_or_path), "config.json")])
    with loading("LLM", str(name_or_path)):
        return transformers.AutoConfig.from_pretrained(name_or_path)


def _load_tokenizer(source: str | os.PathLike, what: str, vocab_size: int | None = None):
    """The LLM's own tokenizer (``what="LLM"``) or another one for it (``"LLM tokenizer"``, checked against
    the embedding's ``vocab_size``: ids past it would index out of range)."""
    import transformers

    if what == "LLM tokenizer":
        check_offline([(what, str(source), "tokenizer_config.json")])  # offline: say so now, not after timeouts
    with loading(what, str(source)):
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise EllaError(
            f"the tokenizer {source} has {len(tokenizer)} tokens but the LLM's embedding only {vocab_size}: "
            "pass the LLM's own tokenizer (tokenizer= / --llm-tokenizer)"
        )
    return tokenizer


def _tokenizer_source(name_or_path: str | os.PathLike, config) -> str | None:
    """Where a model folder's tokenizer comes from when none is named: the folder itself, or — for an
    encoder-only flan-T5 folder shipped without tokenizer files — flan-t5-xl's (one vocabulary for the family)."""
    local = Path(name_or_path).expanduser()
    if not local.is_dir() or any((local / name).is_file() for name in TOKENIZER_FILES):
        return None
    if config.model_type == "t5" and config.vocab_size == FLAN_T5_XL_CONFIG["vocab_size"]:
        return DEFAULT_LLM
    raise EllaError(
        f"{local} has no tokenizer files: pass the LLM's tokenizer (a folder or hub id) with --llm-tokenizer"
    )


def load_llm(
    name_or_path: str | os.PathLike = DEFAULT_LLM,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    quantization: str | None = None,
    tokenizer: str | os.PathLike | None = None,
):
    """Load ``(model, tokenizer)``; for encoder-decoder models only the encoder (what ELLA reads).

    ``name_or_path``: a hub id or model folder (a full model or an encoder-only one, e.g. the release's
    ``QQGYLab/ELLA/models--google--flan-t5-xl--text_encoder``), or a single ``.safetensors`` of T5 encoder
    weights (local or ``owner/repo/file.safetensors``), whose config is read off its shapes.
    ``tokenizer``: a folder or hub id; by default the model's own, and flan-t5-xl's for a single file or a
    folder without tokenizer files. ``quantization``: None, or a key of :data:`QUANTIZATIONS`; checked before
    any weights load, and the weights are quantised on ``device`` as they load.
    """
    import transformers  # heavy: the CLI imports this module for its defaults, before any model is needed

    check_quantization(quantization, device)
    kwargs = {"dtype": dtype}
    if quantization is not None:
        kwargs.update(quantization_config=_quantization_config(quantization, dtype), device_map=_device_map(device))
    if is_single_file(name_or_path):
        path = _llm_file(name_or_path)
        config, names = read_t5_file(path)  # refuses a damaged or non-T5 file before anything else loads
        tok = _load_tokenizer(tokenizer or DEFAULT_LLM, "LLM tokenizer", config.vocab_size)
        from safetensors import safe_open

        with loading("LLM", str(path)):
            with safe_open(str(path), "pt") as f:
                state = {name: f.get_tensor(key) for name, key in names.items()}
            model = transformers.T5EncoderModel.from_pretrained(None, config=config, state_dict=state, **kwargs)
    else:
        config = llm_config(name_or_path)
        if _is_t5_family(config):
            cls = {
                "t5": transformers.T5EncoderModel,
                "mt5": transformers.MT5EncoderModel,
                "umt5": transformers.UMT5EncoderModel,
            }[config.model_type]
        elif getattr(config, "is_encoder_decoder", False):
            raise EllaError(
                f"{name_or_path}: encoder-decoder model type {config.model_type!r} is not supported; "
                "use a T5-family model, an encoder (BERT-like) or a decoder-only LM"
            )
        else:
            cls = transformers.AutoModel
        source = tokenizer or _tokenizer_source(name_or_path, config)
        if source is None:
            tok = _load_tokenizer(name_or_path, "LLM")
        else:
            tok = _load_tokenizer(source, "LLM tokenizer", config.vocab_size)
        with loading("LLM", str(name_or_path)):
            model, info = cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        missing = sorted(info["missing_keys"])
        if _is_t5_family(config) and missing:  # transformers would run the encoder on random weights
            raise EllaError(
                f"{name_or_path}: {len(missing)} of the T5 encoder's weights are not in its checkpoint "
                f"(e.g. {missing[0]}); if its tensors lack the 'encoder.' prefix, pass the .safetensors file itself"
            )
    if tok.pad_token is None:  # decoder-only LMs often have none; pads are masked anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    model.requires_grad_(False).eval()
    if quantization == "nf4" and str(device or "cpu").startswith("cpu"):
        _check_nf4_widths(model, name_or_path)
    if quantization is not None or device is None:  # quantised weights were made on their device
        return model, tok
    return model.to(device), tok


def check_hidden_layer(name_or_path: str | os.PathLike, hidden_layer: int | Sequence[int] | None) -> None:
    """Refuse a ``hidden_layer`` (or list of them) the LLM doesn't have, from its config alone (before loading
    gigabytes).

    ``output_hidden_states`` gives the embeddings plus one state per layer: ``n + 1`` entries,
    indexable from ``-(n + 1)`` to ``n``.
    """
    if hidden_layer is None:
        return
    wanted = list(hidden_layer) if isinstance(hidden_layer, Sequence) else [hidden_layer]
    if not wanted or any(isinstance(i, bool) or not isinstance(i, int) for i in wanted):
        raise EllaError(f"--llm-layer must be one or more layer indices (e.g. -1 or -1,-6,-12); got {hidden_layer!r}")
    config = llm_config(name_or_path)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    if layers is None:
        return
    positions = [i % (layers + 1) for i in wanted if -(layers + 1) <= i <= layers]
    for i in wanted:
        if not -(layers + 1) <= i <= layers:
            raise EllaError(
                f"--llm-layer {i}: {name_or_path} has {layers} layers, so its hidden states are indexed "
                f"{-(layers + 1)}..{layers} (0 = the embeddings, {layers} or -1 = the last layer)"
            )
    if len(set(positions)) != len(positions):
        raise EllaError(f"--llm-layer {hidden_layer}: a layer is named twice (-1 and {layers} are the same layer)")
