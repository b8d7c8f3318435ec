"""Finding models: hub ids, local directories and single files — and saying clearly what is missing.

Every model this package loads (the base diffusion model, the ELLA connector weights, the LLM) can
be a hub id, a local directory in the usual layout or a single file. When one is neither on disk
nor in the Hugging Face cache and the Hub can't be reached, the user gets one paragraph naming it
and the command that fetches it — never a traceback from deep inside a loader.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

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
    "VQA model": 'hf download {id} --exclude "*.bin" --exclude "*.h5"',
}
FLAGS = {"base model": "--base DIR", "ELLA connector weights": "--ella DIR", "LLM": "--llm DIR",
         "VQA model": "--vqa blip:DIR (or vlm:DIR)"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash mid-write then leaves the old file (or nothing), never a truncated one. The result gets
    the permissions a plain ``open(path, "w")`` would give (``mkstemp`` makes owner-only files, which
    would lock other users out of shared weights and results).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_path` for directories: fill the yielded staging directory; it replaces ``path`` on success.

    A leftover staging directory of a killed run is cleared first, so a crash never leaves a
    half-written directory under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def split_repo_file(ident: str) -> tuple[str, str | None]:
    """``owner/repo/file.safetensors`` -> ``("owner/repo", "file.safetensors")``; anything else -> ``(ident, None)``."""
    if ident.endswith(SINGLE_FILE_SUFFIXES) and ident.count("/") >= 2:
        repo, _, filename = ident.rpartition("/")
        return repo, filename
    return ident, None


def missing_model_message(what: str, ident: str, detail: str = "", flags: dict[str, str] | None = None) -> str:
    """The one paragraph a user reads when a model can't be found; names it and how to fetch it."""
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
    return Path(ident).expanduser().exists()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def in_cache(ident: str, probe: str) -> bool:
    """Is hub repo ``ident`` (or ``repo/file.safetensors``) in the local HF cache? No network."""
    from huggingface_hub import try_to_load_from_cache

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
    missing = [missing_model_message(what, ident, flags=flags) for what, ident, probe in models
               if not is_local(ident) and not in_cache(ident, probe)]
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
    from huggingface_hub import hf_hub_download

    with loading(what, f"{ident}/{filename}"):
        return Path(hf_hub_download(ident, filename))


def ella_ident(ella: str | os.PathLike) -> str:
    """``QQGYLab/ELLA`` alone means the released SD1.5 file in it."""
    return f"{DEFAULT_ELLA_REPO}/{DEFAULT_ELLA_FILE}" if str(ella) == DEFAULT_ELLA_REPO else str(ella)


def load_connector(ella: str | os.PathLike = f"{DEFAULT_ELLA_REPO}/{DEFAULT_ELLA_FILE}", torch_dtype=None):
    """The connector from an official single file, a ``save_pretrained`` directory or the Hub."""
    from .connector import TimestepAwareSemanticConnector

    local = Path(ella).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        with loading("ELLA connector weights", str(ella)):
            return TimestepAwareSemanticConnector.from_pretrained(local, dtype=torch_dtype)
    if local.is_dir():  # e.g. the --local-dir of `hf download QQGYLab/ELLA <file>`
        files = sorted(local.glob("*.safetensors"))
        if not (local / DEFAULT_ELLA_FILE).is_file() and len(files) != 1:
            raise EllaError(
                f"{local} has no config.json and {len(files)} .safetensors files; pass the file itself"
                + (f" (one of: {', '.join(f.name for f in files[:6])})" if files else "")
            )
        ella = local / DEFAULT_ELLA_FILE if (local / DEFAULT_ELLA_FILE).is_file() else files[0]
    else:
        ella = ella_ident(ella)
    return TimestepAwareSemanticConnector.from_single_file(ella, torch_dtype=torch_dtype)


# ----------------------------------------------------------------------------------- schedulers

SCHEDULER_ALIASES = {
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def scheduler_class(name: str) -> tuple[type, dict]:
    """``(diffusers scheduler class, config overrides)`` for an alias (``dpm++``, ``euler_a`` ...) or class name."""
    import diffusers

    cls_name, extra = SCHEDULER_ALIASES.get(name, (name, {}))
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise EllaError(
            f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULER_ALIASES)} or a diffusers class name "
            "such as EulerDiscreteScheduler"
        )
    return cls, extra


def make_scheduler(name: str, base_config):
    """The named scheduler on the base model's scheduler config (betas, timestep spacing ...)."""
    cls, extra = scheduler_class(name)
    return cls.from_config(base_config, **extra)


# --------------------------------------------------------------------------------- the pipeline


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """fp16 on CUDA (what the release ran), fp32 elsewhere (CPU half precision is slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    table = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        raise EllaError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}")
    return table[dtype]


# What diffusers reads from a config repo to build a pipeline around a single file: configs, no weights.
CONFIG_PATTERNS = ["*.json", "*.txt", "**/*.json", "**/*.txt", "**/*.model"]


def default_base_config(base: str | os.PathLike) -> str:
    """The diffusers repo whose configs fit single file ``base``, as diffusers infers it from the tensor names
    and shapes (SD 1.x -> SD 1.5). Reads only the safetensors header; SD 1.5 for anything it can't read."""
    try:
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
    from huggingface_hub import snapshot_download

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


