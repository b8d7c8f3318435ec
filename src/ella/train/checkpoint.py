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

A directory that holds a run is only ever continued, never started over (:func:`check_output_dir`),
and a damaged checkpoint is an error naming the file, never a silent partial resume.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file, save_file

from ..errors import EllaError
from ..io import atomic_dir, atomic_path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

#: What a finished (or time-limited) run leaves beside its checkpoints: the weights users load and its record.
RUN_FILES = ("ella.safetensors", "connector", "training.json")


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


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a directory this process can write into (created if missing), or one line naming ``flag``.

    Checked before any model loads: a typo or a read-only disk then costs a second, not the first
    checkpoint interval.
    """
    out = Path(path).expanduser()
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise EllaError(f"{flag} {out} is not writable: {existing} is a file, not a directory; pick a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise EllaError(f"{flag} {out} is not writable ({err.strerror}); pick a directory you can write to") from None
    return out


def check_output_dir(path: str | os.PathLike, resume: str | None) -> Path:
    """``--output_dir``, writable, and not another run's unless this run continues it.

    A directory holding a run (checkpoints, exported weights, ``training.json``) is only ever
    continued with ``--resume_from_checkpoint``: starting afresh there would replace that run's
    checkpoints and weights. An empty or new directory starts fresh, with or without ``latest``.
    """
    out = writable_dir(path, "--output_dir")
    checkpoints = list_checkpoints(out)
    held = [p.name for p in checkpoints[-1:]] + [name for name in RUN_FILES if (out / name).exists()]
    if held and not resume:
        raise EllaError(
            f"--output_dir {out} already holds a training run ({', '.join(held)}); continue it with "
            "--resume_from_checkpoint latest, or pick a new --output_dir"
        )
    if held and resume == "latest" and not checkpoints:
        raise EllaError(
            f"--output_dir {out} holds a run's weights ({', '.join(held)}) but no checkpoint to continue "
            "from; pick a new --output_dir"
        )
    return out


def write_json(path: Path, data: dict) -> None:
    """Strict JSON (no NaN or Infinity: other readers reject them), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


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


class Resume(NamedTuple):
    """A checkpoint to resume from, its small files already read and checked (see :func:`read_checkpoint`)."""

    path: Path
    progress: Progress
    rng_file: Path
    rng: dict  # accelerate's RNG states of this process, to check that load_state applied them


def read_checkpoint(path: Path, process_index: int, num_processes: int) -> Resume:
    """This process's progress record and RNG states from ``path``: read before any model loads, so a
    damaged checkpoint costs a second. The weights and optimizer follow in :func:`load_checkpoint`."""
    progress_file = path / f"progress-rank{process_index}.json"
    if not progress_file.is_file():
        raise EllaError(
            f"{path} was written by fewer processes than this run has ({num_processes}); "
            "resume with the same number of processes"
        )
    rng_file = path / f"random_states_{process_index}.pkl"
    return Resume(path, read_progress(progress_file), rng_file, read_rng_states(rng_file))


def load_checkpoint(accelerator, resume: Resume, ema) -> Progress:
    """Restore everything a resumed run needs to repeat the uninterrupted one exactly, or say which file is damaged.

    A damaged checkpoint is an error, never a silent partial resume: training on with a fresh RNG
    stream or a different data position would break the promise that resuming is bit-identical.
    """
    try:
        accelerator.load_state(str(resume.path))
    except Exception as err:  # a truncated or foreign weight / optimizer file: name the checkpoint
        raise EllaError(f"could not load checkpoint {resume.path} ({_first_line(err)}){DAMAGED}") from err
    # accelerate skips RNG states it cannot apply, with only an info log; check that they took
    if not rng_restored(resume.rng):
        raise EllaError(f"{resume.rng_file} holds RNG states that could not be restored{DAMAGED}")
    if ema is not None:
        load_ema(ema, resume.path)
    return resume.progress


