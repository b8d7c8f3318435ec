"""Where models come from: hub ids, local directories and single files — and saying clearly what is missing.

Every model this package loads (the base diffusion model, the ELLA connector weights, the LLM, a VQA
model) can be a hub id, a local directory in the usual layout or a single file. When one is neither
on disk nor in the Hugging Face cache and the Hub can't be reached, the user gets one paragraph
naming it and the command that fetches it — never a traceback from deep inside a loader. A path
that looks local but does not exist is reported as such, not sent to the Hub.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache

from .errors import EllaError, MissingModelError

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_ELLA_REPO = "QQGYLab/ELLA"
DEFAULT_ELLA_FILE = "ella-sd1.5-tsc-t5xl.safetensors"
DEFAULT_LLM = "google/flan-t5-xl"

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# What to run on a machine with internet, per kind of model; {id} is the hub id asked for.
FETCH_COMMANDS = {
    "base model": 'hf download {id} --exclude "v1-5-*" --exclude "*.ckpt" --exclude "*.bin" --exclude "*non_ema*" '
    '--exclude "*.fp16.*"',
    "ELLA connector weights": "hf download {id}",
    "LLM": 'hf download {id} --exclude "*.bin" --exclude "*.h5" --exclude "*.msgpack"',
    # the tokenizer alone (a single-file LLM's): JSON files and the sentencepiece model, no weights
    "LLM tokenizer": 'hf download {id} --include "*.json" --include "*.model"',
    "VQA model": 'hf download {id} --exclude "*.bin" --exclude "*.h5"',
}
FLAGS = {
    "base model": "--base DIR",
    "ELLA connector weights": "--ella DIR",
    "LLM": "--llm DIR",
    "LLM tokenizer": "--llm-tokenizer DIR",
    "VQA model": "--vqa blip:DIR (or vlm:DIR)",
}


def split_repo_file(ident: str) -> tuple[str, str | None]:
    """``owner/repo/file.safetensors`` -> ``("owner/repo", "file.safetensors")``; anything else -> ``(ident, None)``."""
    if ident.endswith(SINGLE_FILE_SUFFIXES) and ident.count("/") >= 2:
        repo, _, filename = ident.rpartition("/")
        return repo, filename
    return ident, None


def looks_local(ident: str | os.PathLike) -> bool:
    """A path the user meant as local (``./x``, ``/x``, ``~/x``, ``a/b/c``), not a hub id (``owner/name``).

    Such a path that does not exist is a typo to report as one, not a model to download.
    """
    text = str(ident)
    if isinstance(ident, os.PathLike) or text.startswith((".", "/", "~")) or "\\" in text:
        return True
    return text.count("/") > 1 and split_repo_file(text)[1] is None


def missing_model_message(what: str, ident: str, detail: str = "", flags: dict[str, str] | None = None) -> str:
    """The one paragraph a user reads when a model can't be found; names it and how to fetch it."""
    if looks_local(ident):
        return f"{what} {ident!r}: no such file or directory"
    offline = hub_offline()
    repo, filename = split_repo_file(ident.split(":")[0])
    if filename:
        fetch = f"hf download {repo} {filename}"
    else:
        fetch = FETCH_COMMANDS.get(what, "hf download {id}").format(id=repo)
    flag = (flags or FLAGS).get(what)
    return (
        f"Missing {what}: {ident!r} is not a local path and is not in the Hugging Face cache, and the Hub "
        f"{'is disabled (HF_HUB_OFFLINE=1)' if offline else 'could not be reached'}. "
        f"On a machine with internet run `{fetch}` (it fills ~/.cache/huggingface, which you can copy here), "
        f"or add `--local-dir DIR` to it and pass that directory"
        + (f" with {flag}" if flag else "")
        + "."
        + (f" ({detail})" if detail else "")
    )


def is_local(ident: str | os.PathLike) -> bool:
    """Is ``ident`` something on this disk (then its real load errors are reported, not "missing")?"""
    return Path(ident).expanduser().exists()


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE=1``: name missing models up front instead of letting loaders time out one by one."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def in_cache(ident: str, probe: str) -> bool:
    """Is hub repo ``ident`` (or ``repo/file.safetensors``) in the local HF cache? No network."""
    ident, filename = split_repo_file(ident)
    try:
        return isinstance(try_to_load_from_cache(ident, filename or probe), str)
    except Exception:  # an invalid repo id is not in the cache either
        return False


def check_offline(models: list[tuple[str, str, str]], flags: dict[str, str] | None = None) -> None:
    """Offline, name *every* missing model at once (``(what, ident, probe_file)`` triples) before
    spending minutes loading the others."""
    if not hub_offline():
        return
    missing = [
        missing_model_message(what, ident, flags=flags)
        for what, ident, probe in models
        if not is_local(ident) and not in_cache(ident, probe)
    ]
    if missing:
        raise MissingModelError("\n".join(missing))


