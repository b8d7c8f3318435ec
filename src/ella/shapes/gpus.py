"""One process per GPU for the recipe's own loops (VAE, base), so ``reproduce`` stays one command.

The VAE and base loops are plain loops (DiT style), not the issue-4 trainer. On a machine with
several GPUs each runs data-parallel: ``run_on_gpus`` spawns one process per GPU, joins them into a
``torch.distributed`` group and calls the loop with ``(rank, world)``; ``data_parallel`` wraps the
model in DDP so gradients are averaged over the GPUs. With one process nothing is spawned and no
group exists, so a one-GPU or CPU run is exactly the plain loop. (The connector trainer has its own
multi-GPU path through accelerate and ``torchrun``: the recipe gives each variant in turn all the GPUs,
or, with ``parallel_variants``, several variants a GPU each.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta

import torch


def run_on_gpus(fn: Callable, processes: int, *args) -> None:
    """``fn(rank, world, *args)`` in ``processes`` spawned processes (in this one when ``processes <= 1``).

    ``fn`` must be a module-level function and ``args`` picklable (spawn, because CUDA can't be
    forked). A process that fails makes this raise, after the others are stopped.
    """
    if processes <= 1:
        fn(0, 1, *args)
        return
    torch.multiprocessing.start_processes(
        _entry, args=(processes, free_port(), fn, args), nprocs=processes, start_method="spawn"
    )


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    # Served by rank 0; waits up to 30 min (processes may finish their loops far apart).
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(minutes=30))
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
    finished = False
    try:
        fn(rank, world, *args)
        finished = True
    finally:
        _leave_together(store, rank, world, finished)
        dist.destroy_process_group()


def _leave_together(store, rank: int, world: int, finished: bool) -> None:
    """Tear down only once every process is past its last collective.

    A process that closes its connections while a peer is still completing the last collective can
    make gloo abort that peer (seen in CI: SIGABRT, "terminate called without an active exception").
    So each process checks in through the store (not a collective); finished ones wait for all. A
    failed one checks in and leaves at once, so its error is the one reported and nobody waits on it.
    Rank 0 serves the store, so it leaves last, once the others have seen everyone check in.
    """
    if store.add("checked-in", 1) == world:
        store.set("all-checked-in", "1")
    if not finished:
        return
    store.wait(["all-checked-in"])
    if rank == 0:
        if world > 1:
            store.wait(["all-left"])
    elif store.add("left", 1) == world - 1:
        store.set("all-left", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(device: str, rank: int) -> torch.device:
    """This process's device: its own GPU (``cuda:rank``) on a CUDA run, else ``device`` unchanged."""
    return torch.device(f"cuda:{rank}") if device.startswith("cuda") else torch.device(device)


def data_parallel(module: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    """DDP over the process group (averages gradients in backward); the module itself when alone."""
    if world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def gpu_ids() -> list[str]:
    """The visible GPUs' ids as ``CUDA_VISIBLE_DEVICES`` names them (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def pin_gpu(gpu: str | None) -> None:
    """Give this fresh spawned process one GPU (``gpu`` from the parent's :func:`gpu_ids`).

    Must run before anything touches CUDA here: the driver reads ``CUDA_VISIBLE_DEVICES`` once.
    Used to give each connector variant its own GPU, so three small runs don't queue on one.
    """
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
