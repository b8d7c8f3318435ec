"""The shapes world: a procedural world where ELLA is trained and measured end to end, offline.

Scenes of coloured shapes on a 3x3 grid (``world``), the world's words — trained and held out —
(``language``), captions of scenes in many independent wordings with a record of what each states
(``captions``), their question graphs in DPG-Bench's schema (``questions``) and a judge that answers
those questions from pixels (``oracle``) — so ``ella.bench.dpg`` scores a generator on this world
exactly as on DPG-Bench, with no downloads and no learned VQA model in the loop.
"""

from .captions import (
    KINDS,
    Caption,
    GroupSpec,
    Specified,
    caption,
    caption_for,
    captions_for,
    describe,
    eval_prompt,
    prompt_for,
)
from .language import VOCABULARY, unknown_words
from .oracle import ShapesOracle
from .questions import questions, shapes_benchmark, write_csv
from .world import BACKGROUNDS, COLOURS, SHAPES, SIZES, Obj, Scene, render, sample_scene, scene_for

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "KINDS",
    "SHAPES",
    "SIZES",
    "VOCABULARY",
    "Caption",
    "GroupSpec",
    "Obj",
    "Scene",
    "ShapesOracle",
    "Specified",
    "caption",
    "caption_for",
    "captions_for",
    "describe",
    "eval_prompt",
    "prompt_for",
    "questions",
    "render",
    "sample_scene",
    "scene_for",
    "shapes_benchmark",
    "unknown_words",
    "write_csv",
]
