"""The LLM sharded over data-parallel processes (FSDP2): the same features as unsharded, half the weights per
process, the connector still learns, a memory plan from the config alone, and the accelerate launch configs."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from torch import nn

from ella import TimestepAwareSemanticConnector
from ella.errors import EllaError
from ella.text import Tokens, encode_tokens
from ella.train import sharding
from ella.train.sharding import find_blocks, llm_memory_plan, shard_llm

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
LAYERS = [-1, -3, 0]  # several hidden states, as --llm_layers reads them; 0 is the embeddings' output
IMAGE = dict(num_inference_steps=2, height=64, width=64, output_type="np")


def tiny_llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128,
    )  # fmt: skip


def tiny_t5_config() -> transformers.T5Config:
    return transformers.T5Config(vocab_size=96, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_heads=4)


def tiny_bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )


def tiny_gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)


def build(config, seed: int = 0) -> nn.Module:
    """A frozen model as ``ella.llm.load_llm`` returns it (T5: the encoder only); the same weights for a seed."""
    torch.manual_seed(seed)
    if isinstance(config, transformers.T5Config):
        model = transformers.T5EncoderModel(config)
    else:
        model = transformers.AutoModel.from_config(config)
    return model.requires_grad_(False).eval()


def tokens(vocab: int, batch: int, length: int, seed: int) -> Tokens:
    """Right-padded random prompts of different lengths (the last one padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    return Tokens(ids * mask, mask, mask.sum(1).tolist())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, world: int, *args) -> None:
    mp.spawn(worker, args=(world, _free_port(), *args), nprocs=world, join=True)


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- two processes ---------------------------------------------------------------------------------------------


