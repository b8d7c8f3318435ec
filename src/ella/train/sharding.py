"""The frozen LLM sharded across the data-parallel processes (FSDP2, ZeRO-3 style), so a 7B-class LLM runs online.

Replicated, a 7B decoder-only LLM costs ~13 GB of bf16 weights on *every* GPU, next to the UNet's training
activations, only to run forward under ``torch.no_grad``. Sharded, each process keeps 1/N of every parameter and
all-gathers one transformer block just before it runs (freeing it right after), so a GPU holds ~13/N GB plus a
block or two. Only the LLM is sharded: the connector (the one thing that learns, ~67M parameters) stays under
accelerate's DDP, where replicating it is cheapest (one gradient all-reduce, no per-layer all-gathers).

The price is that the LLM's forward becomes a sequence of collectives (one all-gather per block): every process of
a shard group must run it the same number of times, in the same order — see :func:`shard_llm`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EllaError

#: ``config.model_type`` values ``ella.llm.load_llm`` loads as an encoder only (ELLA reads T5's encoder).
_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


# --- which modules become FSDP units --------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, found without knowing its architecture.

    The block list is the ``nn.ModuleList`` of one repeated class holding the most parameters (``model.layers``
    of Llama/Mistral/Qwen, GPT-2's ``h``, BERT's ``encoder.layer``, T5's ``encoder.block``): counting parameters
    rather than entries keeps a mixture-of-experts' per-layer list of 64 experts from winning over its 32 layers.
    Every list of that block class is returned (a whole T5 has an encoder's and a decoder's), in module order.
    """
    best: tuple[int, int] | None = None
    block_cls: type[nn.Module] | None = None
    lists: list[nn.ModuleList] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or len({type(m) for m in module}) != 1:
            continue
        lists.append(module)
        key = (sum(p.numel() for p in module.parameters()), -name.count("."))  # ties: the outermost list
        if key[0] and (best is None or key > best):
            best, block_cls = key, type(module[0])
    if block_cls is None:
        raise EllaError(
            f"can't shard {type(model).__name__}: it has no nn.ModuleList of identical transformer blocks (like "
            "model.layers, h, encoder.layer or encoder.block); run the LLM replicated (without --llm_fsdp)"
        )
    seen: set[int] = set()
    blocks = []
    for module_list in lists:
        for block in module_list:
            if type(block) is block_cls and id(block) not in seen:
                seen.add(id(block))
                blocks.append(block)
    return blocks


def _input_embedding(model: nn.Module, blocks: Iterable[nn.Module]) -> nn.Module | None:
    """The input embedding, when it can be an FSDP unit of its own; None leaves it to the root's group.

    The root's group stays gathered for the whole forward, so an embedding left there (Llama-3 and Qwen2 have
    ~1 GB of it in bf16) would sit unsharded on every GPU throughout. It can only be a unit when it is the sole
    module holding its weight: T5's ``shared`` and ``encoder.embed_tokens`` are two modules sharing one
    parameter, and FSDP's hooks on ``shared`` would never fire for the call made through ``embed_tokens``.
    """
    try:
        embedding = model.get_input_embeddings()  # transformers' models; others raise or lack it
    except (AttributeError, NotImplementedError):
        return None
    weights = {id(p) for p in embedding.parameters()} if isinstance(embedding, nn.Module) else set()
    if not weights:
        return None
    owners = [m for m in model.modules() if any(id(p) in weights for p in m.parameters(recurse=False))]
    inside_block = any(embedding is m for block in blocks for m in block.modules())
    return embedding if owners == [embedding] and not inside_block else None


def _units(model: nn.Module) -> list[nn.Module]:
    """What gets ``fully_shard``, bottom-up as FSDP requires: every block, the embedding if it can, the root last."""
    blocks = find_blocks(model)
    embedding = _input_embedding(model, blocks)
    return [*blocks, *([embedding] if embedding is not None else []), model]


# --- sharding ------------------------------------------------------------------------------------------------


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`shard_llm` (its forward is then a collective: see there)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support shards nothing
        return False
    return isinstance(model, FSDPModule)


def shard_group_size(world_size: int, requested: int | None = None) -> int:
    """How many processes share one copy of the LLM: ``requested``, or by default the processes of one node.

    Sharding within a node keeps the per-block all-gathers on NVLink; across nodes each step would pull the
    whole model (~13 GB for 7B) through the network. Per-GPU memory is the same either way (1/GPUs-per-node),
    and the copies of different nodes are plain replicas (HSDP): frozen weights need no gradient sync.
    ``LOCAL_WORLD_SIZE`` is set by torchrun and ``accelerate launch``.
    """
    if requested is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        return local if 0 < local <= world_size and world_size % local == 0 else world_size
    if requested < 1 or world_size % requested:
        raise EllaError(
            f"an LLM shard group of {requested} processes doesn't divide the {world_size} processes; "
            f"use a divisor of {world_size} (e.g. the GPUs per node)"
        )
    return requested


