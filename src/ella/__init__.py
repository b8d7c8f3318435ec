"""ELLA (Efficient Large Language Model Adapter, Hu et al. 2024) for diffusers.

Public surface: the connector, LLM text features, the pipelines and the loader. They are exported
at the top level — lazily, so ``ella --help`` doesn't pay for importing diffusers — and so that
diffusers' ``model_index.json`` entry ``["ella", "TimestepAwareSemanticConnector"]`` resolves when
a saved ELLA pipeline is loaded back.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TimestepAwareSemanticConnector": "connector",
    "EllaError": "errors",
    "MissingModelError": "errors",
    "load_connector": "loading",
    "load_pipeline": "loading",
    "EllaStableDiffusionPipeline": "pipelines",
    "TextFeatures": "text",
    "encode_text": "text",
    "load_llm": "llm",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ella' has no attribute {name!r}")
