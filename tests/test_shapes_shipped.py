"""The mini ELLA shipped inside the package: loads offline on CPU through the ordinary pipelines and draws."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ella.cli import main as cli
from ella.shapes.oracle import ShapesOracle
from ella.shapes.ship import PACKAGED, describe, load_shapes_pipeline


def test_shipped_model_is_small_and_says_how_it_was_made():
    info = describe()
    assert info["path"] == str(PACKAGED)
    assert info["bytes"] <= 30_000_000
    assert not any(name.startswith("text_encoder/") and name.endswith(".safetensors") for name in info["files"])
    provenance = json.loads((PACKAGED / "provenance.json").read_text())
    assert provenance["connector"] == "tsc" and provenance["recipe"]["connector_steps"] > 0


def test_ella_generate_model_shapes_is_deterministic(tmp_path):
    paths = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert (
            cli(
                [
                    "generate",
                    "a big red square in the center on a white background",
                    "--model",
                    "shapes",
                    "--steps",
                    "3",
                    "--seed",
                    "5",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        (png,) = out.glob("*.png")
        paths.append(png)
    assert paths[0].read_bytes() == paths[1].read_bytes()  # same seed => same bytes


@pytest.mark.parametrize("background", ["white", "black"])
def test_shipped_base_draws_the_background_it_is_asked_for(background):
    """The trained weights, not noise: the caption's first words (inside the base's 20-token window) are obeyed."""
    pipe = load_shapes_pipeline(kind="base")
    image = pipe(
        f"a {background} background with one big green circle in the center",
        num_inference_steps=20,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    oracle = ShapesOracle()
    assert oracle(image, f"Is the background {background}?") == "yes"
    other = "black" if background == "white" else "white"
    assert oracle(image, f"Is the background {other}?") == "no"


def test_demo_runs_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli(["demo", "--out", str(out), "--items", "1", "--steps", "3"]) == 0
    assert "questions pass" in capsys.readouterr().out
    assert Image.open(out).width > 64