def _check_shardable(llm: nn.Module) -> None:
    trainable = [name for name, p in llm.named_parameters() if p.requires_grad]
    if trainable:
        raise EllaError(
            f"shard_llm shards a frozen LLM, but {len(trainable)} of its parameters require grad (e.g. "
            f"{trainable[0]}): call llm.requires_grad_(False) first (ella.llm.load_llm does)"
        )
    for name, p in llm.named_parameters():
        if type(p) is not nn.Parameter:  # torchao's quantised tensors, bitsandbytes' Params4bit, meta ...
            raise EllaError(
                f"the LLM's {name} is a {type(p).__name__}, not a plain weight (a quantised LLM?): FSDP shards "
                "plain weights; drop --llm-quantization or --llm_fsdp"
            )
        if p.is_meta:
            raise EllaError(f"the LLM's {name} is on the meta device (no weights): load the LLM before sharding it")
    if any(hasattr(m, "_hf_hook") for m in llm.modules()):
        raise EllaError("the LLM is under accelerate's offload hooks: shard it or offload it, not both")


def _device(llm: nn.Module, device: str | torch.device | None, backend: str) -> torch.device:
    """Where the shards live and the LLM computes: ``device``, or the LLM's own."""
    device = torch.device(device) if device is not None else next(llm.parameters()).device
    if device.type == "cuda":
        current = torch.cuda.current_device()
        if device.index is None:
            device = torch.device("cuda", current)
        if device.index != current:
            raise EllaError(
                f"shard_llm on {device}, but this process's current GPU is cuda:{current}: call "
                f"torch.cuda.set_device({device.index}) first (accelerate does) or pass device=accelerator.device"
            )
    elif device.type == "cpu" and "gloo" not in backend and "mpi" not in backend:
        raise EllaError(
            f"the LLM is on the cpu but the process group's backend is {backend}: pass device=accelerator.device "
            "(its shards are moved there block by block)"
        )
    return device


def _capture_registry():
    """transformers' registry of the outputs each model class can record (``output_hidden_states``), or None.

    transformers >= 5 looks a model up in it by ``str(model.__class__)``; ``fully_shard`` swaps the class for a
    generated ``FSDP<Model>`` subclass, after which ``output_hidden_states=True`` is silently ignored and
    ``hidden_states`` comes back None (so ``encode_tokens(hidden_layer=...)`` would fail).
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # older transformers read the class attribute, which the FSDP subclass inherits
        return None
    return _CAN_RECORD_REGISTRY


def _end_of_forward(module: nn.Module, args: tuple, output: object) -> None:
    """Clear FSDP's per-iteration records after each forward.

    FSDP2 appends every unit to a list at each forward (the order its backward prefetches in) and empties it
    only at the end of a backward. The LLM never gets one, so without this the list grows by one entry per
    block per step for the whole run.
    """
    reset = getattr(module, "reset_iter_state", None)  # public from torch 2.13
    if reset is not None:
        reset()
    else:
        _forget_forward_order(module)


def _forget_forward_order(root: nn.Module) -> None:
    """What ``reset_iter_state`` clears of a forward's records, for a torch without it (2.11 on the GPU
    machines): the shared forward order and each unit's indices into it (one param group per unit before
    per-parameter meshes, a list of them after)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    fully_shard.state(root)._comm_ctx.post_forward_order.clear()
    for module in root.modules():
        if isinstance(module, FSDPModule):
            state = fully_shard.state(module)
            groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
            for group in groups:
                if group is not None:
                    group._post_forward_indices.clear()