def _two_process_worker(rank: int, world: int, port: int, out: Path, pipeline: tuple[Path, Path, Path]) -> None:
    _init(rank, world, port)
    try:
        from conftest import tiny_pipeline  # the children import the test folder's modules as pytest does

        # the real loading path (ella.load_pipeline -> ella.llm.load_llm) and a validation image drawn by every
        # rank, as the trainer must draw them with a sharded LLM (its forward is a collective)
        pipe = tiny_pipeline(*pipeline)
        draw = lambda: pipe("a red square", generator=torch.Generator().manual_seed(3), **IMAGE).images
        before = draw()
        shard_llm(pipe.llm)
        results = {"pipeline": dict(diff=float(abs(draw() - before).max()), sharded=sharding.is_sharded(pipe.llm))}
        for name, config in (("llama", tiny_llama_config()), ("t5", tiny_t5_config())):
            llm = build(config)
            reference = copy.deepcopy(llm)
            total = sum(p.numel() for p in llm.parameters())
            # different inputs per rank, of different shapes: only weights are gathered, not activations
            batch = tokens(config.vocab_size, batch=2 + rank, length=5 + 3 * rank, seed=10 + rank)
            sharded = shard_llm(llm)
            assert sharded is llm and sharding.is_sharded(llm)
            last = encode_tokens(llm, batch).hidden_states
            several = encode_tokens(llm, batch, hidden_layer=LAYERS).hidden_states
            # more forwards: FSDP's per-iteration records must not pile up, with torch's reset_iter_state (Llama)
            # or, as on a torch without it (T5), with what the hook clears itself
            without_reset = mock.patch.object(type(llm), "reset_iter_state", None, create=True)
            with without_reset if name == "t5" else contextlib.nullcontext():
                for _ in range(3):
                    encode_tokens(llm, batch, hidden_layer=-2)
            order = torch.distributed.fsdp.fully_shard.state(llm)._comm_ctx.post_forward_order
            indices = [
                len(group._post_forward_indices)
                for m in llm.modules()
                if isinstance(m, torch.distributed.fsdp.FSDPModule)
                for group in torch.distributed.fsdp.fully_shard.state(m)._fsdp_param_groups
            ]
            results[name] = dict(
                total=total,
                local=sum(p.to_local().numel() for p in llm.parameters()),
                stored=sum(p._local_tensor.untyped_storage().nbytes() for p in llm.parameters()),
                kinds={type(p).__name__ for p in llm.parameters()},
                last_diff=_diff(last, encode_tokens(reference, batch).hidden_states),
                several_diff=_diff(several, encode_tokens(reference, batch, hidden_layer=LAYERS).hidden_states),
                several_shape=tuple(several.shape),
                post_forward_order=len(order),
                post_forward_indices=sum(indices),
                plan=llm_memory_plan(config, world, dtype_bytes=4),
            )
            if name == "llama":  # a connector fed the sharded LLM's features learns, under DDP like the trainer's
                torch.manual_seed(1)
                connector = TimestepAwareSemanticConnector(
                    width=16, layers=1, heads=2, num_latents=4, input_dim=32 * len(LAYERS), time_channel=8,
                    time_embed_dim=8,
                )  # fmt: skip
                ddp = torch.nn.parallel.DistributedDataParallel(connector)
                timesteps = torch.full((several.shape[0],), 500)
                ddp(several, timesteps).square().mean().backward()
                grads = [p.grad for p in connector.parameters()]
                results[name].update(
                    connector_grads=sum(g is not None and bool(g.abs().sum() > 0) for g in grads),
                    connector_params=len(grads),
                    grad_sum=sum(g.double().sum().item() for g in grads if g is not None),
                    llm_grads=sum(p.grad is not None for p in llm.parameters()),
                    features_need_grad=several.requires_grad,
                )
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_shard_the_llm_and_match_the_unsharded_model(tmp_path, tiny_sd, tiny_ella_file, tiny_t5):
    """Two gloo processes, each with its own (differently shaped) batch: a sharded Llama and a sharded T5
    encoder give the unsharded models' features, last layer and a list of layers through encode_tokens; each
    process stores half of the weights; a DDP connector on those features gets gradients, the LLM none; and an
    ELLA pipeline whose loaded LLM is sharded draws the same image as before on both ranks."""
    _spawn(_two_process_worker, 2, tmp_path, (tiny_sd, tiny_ella_file, tiny_t5))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["pipeline"] for r in ranks] == [dict(diff=0.0, sharded=True)] * 2
    for name in ("llama", "t5"):
        r0, r1 = ranks[0][name], ranks[1][name]
        for r in (r0, r1):
            assert r["kinds"] == {"DTensor"}, (name, r["kinds"])
            assert r["last_diff"] <= 1e-6 and r["several_diff"] <= 1e-6, (name, r)
            assert r["post_forward_order"] == 0 and r["post_forward_indices"] == 0, (name, r)
            assert 0.45 * r["total"] <= r["local"] <= 0.55 * r["total"], (name, r["local"], r["total"])
            # what a process stores (FSDP pads dim 0 to a multiple of 2) is what the plan predicts
            assert r["stored"] == r["plan"].sharded_bytes, (name, r["stored"], r["plan"])
            assert r["plan"].params == r["total"]
        assert r0["local"] + r1["local"] == r0["total"]
        assert r0["several_shape"] != r1["several_shape"]  # the ranks' inputs really differed
    assert ranks[0]["llama"]["several_shape"][-1] == 32 * len(LAYERS)
    for r in ranks:
        llama = r["llama"]
        assert llama["connector_grads"] == llama["connector_params"]
        assert llama["llm_grads"] == 0 and not llama["features_need_grad"]
    assert ranks[0]["llama"]["grad_sum"] == pytest.approx(ranks[1]["llama"]["grad_sum"], rel=1e-9)  # DDP averaged


