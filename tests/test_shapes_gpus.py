"""The recipe under a launcher: N processes train what one process trains on the whole batch, agree on when
to stop, and fail together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from ella.cli import main as cli
from ella.errors import EllaError
from ella.shapes import models as M
from ella.shapes.evaluate import CEILING, COUNTS, EVAL_KINDS
from ella.shapes.recipe import Recipe, reproduce

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(*args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2`` on this machine (gloo over CPU processes, a free port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[k].float().flatten() for k in sorted(weights)])


def test_two_processes_under_torchrun_train_what_one_process_trains_and_share_every_stage(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    args = ["--smoke", "--out", str(two), "--variants", "tsc", "mlp"]
    done = torchrun("-m", "ella.cli", "shapes", "reproduce", *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert cli(["shapes", "reproduce", "--smoke", "--out", str(one), "--until", "base"]) == 0

    # The VAE and base loops: each global batch is drawn alike on both processes and split between them, and
    # DDP averages the halves' gradients, so the weights are one process's up to float rounding — far below
    # what training moved them (a wrong split, e.g. both halves the same, differs by as much as training moves).
    starts = {"vae": M.new_vae(0).state_dict(), "base/unet": M.new_unet(0).half().state_dict()}
    for part, start in starts.items():
        a = flat(load_file(one / part / "diffusion_pytorch_model.safetensors"))
        b = flat(load_file(two / part / "diffusion_pytorch_model.safetensors"))
        moved = (a - flat(start)).abs().mean()
        assert moved > 1e-4  # it trained
        assert (a - b).abs().mean() < 1e-3 * moved, part
        assert ((a - b).abs() > 1e-5).float().mean() < 0.01, part
    scale = [json.loads((run / "vae" / "config.json").read_text())["scaling_factor"] for run in (one, two)]
    assert scale[0] == pytest.approx(scale[1], rel=1e-4)
    assert json.loads((two / "base" / "training.json").read_text())["samples"] == 12  # 3 steps x global batch 4
    assert json.loads((two / "recipe.json").read_text())["processes"] == 2

    # The connectors trained in-process over both (global batch 4 = 2 per process, DDP), one variant after the
    # other, then the eval: every row scored once on each prompt kind, each item drawn by one of the processes.
    for variant in ("tsc", "mlp"):
        training = json.loads((two / f"connector-{variant}" / "training.json").read_text())
        assert (training["steps"], training["samples_seen"]) == (2, 8)
    scores = json.loads((two / "reproduce.json").read_text())["scores"]
    assert set(scores) == {CEILING, "base (weak encoder)", "+tsc", "+mlp"}
    items = [f"n{count}-shapes-00000.png" for count in COUNTS]  # smoke: one scene per object count
    for row in ("base-weak-encoder", "tsc", "mlp"):
        for kind in EVAL_KINDS:
            assert sorted(p.name for p in (two / "eval" / row / kind).glob("*.png")) == items
        assert set(scores[f"+{row}" if row != "base-weak-encoder" else "base (weak encoder)"]["kinds"]) == set(
            EVAL_KINDS
        )
    assert done.stdout.count('"scores"') == 1  # printed once, by rank 0


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from ella.shapes.gpus import barrier, join
    from ella.train.train import out_of_time

    with join("cpu") as group:
        late = out_of_time(time.monotonic() + (-1.0 if group.rank == 0 else 3600.0))  # only rank 0 is late
        print(f"rank {group.rank} of {group.world}: late={late}", flush=True)
        if sys.argv[1] == "fail" and group.rank == 1:
            raise RuntimeError("rank 1 fails")
        barrier(group)  # rank 0 waits here for a peer that, when failing, never comes
    """
)


def test_every_process_stops_when_one_is_past_the_deadline_and_a_failing_process_fails_the_run(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    ok = torchrun(str(script), "pass", timeout=180)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "rank 0 of 2: late=True" in ok.stdout and "rank 1 of 2: late=True" in ok.stdout
    failed = torchrun(str(script), "fail", timeout=180)  # returns (no hang at rank 0's barrier), and non-zero
    assert failed.returncode != 0
    assert "rank 1 fails" in failed.stderr


@pytest.mark.parametrize("field", ["vae_batch", "base_batch", "connector_batch"])
def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, monkeypatch, field):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as a launcher of three processes sets it; checked before joining
    recipe = Recipe.smoke(str(tmp_path / "run"))
    recipe.vae_batch = recipe.base_batch = recipe.connector_batch = 6
    setattr(recipe, field, 4)
    with pytest.raises(EllaError, match=f"{field}=4 is the global batch .* multiple of 3"):
        reproduce(recipe)
    assert not (tmp_path / "run").exists()
