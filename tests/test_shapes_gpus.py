"""The recipe's data-parallel loops: N processes with DDP train exactly what one process does on the whole batch."""

from __future__ import annotations

import pytest
import torch

from ella.errors import EllaError
from ella.shapes.gpus import data_parallel, run_on_gpus
from ella.shapes.recipe import Recipe, reproduce

STEPS = 3


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)


def _train(rank: int, world: int, out) -> None:
    """A few SGD steps of a linear model on this process's half of a fixed batch."""
    from safetensors.torch import save_file

    torch.manual_seed(0)  # identical replicas, as the recipe's loops make them
    model = torch.nn.Linear(5, 3)
    step = data_parallel(model, world, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    x, y = x[rank::world], y[rank::world]
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(step(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}-of-{world}.safetensors")
    )


def test_two_processes_train_the_same_weights_as_one_process_on_the_whole_batch(tmp_path):
    from safetensors.torch import load_file

    run_on_gpus(_train, 2, tmp_path)  # two spawned CPU processes, gloo, DDP
    run_on_gpus(_train, 1, tmp_path)  # in this process, no group
    alone = load_file(tmp_path / "rank0-of-1.safetensors")
    first, second = (load_file(tmp_path / f"rank{r}-of-2.safetensors") for r in (0, 1))
    torch.manual_seed(0)
    start = torch.nn.Linear(5, 3)
    assert not torch.allclose(start.weight, alone["weight"])  # it trained
    for name in alone:
        assert torch.equal(first[name], second[name])  # replicas stay identical
        # DDP averages the halves' gradients = the gradient of the whole batch's mean loss
        torch.testing.assert_close(first[name], alone[name], rtol=1e-5, atol=1e-6)


def _clock(rank: int, world: int, out) -> None:
    import time

    from ella.train.train import out_of_time

    deadline = time.monotonic() + (-1.0 if rank == 0 else 3600.0)  # only rank 0 is out of time
    (out / f"past{rank}").write_text(str(out_of_time(deadline)))


def test_a_deadline_stops_every_process_when_any_one_is_past_it(tmp_path):
    run_on_gpus(_clock, 2, tmp_path)
    assert [(tmp_path / f"past{r}").read_text() for r in (0, 1)] == ["True", "True"]
    from ella.train.train import out_of_time

    assert out_of_time(None) is False


def test_a_failing_process_fails_the_run(tmp_path):
    with pytest.raises(Exception, match="rank"):
        run_on_gpus(_fail, 2)


def _fail(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError(f"rank {rank} fails")


@pytest.mark.parametrize("field", ["vae_batch", "base_batch"])
def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, field):
    recipe = Recipe.smoke(str(tmp_path / "run"))
    recipe.processes = 3
    recipe.vae_batch = recipe.base_batch = 6
    setattr(recipe, field, 4)
    with pytest.raises(EllaError, match=f"{field}=4 is the global batch .* multiple of 3"):
        reproduce(recipe)
    assert not (tmp_path / "run").exists()
