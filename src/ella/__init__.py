"""ELLA (Efficient Large Language Model Adapter, Hu et al. 2024) for diffusers.

Public surface: the connector, LLM text features, the pipelines and the loader. Exported at the top
level so that diffusers' ``model_index.json`` entry ``["ella", "TimestepAwareSemanticConnector"]``
resolves when a saved ELLA pipeline is loaded back.
"""

__version__ = "0.1.0"

from .connector import TimestepAwareSemanticConnector
from .errors import EllaError, MissingModelError
from .loading import load_connector, load_pipeline
from .pipelines import EllaStableDiffusionPipeline
from .text import TextFeatures, encode_text, load_llm

__all__ = [
    "EllaError",
    "EllaStableDiffusionPipeline",
    "MissingModelError",
    "TextFeatures",
    "TimestepAwareSemanticConnector",
    "__version__",
    "encode_text",
    "load_connector",
    "load_llm",
    "load_pipeline",
]
