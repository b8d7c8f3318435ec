"""Hostile Python-API calls: each is refused with one EllaError line before the LLM or the UNet runs."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_pipeline
from ella.errors import EllaError
from ella.pipelines import EllaStableDiffusionImg2ImgPipeline


@pytest.fixture(scope="module")
def shared_pipe(tiny_sd, tiny_ella_file, tiny_t5):
    """One pipeline for every case: a refused call must leave nothing behind, so sharing it is part of the test."""
    return tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5)


def refused(pipe, message: str, *args, **kwargs) -> None:
    ran = []
    handles = [m.register_forward_pre_hook(lambda *_: ran.append(1)) for m in (pipe.llm, pipe.connector, pipe.unet)]
    try:
        with pytest.raises(EllaError, match=message) as caught:
            pipe(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert "\n" not in str(caught.value)
    assert not ran, "the check came after a model ran"
    assert not pipe.unet._forward_pre_hooks and pipe._ella_table is None


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((None,), {}, "no prompt: pass the text to draw"),
        ((), {}, "no prompt"),
        ((123,), {}, "prompt must be a string or a list of strings; got int"),
        ((["a cat", None],), {}, "got a list holding NoneType"),
        ((("a cat",),), {}, "got tuple"),
        (([],), {}, "prompt is an empty list"),
        (("a cat",), {"negative_prompt": 5}, "negative_prompt must be a string or a list of strings; got int"),
        (("a cat",), {"height": 7}, r"height must be a positive number of pixels divisible by 8; got 7$"),
        (("a cat",), {"width": 0}, "width must be a positive number of pixels divisible by 8; got 0"),
        (("a cat",), {"width": 64.0}, "width must be .*; got 64.0"),
        (("a cat",), {"height": True}, "height must be"),
        (("a cat",), {"num_inference_steps": 0}, "num_inference_steps must be a whole number of at least 1; got 0"),
        (("a cat",), {"num_inference_steps": 2.5}, "num_inference_steps must be a whole number"),
        (("a cat",), {"num_inference_steps": 5000}, "num_inference_steps must be at most 1000"),
        (("a cat",), {"num_images_per_prompt": 0}, "num_images_per_prompt must be a whole number of at least 1"),
        (("a cat",), {"guidance_scale": NAN}, "guidance_scale must be a finite number; got nan"),
        (("a cat",), {"guidance_scale": INF}, "guidance_scale must be a finite number; got inf"),
        (("a cat",), {"guidance_scale": "7"}, "guidance_scale must be a finite number; got '7'"),
        (("a cat",), {"guidance_rescale": NAN}, "guidance_rescale must be a finite number"),
        (("a cat",), {"guidence_scale": 7.0}, "takes no argument 'guidence_scale'; did you mean 'guidance_scale'"),
        (("a cat",), {"callback": print}, "takes no argument 'callback'; did you mean 'callback_on_step_end'"),
        (("a cat",), {"strength": 0.5}, "takes no argument 'strength'"),  # text-to-image has no strength
        (("a cat",), {"zzz": 1}, r"EllaStableDiffusionPipeline takes no argument 'zzz'; see help\("),
        (("a cat",) + (None,) * 40, {}, "too many positional arguments"),
        (("a cat", 64), {"height": 64}, "multiple values for argument 'height'"),
        (("a cat",), {"clip_scale": NAN}, "clip_scale must be a finite number"),
        (("a cat",), {"condition_mode": "clip"}, "unknown condition mode 'clip'"),
    ],
)
def test_bad_call_is_one_line_before_any_model_runs(shared_pipe, args, kwargs, message):
    refused(shared_pipe, message, *args, **kwargs)


@pytest.mark.parametrize("strength, shown", [(1.5, "1.5"), (0.0, "0.0"), (NAN, "nan"), (-INF, "-inf")])
def test_img2img_strength_must_be_finite_and_in_range(shared_pipe, strength, shown):
    p = EllaStableDiffusionImg2ImgPipeline(**shared_pipe.components)
    p.set_progress_bar_config(disable=True)
    refused(p, f"strength must be .*; got {shown}", "a cat", image=torch.zeros(1, 3, 64, 64), strength=strength)
    refused(p, "takes no argument 'height'", "a cat", image=torch.zeros(1, 3, 64, 64), height=64)


def test_a_good_call_still_runs_after_refused_ones(shared_pipe):
    out = shared_pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