def _two_nodes_worker(rank: int, world: int, port: int, out: Path) -> None:
    _init(rank, world, port)
    try:
        llm = build(tiny_llama_config())
        reference = copy.deepcopy(llm)
        batch = tokens(128, batch=2, length=4 + rank, seed=rank)
        shard_llm(llm, group_size=2)  # two "nodes" of two processes: sharded within each, replicated across
        diff = _diff(*(encode_tokens(m, batch, hidden_layer=LAYERS).hidden_states for m in (llm, reference)))
        mesh = next(llm.parameters()).device_mesh
        local = sum(p.to_local().numel() for p in llm.parameters())
        total = sum(p.numel() for p in reference.parameters())
        torch.save(dict(diff=diff, mesh=tuple(mesh.shape), local=local, total=total), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_four_processes_as_two_nodes_shard_within_each_node(tmp_path):
    """group_size=2 of 4 processes (HSDP): each half of a node's copy on each of its two processes, the
    all-gathers within the node; the features are still the unsharded model's."""
    _spawn(_two_nodes_worker, 4, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for r in ranks:
        assert r["mesh"] == (2, 2) and r["diff"] <= 1e-6
    assert ranks[0]["local"] + ranks[1]["local"] == ranks[0]["total"]
    assert ranks[0]["local"] == ranks[2]["local"]  # the other node's replica of the same shard


# --- one process ----------------------------------------------------------------------------------------------


def test_without_a_process_group_or_with_one_process_the_model_is_untouched():
    llm = build(tiny_llama_config())
    cls, params = type(llm), list(llm.parameters())
    assert not dist.is_initialized()
    assert shard_llm(llm) is llm
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        assert shard_llm(llm) is llm and shard_llm(llm, group_size=1) is llm
    finally:
        dist.destroy_process_group()
    assert type(llm) is cls and not sharding.is_sharded(llm)
    assert all(a is b and type(a) is nn.Parameter for a, b in zip(params, llm.parameters()))


def test_shard_group_size_is_a_divisor_of_the_world(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert sharding.shard_group_size(8) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert sharding.shard_group_size(16) == 8  # two nodes of eight: shard within each node
    assert sharding.shard_group_size(16, 16) == 16
    with pytest.raises(EllaError, match=r"shard group of 3 processes doesn't divide the 16"):
        sharding.shard_group_size(16, 3)


@pytest.mark.parametrize(
    ("config", "path", "embedding_unit"),
    [
        (tiny_llama_config(), "layers", True),
        (tiny_gpt2_config(), "h", True),
        (tiny_bert_config(), "encoder.layer", True),
        (tiny_t5_config(), "encoder.block", False),  # `shared` and `encoder.embed_tokens` share one weight
    ],
    ids=["llama", "gpt2", "bert", "t5"],
)
def test_the_block_finder_is_generic(config, path, embedding_unit):
    with torch.device("meta"):
        model = build(config)
    assert find_blocks(model) == list(model.get_submodule(path))
    units = sharding._units(model)
    assert units[-1] is model and (model.get_input_embeddings() in units) == embedding_unit


def test_a_model_without_a_block_list_is_refused():
    flat = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    mixed = nn.Module()
    mixed.layers = nn.ModuleList([nn.Linear(8, 8), nn.LayerNorm(8)])
    for model in (flat, mixed):
        with pytest.raises(EllaError, match=r"no nn.ModuleList of identical transformer blocks.*without --llm_fsdp"):
            find_blocks(model)


# --- the memory plan --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config", [tiny_llama_config(), tiny_t5_config(), tiny_bert_config()], ids=["llama", "t5", "bert"]
)
def test_memory_plan_counts_the_parameters_exactly(config):
    model = build(config)
    plan = llm_memory_plan(config, world_size=1, dtype_bytes=4)
    assert plan.params == sum(p.numel() for p in model.parameters())  # tied weights once (T5's shared)
    assert plan.replicated_bytes == plan.peak_bytes == plan.params * 4


def test_memory_plan_of_a_7b_llama_on_8_gpus():
    """Llama-2-7B's shape: 6,738,415,616 parameters with its lm_head, which ELLA doesn't load (it reads hidden
    states through AutoModel), so 32000 × 4096 fewer."""
    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )  # fmt: skip
    with torch.device("meta"):
        causal = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in causal.parameters()) == 6_738_415_616
    plan = llm_memory_plan(config, world_size=8)
    assert plan.params == 6_738_415_616 - 32000 * 4096 == 6_607_343_616
    assert plan.replicated_bytes == 2 * plan.params
    assert plan.sharded_bytes == pytest.approx(plan.replicated_bytes / 8, rel=1e-3)
    block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention, MLP, two RMSNorms
    assert plan.gathered_bytes == 2 * block and plan.root_bytes == 2 * 4096  # the embedding is a unit of its own
    assert plan.peak_bytes == plan.sharded_bytes + plan.root_bytes + 2 * plan.gathered_bytes  # two blocks in flight
    assert plan.summary() == "LLM 6.6B params: 13.2 GB per GPU replicated, 1.7 GB + 0.4 GB gathered sharded over 8"
    assert llm_memory_plan(config, world_size=1).summary() == "LLM 6.6B params: 13.2 GB per GPU replicated"


# --- accelerate launch configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "machines", "processes"), [("multi_gpu", 1, 8), ("multi_node", 2, 16)])
def test_accelerate_launch_configs_parse(name, machines, processes):
    """accelerate's own loader reads them, and `accelerate launch`'s checks turn them into a multi-GPU launch."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == DistributedType.MULTI_GPU and config.mixed_precision == "bf16"
    assert (config.num_machines, config.num_processes) == (machines, processes)
    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(path), "-m", "ella.cli", "train"])
    )
    assert args.multi_gpu and args.num_machines == machines and args.num_processes == processes
    assert args.mixed_precision == "bf16"
