"""``ella serve``'s backend with the tiny real-model layout: what a request does, without a web server.

(The served page, the ``/generate`` API and the browser are tested in ``test_serve.py`` with the shapes model.)
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from ella.errors import EllaError
from ella.serve.backend import Backend, Request


@pytest.fixture(scope="module")
def backend(tiny_sd, tiny_ella_file, tiny_t5, tmp_path_factory):
    from tiny_models import write_tiny_lora

    lora = write_tiny_lora(tiny_sd, tmp_path_factory.mktemp("lora"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = Backend(
            model=None,
            base=str(tiny_sd),
            ella=str(tiny_ella_file),
            llm=str(tiny_t5),
            device="cpu",
            dtype="float32",
            out=tmp_path_factory.mktemp("serve-out"),
            loras=[f"{lora}:0.8"],
        )
    b.pipe.set_progress_bar_config(disable=True)
    return b, str(lora)


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.images[0]))


def small(**kw) -> Request:
    return Request(**{"prompt": "a red cat on a blue chair", "seed": 3, "steps": 2, "width": 64, "height": 64, **kw})


def test_a_lora_switches_on_per_request_and_off_again(backend):
    b, lora = backend
    steps = []
    plain = b.generate(small(), on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 2), (2, 2)]  # the page's progress bar: every denoising step
    with_lora = b.generate(small(loras=[lora]))
    again = b.generate(small())
    assert np.abs(pixels(with_lora).astype(int) - pixels(plain)).max() > 0
    assert np.array_equal(pixels(again), pixels(plain))  # switched off: the base's image again
    assert json.loads(with_lora.sidecars[0].read_text())["models"]["lora"] == [{"path": lora, "scale": 0.8}]
    assert plain.images[0].parent != again.images[0].parent  # a folder per request: nothing overwritten


def test_img2img_clip_prompt_and_random_seed_go_through_the_cli_code(backend, tmp_path):
    b, _ = backend
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(init)
    result = b.generate(small(init_image=str(init), strength=0.5, mode="ella+clip", clip_prompt="a green lamp"))
    record = json.loads(result.sidecars[0].read_text())
    assert record["models"]["kind"] == "img2img" and record["strength"] == 0.5
    assert record["clip_prompt"] == "a green lamp" and record["condition_mode"] == "ella+clip"
    drawn = b.generate(small(seed=-1))
    assert 0 <= drawn.seed < 2**32 and json.loads(drawn.sidecars[0].read_text())["seed"] == drawn.seed


@pytest.mark.parametrize(
    ("request_kw", "message"),
    [
        ({"prompt": "  "}, "prompt is empty"),
        ({"width": 100}, "multiples of 8"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"mode": "clip"}, "mode 'clip'"),
        ({"loras": ["other.safetensors"]}, "not loaded on this server"),
        ({"control_image": "x.png"}, "no ControlNet"),
        ({"scheduler": "nonsense"}, "unknown scheduler"),
        ({"num_images": 9}, "at most 8 images"),
    ],
)
def test_bad_requests_are_one_line_and_write_nothing(backend, request_kw, message):
    b, _ = backend
    before = sorted(b.out.rglob("*"))
    with pytest.raises(EllaError, match=message):
        b.generate(small(**request_kw))
    assert sorted(b.out.rglob("*")) == before


def test_a_non_image_upload_is_refused(backend, tmp_path):
    b, _ = backend
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    with pytest.raises(EllaError, match="cannot read image"):
        b.generate(small(init_image=str(text)))
