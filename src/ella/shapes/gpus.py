"""The recipe's processes: this one alone, or one per GPU under a launcher — one mechanism for every stage.

``ella shapes reproduce`` runs in one process, or under a launcher::

    torchrun --nproc_per_node 4 -m ella.cli shapes reproduce ...      # or: accelerate launch --num_processes 4 -m ...

Under a launcher every process runs the whole recipe and :func:`join` puts them into the process group
the launcher described in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``; NCCL on GPUs, gloo on CPUs). Each stage is then data-parallel over the group: the
world's shards are split, files that must exist once are written by rank 0 behind a barrier, the
VAE and base loops wrap their model in DDP (:func:`data_parallel`), the connector trainer runs
in-process (accelerate finds the group already there) and the eval items are drawn by every rank and
scored by rank 0. Alone (no launcher) there is no group and every helper here is a no-op, so a
one-GPU or CPU run is exactly the plain loop.

A failing process exits non-zero and the launcher stops the others, so one rank's error fails the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import EllaError

#: How long a collective waits for the slowest process: the others wait at a barrier while rank 0
#: alone writes the latent cache or scores an eval row (minutes on the full recipe).
TIMEOUT = timedelta(minutes=60)

T = TypeVar("T")


@dataclass
class Group:
    """This process's place in the run: ``rank`` of ``world`` processes, on ``device``.

    ``world == 1`` (no launcher) means no process group and no collectives.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    store: Any = None  # the launcher's key-value store: joins, re-joins and the goodbye go through it
    generation: int = 0  # how many times this process has (re)created the group: a fresh key prefix each time

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """``WORLD_SIZE`` as the launcher set it (1 without a launcher), read without joining anything.

    The recipe's input checks use it (global batches must divide over the processes) before any work.
    """
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        raise EllaError(f"WORLD_SIZE={text!r} is not a number; launch with torchrun or accelerate launch") from None
    if world < 1:
        raise EllaError(f"WORLD_SIZE={world}: a run needs at least one process")
    return world


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    if text is None or not text.isdigit():
        raise EllaError(f"WORLD_SIZE is set but {name}={text!r} is not; launch with torchrun or accelerate launch")
    return int(text)


@contextlib.contextmanager
def join(device: str) -> Iterator[Group]:
    """This process's :class:`Group` for the duration of the run; the launcher's process group while inside.

    ``device`` is the run's device (``cpu``, ``cuda``, ``mps``); under a launcher each process of a CUDA
    run takes the GPU ``LOCAL_RANK`` names. On the way out every process says goodbye through the
    store (:func:`_leave_together`) before the group is torn down.
    """
    world = launched_world_size()
    if world == 1:
        yield Group(device=torch.device(device))
        return
    if dist.is_initialized():  # the group's lifetime (and its re-joins after the trainer) is the recipe's to manage
        raise EllaError("a torch.distributed group already exists in this process; run the recipe on its own")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if torch.device(device).type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            raise EllaError(
                f"process {local} of this machine needs GPU {local}, but {count} GPU(s) are visible; "
                f"launch at most {count} processes per machine"
            )
        torch.cuda.set_device(local)
        where, backend = torch.device("cuda", local), "nccl"
    else:
        where, backend = torch.device(device), "gloo"
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=TIMEOUT))
    group = Group(rank, world, where, backend, store)
    rejoin(group)
    finished = False
    try:
        yield group
        finished = True
    finally:
        _leave_together(dist.PrefixStore("ella-shapes/leave", store), rank, world, finished)
        if dist.is_initialized():
            dist.destroy_process_group()


def rejoin(group: Group) -> None:
    """(Re)create the process group if it is gone; a no-op alone or while it exists.

    accelerate's ``Accelerator.end_training`` destroys the default process group, so after the
    connector trainer (run in this process) returns, the recipe's later stages need it back. Every
    process calls this at the same point, so they all make generation ``n`` together.
    """
    if group.world == 1 or dist.is_initialized():
        return
    prefix = dist.PrefixStore(f"ella-shapes/group-{group.generation}", group.store)
    group.generation += 1
    dist.init_process_group(group.backend, store=prefix, rank=group.rank, world_size=group.world, timeout=TIMEOUT)


def _leave_together(store, rank: int, world: int, finished: bool) -> None:
    """Tear down only once every process is past its last collective.

    A process that closes its connections while a peer is still completing the last collective can
    make gloo abort that peer (SIGABRT, "terminate called without an active exception"). So each
    process checks in through the store (not a collective); finished ones wait for all. A failed one
    checks in and leaves at once, so its error is the one reported and nobody waits on it. Without a
    launcher's agent rank 0 serves the store, so it leaves last, once the others have seen everyone check in.
    """
    if store.add("checked-in", 1) == world:
        store.set("all-checked-in", "1")
    if not finished:
        return
    store.wait(["all-checked-in"])
    if rank == 0:
        store.wait(["all-left"])
    elif store.add("left", 1) == world - 1:
        store.set("all-left", "1")


def data_parallel(module: torch.nn.Module, group: Group) -> torch.nn.Module:
    """DDP over the group (averages gradients in backward); the module itself when alone."""
    if group.world == 1:
        return module
    return DistributedDataParallel(module, device_ids=[group.device.index] if group.device.type == "cuda" else None)


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier()


def from_main(group: Group, value: T) -> T:
    """Rank 0's ``value`` on every process: decisions (is this stage done?) that all must take alike."""
    if group.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(group: Group, items: Sequence[T]) -> list[T]:
    """This process's share of ``items``: every ``world``-th one from ``rank``, so any world size covers all once."""
    return list(items[group.rank :: group.world])


def local_slice(group: Group, batch: torch.Tensor) -> torch.Tensor:
    """This process's contiguous part of a global batch (its size divides by ``world``: ``Recipe.check``)."""
    per = batch.shape[0] // group.world
    return batch[group.rank * per : (group.rank + 1) * per]
