"""Checkpoints that survive SIGKILL: written to a hidden temp directory, then renamed into place.

A checkpoint directory ``checkpoint-<step>`` holds

* accelerate's state (connector ``model.safetensors``, optimizer, lr scheduler, RNG states);
* ``ella.safetensors`` (the official single-file layout) and ``connector/`` (``save_pretrained``
  layout) — EMA weights when EMA is on, because those are the ones to use;
* ``ema.safetensors`` + ``ema.json`` (EMA shadow weights and step counters);
* ``progress-rank<r>.json`` per process: step, epoch and batches consumed in it, the noise
  counter and skipped-sample count — everything that makes a resumed run continue *exactly*.

Only complete directories ever carry the ``checkpoint-`` name, so ``latest`` can never pick a
half-written one; a leftover temp directory from a killed run is removed on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import EllaError
from ..io import atomic_dir, atomic_path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Progress:
    global_step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed by this process
    micro_steps: int = 0  # micro-batches consumed in all; seeds each batch's noise and timesteps
    samples_seen: int = 0
    skipped: int = 0  # corrupt / unreadable samples dropped so far


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_checkpoint(output_dir: str | Path, which: str) -> Path | None:
    """``latest`` (None if there is none yet: a fresh start) or an explicit checkpoint directory."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(which)
    if not path.is_dir():
        path = Path(output_dir) / which
    if not (path / "progress-rank0.json").is_file():
        raise EllaError(
            f"--resume_from_checkpoint {which}: not a checkpoint directory (no progress-rank0.json); "
            f"use 'latest' or one of {[p.name for p in list_checkpoints(output_dir)] or 'none yet'}"
        )
    return path


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def save_checkpoint(accelerator, output_dir: str | Path, progress: Progress, connector, ema, keep: int | None) -> Path:
    """Every process calls this; the main process renames the finished directory into place."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{progress.global_step}"
    tmp = output_dir / f".checkpoint-{progress.global_step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    write_json(tmp / f"progress-rank{accelerator.process_index}.json", asdict(progress))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export_connector(connector, ema, tmp)
        if ema is not None:
            save_ema(ema, tmp)
        if final.exists():  # the same step saved again (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, ema) -> Progress:
    accelerator.load_state(str(path))
    progress_file = path / f"progress-rank{accelerator.process_index}.json"
    if not progress_file.is_file():
        raise EllaError(
            f"{path} was written by fewer processes than this run has ({accelerator.num_processes}); "
            "resume with the same number of processes"
        )
    if ema is not None:
        load_ema(ema, path)
    return Progress(**json.loads(progress_file.read_text()))


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


def export_connector(connector, ema, directory: Path, training: dict | None = None) -> None:
    """``ella.safetensors`` + ``connector/`` in ``directory``; EMA weights if EMA is on.

    ``training`` (steps done, samples seen, why it stopped) goes to ``training.json`` beside them: a run
    stopped by a time limit says how far it got, so its weights can be reproduced by step count.
    """
    import copy

    model = connector
    if ema is not None:
        model = copy.deepcopy(connector)
        ema.copy_to(model.parameters())
    model.save_single_file(directory / "ella.safetensors")
    with atomic_dir(directory / "connector") as staging:
        model.save_pretrained(staging, safe_serialization=True)
    if training is not None:
        write_json(directory / "training.json", training)


def save_ema(ema, directory: Path) -> None:
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = {f"{i}": p.detach().contiguous().cpu() for i, p in enumerate(state.pop("shadow_params"))}
    state.pop("collected_params", None)
    with atomic_path(directory / "ema.safetensors") as tmp:
        save_file(shadow, str(tmp))
    write_json(directory / "ema.json", state)


def load_ema(ema, directory: Path) -> None:
    from safetensors.torch import load_file

    shadow = load_file(str(directory / "ema.safetensors"))
    state = json.loads((directory / "ema.json").read_text())
    state["shadow_params"] = [shadow[f"{i}"] for i in range(len(shadow))]
    ema.load_state_dict(state)