DAMAGED = (
    "; resuming must repeat the interrupted run exactly, so pass an earlier checkpoint to "
    "--resume_from_checkpoint, or start afresh in a new --output_dir"
)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def read_progress(file: Path) -> Progress:
    """A checkpoint's ``progress-rank<r>.json``: every :class:`Progress` count, each a whole number >= 0."""
    names = {f.name for f in dataclasses.fields(Progress)}
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise EllaError(f"{file} is not valid JSON ({_first_line(err)}){DAMAGED}") from None
    if not isinstance(data, dict) or data.keys() != names or not all(type(v) is int and v >= 0 for v in data.values()):
        raise EllaError(
            f"{file} is not a training progress record (expected the counts {', '.join(sorted(names))}, "
            f"each a whole number >= 0){DAMAGED}"
        )
    return Progress(**data)


def read_rng_states(file: Path) -> dict:
    """accelerate's saved RNG states (Python, NumPy, torch), read as accelerate reads them."""
    try:
        states = accelerate_load(file)
    except Exception as err:  # missing, truncated or not a torch pickle at all
        raise EllaError(f"{file} is not a readable RNG state ({_first_line(err)}){DAMAGED}") from None
    needed = {"random_state", "numpy_random_seed", "torch_manual_seed"}
    if not isinstance(states, dict) or not needed <= states.keys():
        raise EllaError(f"{file} is not an RNG state record (expected {', '.join(sorted(needed))}){DAMAGED}")
    return states


def rng_restored(states: dict) -> bool:
    """Do the global RNGs now hold ``states``? (After ``load_state``, which may have skipped them.)"""
    try:
        saved_np, now_np = states["numpy_random_seed"], np.random.get_state()
        same = (
            random.getstate() == states["random_state"]
            and torch.equal(torch.get_rng_state(), states["torch_manual_seed"])
            and saved_np[0] == now_np[0]
            and np.array_equal(saved_np[1], now_np[1])
            and tuple(saved_np[2:]) == tuple(now_np[2:])
        )
        if same and torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            # one state per visible GPU; a machine with a different GPU count restores the ones both have
            same = all(map(torch.equal, states["torch_cuda_manual_seed"], torch.cuda.get_rng_state_all()))
        return bool(same)
    except Exception:  # a state of the wrong type or shape: it cannot have been restored
        return False


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
    state = ema.state_dict()
    shadow = {f"{i}": p.detach().contiguous().cpu() for i, p in enumerate(state.pop("shadow_params"))}
    state.pop("collected_params", None)
    with atomic_path(directory / "ema.safetensors") as tmp:
        save_file(shadow, str(tmp))
    write_json(directory / "ema.json", state)


def load_ema(ema, directory: Path) -> None:
    try:
        shadow = load_file(str(directory / "ema.safetensors"))
        state = json.loads((directory / "ema.json").read_text())
        state["shadow_params"] = [shadow[f"{i}"] for i in range(len(shadow))]
        ema.load_state_dict(state)
    except Exception as err:  # missing (a run without --use_ema), truncated, or for another connector
        raise EllaError(
            f"could not load the EMA weights of {directory} ({_first_line(err)}); resume with the --use_ema "
            f"setting the run was started with{DAMAGED}"
        ) from err


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: pipe.load_lora_weights(dir) finds it
LORA_STATE = "unet_lora.safetensors"  # a checkpoint's copy, in peft's own key layout (loads back without conversion)


def export_unet_lora(unet, directory: Path) -> Path:
    """``pytorch_lora_weights.safetensors`` in ``directory`` (diffusers' LoRA layout, what ``load_lora_weights``
    reads), written into a staging folder and renamed into place."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=directory))
    try:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(staging, unet_lora_layers=layers)
        os.replace(staging / LORA_FILE, directory / LORA_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory / LORA_FILE


def register_lora_state_hooks(accelerator, unet) -> None:
    """Checkpoints hold the UNet's LoRA only: accelerate would otherwise write the whole frozen UNet (3.4 GB for
    SD1.5) into every checkpoint. Saving writes the LoRA and takes the UNet off accelerate's list; loading puts
    the LoRA back into the (already LoRA-equipped) UNet."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    def is_unet(model) -> bool:
        return accelerator.unwrap_model(model) is unet

    def save(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if is_unet(models[i]):
                state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(unet).items()}
                save_file(state, str(Path(output_dir) / LORA_STATE))
                weights.pop(i)

    def load(models, input_dir):
        for i in reversed(range(len(models))):
            if is_unet(models[i]):
                set_peft_model_state_dict(unet, load_file(str(Path(input_dir) / LORA_STATE)))
                models.pop(i)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
