"""Errors the package raises on purpose: each carries one actionable message for the user.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class EllaError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class MissingModelError(EllaError):
    """A model (base, ELLA weights or LLM) that is neither on disk nor reachable on the Hub."""


class InvalidArgumentError(EllaError, ValueError):
    """A pipeline call argument out of its range; also a ValueError, as diffusers raises for bad arguments."""


class MissingExtraError(EllaError):
    """An optional dependency group (``pip install 'ella-diffusion[train]'`` …) that is not installed."""


#: What each optional group is for; pyproject.toml's [project.optional-dependencies] lists its packages.
EXTRAS = {
    "train": "training (`ella train`, `ella cache`, `ella shapes reproduce`)",
    "bench": "benchmark reports (`ella bench dpg score`)",
    "quant": "a quantised LLM (`--llm-quantization`)",
}


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` from optional group ``extra``, or say in one line which group to install.

    Inference and the shapes demo need only the core install; training and benchmark reports pull
    packages (tensorboard, datasets, webdataset, matplotlib …) that an inference user never needs.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingExtraError(
            f"{EXTRAS[extra]} needs {package!r}, which is not installed: pip install 'ella-diffusion[{extra}]'"
        ) from None