def shard_llm(
    llm: nn.Module,
    *,
    device: str | torch.device | None = None,
    group_size: int | None = None,
) -> nn.Module:
    """Shard the frozen ``llm``'s weights across the data-parallel processes (in place; returns it).

    Each transformer block (:func:`find_blocks`), the input embedding when it is a module of its own, and then
    the root get ``fully_shard``: every process keeps 1/N of each parameter (a ``DTensor`` sharded on dim 0)
    and all-gathers a unit's weights just before it runs. The model is called exactly as before, e.g. by
    :func:`ella.text.encode_tokens` (``output_hidden_states`` included).

    A no-op returning ``llm`` unchanged when ``torch.distributed`` is not initialised, the world has one
    process, or the shard group is one process (one GPU per node: see :func:`shard_group_size`); so is a
    second call. Must be called by every process, after the process group exists (``Accelerator()`` makes it);
    the LLM may be on its device already or still on the CPU (then each unit is moved to ``device`` and
    sharded in turn, so no GPU ever holds the whole model).

    ``reshard_after_forward=True`` for every unit, the root included: FSDP's default keeps the root's weights
    gathered after forward because a backward normally follows at once; the LLM never runs a backward, so
    anything left gathered would just occupy memory until the next step.

    No ``MixedPrecisionPolicy``: the shards stay in the dtype ``load_llm`` gave them (bf16 on GPU, fp32 on
    CPU) and are all-gathered in it, which is already the least memory and traffic. A policy casting fp32
    shards to bf16 would halve the traffic but double what each GPU stores; for frozen weights, loading them
    in bf16 is better on both counts. There are no gradients to reduce, and the inputs are token ids.

    Lock-step: every forward is one all-gather per unit, a collective. All processes of a shard group must
    run the LLM the same number of times in the same order — a process that skips a batch, or runs the LLM
    alone (e.g. validation on the main process only), hangs the others. Input shapes may differ between
    processes (batch size, sequence length, ``hidden_layer``): only weights are gathered.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or is_sharded(llm):
        return llm
    world = dist.get_world_size()
    size = shard_group_size(world, group_size)
    if size == 1:
        return llm
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _check_shardable(llm)
    device = _device(llm, device, str(dist.get_backend()))
    units = _units(llm)
    if size == world:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    else:  # HSDP: replicas across nodes, sharded within each
        mesh = init_device_mesh(device.type, (world // size, size), mesh_dim_names=("replicate", "shard"))
    registry = _capture_registry()
    recorded = {} if registry is None else {id(m): registry.get(m) for m in llm.modules()}
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    if registry is not None:
        for module in llm.modules():
            if recorded.get(id(module)) and not registry.get(module):  # its class was swapped by fully_shard
                registry[module] = recorded[id(module)]
    llm.register_forward_hook(_end_of_forward)
    return llm


# --- memory before loading anything --------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMMemoryPlan:
    """Per-process bytes of the LLM's weights, replicated vs sharded over ``shards`` processes.

    ``sharded_bytes`` is what each process stores (FSDP pads each parameter's first dimension to a multiple of
    ``shards``); ``gathered_bytes`` the largest unit gathered at once (a block, or the embedding); ``root_bytes``
    the root's own weights (final norm ...), gathered for the whole forward. ``peak_bytes`` bounds the weights'
    memory during a forward: on GPU the next unit's all-gather overlaps the current one's compute, so two units
    (the two largest, at worst) can be gathered at once.
    """

    params: int
    shards: int
    dtype_bytes: int
    replicated_bytes: int
    sharded_bytes: int
    gathered_bytes: int
    root_bytes: int
    peak_bytes: int

    def summary(self) -> str:
        """One line for the trainer to print before loading anything."""
        scale, unit = next(((s, u) for s, u in _UNITS if self.replicated_bytes >= s), (1, "B"))  # one unit a line
        size = lambda n: f"{n / scale:.1f} {unit}"
        head = f"LLM {_count(self.params)} params: {size(self.replicated_bytes)} per GPU replicated"
        if self.shards == 1:
            return head
        gathered = size(self.gathered_bytes + self.root_bytes)
        return f"{head}, {size(self.sharded_bytes)} + {gathered} gathered sharded over {self.shards}"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


def _meta_model(config) -> nn.Module:
    """The module ``ella.llm.load_llm`` would load for ``config`` (T5's encoder only), with no storage."""
    import transformers

    with torch.device("meta"):
        if config.model_type in _T5_ENCODERS:
            return getattr(transformers, _T5_ENCODERS[config.model_type])(config)
        return transformers.AutoModel.from_config(config)


def _shard_numel(p: torch.Tensor, shards: int) -> int:
    """Elements one process stores of ``p``: its dim 0 cut in ``shards`` chunks, padded to equal size."""
    if p.dim() == 0:
        return 1
    return math.ceil(p.shape[0] / shards) * (p.numel() // p.shape[0] if p.shape[0] else 0)


def llm_memory_plan(config, world_size: int, dtype_bytes: int = 2) -> LLMMemoryPlan:
    """The LLM's weight memory per process from its transformers ``config`` alone (``ella.llm.llm_config``).

    The model is built on the ``meta`` device, so the parameter count is exact (tied weights once, no
    ``lm_head``: ELLA loads the base model) and costs no memory. ``world_size``: the processes sharing one copy
    (:func:`shard_group_size`: the GPUs of a node by default); 1 gives the replicated figures only.
    """
    if world_size < 1:
        raise EllaError(f"world_size must be at least 1, got {world_size}")
    model = _meta_model(config)
    units = _units(model)
    owned: dict[int, int] = {}  # parameter id -> unit index (FSDP gives a parameter to the first unit holding it)
    params = {id(p): p for p in model.parameters()}
    for index, unit in enumerate(units):
        for p in unit.parameters():
            owned.setdefault(id(p), index)
    unit_numel = [0] * len(units)
    for pid, index in owned.items():
        unit_numel[index] += params[pid].numel()
    total = sum(p.numel() for p in params.values())
    if world_size == 1:  # nothing is sharded or gathered: shard_llm leaves the model as it is
        sharded, largest, root, peak = total, 0, 0, total
    else:
        sharded = sum(_shard_numel(p, world_size) for p in params.values())
        largest, root = max(unit_numel[:-1], default=0), unit_numel[-1]
        peak = sharded + root + sum(sorted(unit_numel[:-1])[-2:])
    return LLMMemoryPlan(
        params=total,
        shards=world_size,
        dtype_bytes=dtype_bytes,
        replicated_bytes=total * dtype_bytes,
        sharded_bytes=sharded * dtype_bytes,
        gathered_bytes=largest * dtype_bytes,
        root_bytes=root * dtype_bytes,
        peak_bytes=peak * dtype_bytes,
    )