def load_base(pipeline_cls, base: str | os.PathLike, scheduler: str | None, base_config=None, **components):
    """``pipeline_cls`` from a diffusers dir / hub id or a single checkpoint file, with ``scheduler``.

    A single file takes its component configs from ``base_config`` (see :func:`base_config_dir`).
    """
    with loading("base model", str(base)):
        if str(base).endswith(SINGLE_FILE_SUFFIXES):
            config = base_config_dir(base, base_config)
            pipe = pipeline_cls.from_single_file(str(base), config=config, **components)
        else:
            pipe = pipeline_cls.from_pretrained(base, **components)
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe


def load_pipeline(
    base: str | os.PathLike = DEFAULT_BASE,
    ella: str | os.PathLike = DEFAULT_ELLA_REPO,
    llm: str | os.PathLike = DEFAULT_LLM,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    llm_dtype: str | torch.dtype | None = None,
    scheduler: str | None = "dpm++",
    max_length: int = 128,
    flexible: bool = False,
    hidden_layer: int | None = None,
    base_config: str | os.PathLike | None = None,
    kind: str = "txt2img",
    mode: str = "ella",
    controlnet: str | os.PathLike | None = None,
):
    """Assemble an ELLA pipeline (:class:`~ella.pipelines.EllaStableDiffusionPipeline` by default) from three
    independent sources.

    ``base`` is a diffusers directory / hub id or a single ``.safetensors``/``.ckpt`` checkpoint
    (whose component configs come from ``base_config``: a diffusers directory or hub id, by default
    the repo diffusers infers from the file, e.g. SD 1.5 for SD 1.x);
    ``ella`` an official single file, ``save_pretrained`` directory or hub id; ``llm`` any HF
    encoder or decoder-only LM. The default scheduler is DPM-Solver++ multistep, as in the
    official ``inference.py``.

    A connector with a pooling head (trained for an SDXL-style UNet) gives the SDXL pipelines.
    ``kind``: ``txt2img``, ``img2img``, ``inpaint``, ``controlnet`` or ``controlnet-img2img`` (with
    ``controlnet``, a diffusers ControlNet dir or hub id). ``mode="ella+clip"`` also loads the base's
    CLIP text encoder and tokenizer (for trigger words and textual inversions); in ``ella`` mode
    they are not loaded (ELLA replaces them).
    """
    from .pipelines import PIPELINE_KINDS, check_mode
    from .text import load_llm

    if kind not in PIPELINE_KINDS:
        raise EllaError(f"unknown pipeline kind {kind!r}; use one of {', '.join(PIPELINE_KINDS)}")
    check_mode(mode)
    if bool(controlnet) != kind.startswith("controlnet"):
        raise EllaError(f"pipeline kind {kind!r} {'needs' if kind.startswith('controlnet') else 'takes no'} controlnet")

    device = device or default_device()
    dtype = resolve_dtype(dtype, device)
    check_offline([("ELLA connector weights", ella_ident(ella), DEFAULT_ELLA_FILE), ("LLM", str(llm), "config.json"),
                   ("base model", str(base), "model_index.json")]
                  + ([("ControlNet", str(controlnet), "config.json")] if controlnet else []))
    if str(base).endswith(SINGLE_FILE_SUFFIXES):  # a missing config fails now, not after loading the LLM
        base_config = base_config_dir(base, base_config)
    # The release ran T5 in fp16 on GPU and was trained on those features; CPU falls back to fp32.
    llm_dtype = resolve_dtype(llm_dtype, device)
    connector = load_connector(ella, torch_dtype=dtype)
    llm_model, llm_tokenizer = load_llm(llm, dtype=llm_dtype)
    common = dict(
        connector=connector,
        llm=llm_model,
        llm_tokenizer=llm_tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        condition_mode=mode,
        dtype=dtype,
    )
    # A connector with a pooling head was trained for an SDXL-style UNet (pooled text embedding + time ids).
    xl = getattr(connector.config, "pooled_dim", None) is not None
    if mode == "ella":  # ELLA replaces CLIP: don't load it
        common.update(text_encoder=None, tokenizer=None)
        if xl:
            common.update(text_encoder_2=None, tokenizer_2=None)
    if controlnet:
        from diffusers import ControlNetModel

        with loading("ControlNet", str(controlnet)):
            common["controlnet"] = ControlNetModel.from_pretrained(controlnet, torch_dtype=dtype)
    if xl:
        from .pipelines import PIPELINE_KINDS_XL

        if kind not in PIPELINE_KINDS_XL:
            raise EllaError(f"pipeline kind {kind!r} is not available for SDXL; use one of {', '.join(PIPELINE_KINDS_XL)}")
        del common["safety_checker"], common["requires_safety_checker"]  # SDXL pipelines have neither
    pipe = load_base((PIPELINE_KINDS_XL if xl else PIPELINE_KINDS)[kind], base, scheduler, base_config, **common)
    pipe.register_to_config(llm_max_length=max_length, llm_flexible=flexible, llm_hidden_layer=hidden_layer)
    return pipe.to(device)


def load_plain_pipeline(
    base: str | os.PathLike = DEFAULT_BASE,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    scheduler: str | None = "dpm++",
):
    """The plain diffusers baseline (CLIP text encoder), loaded like :func:`load_pipeline` loads ours."""
    from diffusers import StableDiffusionPipeline

    device = device or default_device()
    dtype = resolve_dtype(dtype, device)
    check_offline([("base model", str(base), "model_index.json")])
    pipe = load_base(StableDiffusionPipeline, base, scheduler, safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False, dtype=dtype)
    return pipe.to(device)