@contextlib.contextmanager
def loading(what: str, ident: str) -> Iterator[None]:
    """Turn a loader's failure to *find* a remote model into a MissingModelError paragraph.

    Local paths keep their real errors (a corrupt local file is not "missing"), but get the path
    named in front so the user knows which of the three models failed.
    """
    try:
        yield
    except EllaError:
        raise
    except Exception as err:  # loaders raise OSError, HfHubHTTPError, ValueError, ... for "not found"
        if is_local(ident):
            raise EllaError(f"could not load the {what} from {ident}: {type(err).__name__}: {err}") from err
        raise MissingModelError(missing_model_message(what, str(ident), f"{type(err).__name__}")) from None


def resolve_file(path_or_repo: str | os.PathLike, filename: str | None = None, *, what: str = "file") -> Path:
    """A local file, ``dir`` + ``filename``, ``repo`` + ``filename`` or ``repo/filename.safetensors``."""
    local = Path(path_or_repo).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if filename is None:
            raise EllaError(f"{local} is a directory; name the file inside it (e.g. {DEFAULT_ELLA_FILE})")
        if not (local / filename).is_file():
            raise EllaError(f"{local / filename} does not exist")
        return local / filename
    ident = str(path_or_repo)
    if filename is None and ident.endswith(SINGLE_FILE_SUFFIXES):
        ident, filename = split_repo_file(ident)
        if filename is None:
            raise EllaError(f"{ident} does not exist (expected a local file or REPO_OWNER/REPO/FILE.safetensors)")
    if filename is None:
        raise EllaError(f"{ident!r} is a hub repo id: name the file too, e.g. {ident}/{DEFAULT_ELLA_FILE}")
    with loading(what, f"{ident}/{filename}"):
        return Path(hf_hub_download(ident, filename))


def ella_ident(ella: str | os.PathLike) -> str:
    """``QQGYLab/ELLA`` alone means the released SD1.5 file in it."""
    return f"{DEFAULT_ELLA_REPO}/{DEFAULT_ELLA_FILE}" if str(ella) == DEFAULT_ELLA_REPO else str(ella)


# What diffusers reads from a config repo to build a pipeline around a single file: configs, no weights.
CONFIG_PATTERNS = ["*.json", "*.txt", "**/*.json", "**/*.txt", "**/*.model"]


def default_base_config(base: str | os.PathLike) -> str:
    """The diffusers repo whose configs fit single file ``base``, as diffusers infers it from the tensor names
    and shapes (SD 1.x -> SD 1.5). Reads only the safetensors header; SD 1.5 for anything it can't read."""
    try:  # heavy imports, needed only for single-file bases
        import torch
        from diffusers.loaders.single_file_utils import fetch_diffusers_config
        from safetensors import safe_open

        with safe_open(str(Path(base).expanduser()), "pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
        return fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    except Exception:  # .ckpt (pickle), a hub file, an unknown layout
        return DEFAULT_BASE


def base_config_dir(base: str | os.PathLike, config: str | os.PathLike | None = None) -> str:
    """The local diffusers-layout directory whose component configs build single file ``base``.

    ``config`` is such a directory or a hub id (default: inferred from the file, SD 1.5 for SD 1.x);
    a hub id's JSON/TXT files come from the HF cache or the Hub. Missing offline: one MissingModelError.
    """
    config = str(config) if config else default_base_config(base)
    local = Path(config).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise EllaError(f"--base-config {config} is not a diffusers pipeline directory (no model_index.json)")
        return str(local)
    reason = "its model_index.json or a component folder is missing"
    try:
        path = Path(snapshot_download(config, allow_patterns=CONFIG_PATTERNS))
        index = json.loads((path / "model_index.json").read_text())
        complete = all((path / name).is_dir() for name, value in index.items() if isinstance(value, list) and value[0])
    except Exception as err:  # LocalEntryNotFoundError offline, connection / HTTP errors, an invalid repo id
        complete, reason = False, type(err).__name__
    if not complete:
        raise MissingModelError(
            f"Missing base model config: the single checkpoint file {str(base)!r} needs the component configs "
            f"(JSON/TXT files, no weights) of the diffusers repo {config!r}, which is not in the Hugging Face cache, "
            f"and the Hub {'is disabled (HF_HUB_OFFLINE=1)' if hub_offline() else 'could not be reached'} ({reason}). "
            f'On a machine with internet run `hf download {config} --include "*.json" "*.txt"` (it fills '
            "~/.cache/huggingface, which you can copy here), or pass a diffusers directory of the same model family "
            "with --base-config DIR (base_config= in Python)."
        )
    return str(path)
