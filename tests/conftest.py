"""Shared fixtures: tiny random models saved in the real on-disk layouts (see tiny_models.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
sys.path.insert(0, str(Path(__file__).parent))

from ella import TimestepAwareSemanticConnector
from tiny_models import build_tiny_sd15, build_tiny_t5

T5_DIM = 16
UNET_DIM = 32  # the tiny UNet's cross_attention_dim


def tiny_connector(seed: int = 0, **overrides) -> TimestepAwareSemanticConnector:
    """A small TSC whose AdaLN projections are randomised too (they are zero at init, which hides bugs)."""
    config = dict(
        width=UNET_DIM, layers=2, heads=4, num_latents=8, input_dim=T5_DIM, time_channel=32, time_embed_dim=24
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = TimestepAwareSemanticConnector(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.normal_(0, 0.05)
    return model.eval()


def gen(seed: int) -> list[torch.Generator]:
    """One CPU generator: the seed of a one-image call."""
    return [torch.Generator().manual_seed(seed)]


def record(module) -> list:
    """(timestep, encoder_hidden_states) of every call, as the module saw them (after the condition feed's hook)."""
    seen = []
    module.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[1].clone(), kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True,
    )
    return seen


def plain_of(pipe):
    """The pipeline's VAE, UNet and scheduler in diffusers' own ``StableDiffusionPipeline``, with no text encoder
    (its callers pass ``prompt_embeds``): the reference that ELLA's pipelines are compared with."""
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=None,
        tokenizer=None,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    plain.set_progress_bar_config(disable=True)
    return plain


def rebuild(pipe, cls, clip_dir=None, **extra):
    """The fixture's parts as another pipeline kind (optionally with the base's CLIP for ella+clip)."""
    text_encoder = tokenizer = None
    if clip_dir is not None:
        text_encoder = CLIPTextModel.from_pretrained(clip_dir / "text_encoder").eval()
        tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    p = cls(
        vae=pipe.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        connector=pipe.connector,
        llm=pipe.llm,
        llm_tokenizer=pipe.llm_tokenizer,
        **extra,
    )
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture()
def run_cli(monkeypatch, capsys):
    """``ella ARGV...`` in this process (fast: no new interpreter): returns (exit code, stdout, stderr)."""
    import warnings

    from ella.cli import main

    # main() quiets libraries for the session (warning format, verbosity variables): undo that afterwards
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.setenv(var, os.environ.get(var, "error"))

    def call(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def assert_refused(code: int, err: str, *needles: str) -> None:
    """Exit 2 with exactly one ``ella: error:`` line holding every needle: what a user error must look like."""
    assert code == 2, err
    assert err.startswith("ella: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_sd(tiny_dir) -> Path:
    return build_tiny_sd15(tiny_dir / "sd15")


@pytest.fixture(scope="session")
def tiny_t5(tiny_dir) -> Path:
    return build_tiny_t5(tiny_dir / "flan-t5", d_model=T5_DIM)


@pytest.fixture(scope="session")
def tiny_ella_file(tiny_dir) -> Path:
    """A connector in the official single-file layout (tensors only, like the release), sized for the tiny models."""
    from safetensors.torch import save_file

    path = tiny_dir / "ella-tiny.safetensors"
    save_file(dict(tiny_connector(seed=1).state_dict()), str(path))
    return path


def tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5):
    """An fp32 CPU ELLA pipeline of the tiny models, loaded through the same code path as the real models."""
    import warnings

    from ella import load_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = load_pipeline(tiny_sd, tiny_ella_file, tiny_t5, device="cpu", dtype="float32")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture()
def pipe(tiny_sd, tiny_t5, tiny_ella_file):
    """A fresh :func:`tiny_pipeline` for each test."""
    return tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5)
