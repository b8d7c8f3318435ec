"""Fast mode (``pipe.enable_fast_inference()``): one graph for every call a user makes, same images, cached negatives.

dynamo runs with a counting backend: it traces and guards exactly as under inductor, but compiles
nothing, so each graph it hands over is one compile (a recompile included) and the test stays quick.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import tiny_pipeline
from ella.errors import EllaError
from ella.pipelines.fast import enable_fast_inference


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts how many it was given, per input shape."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def image(pipe, prompt, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": 32, "width": 32, **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_after_the_first_calls_nothing_a_user_varies_recompiles(tiny_sd, tiny_ella_file, tiny_t5, fresh_dynamo):
    pipe = tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5)
    counter = CountingBackend()
    pipe.enable_fast_inference(backend=counter)
    image(pipe, "a red cube", num_inference_steps=3)  # first call: the UNet, the VAE decoder and the LLM
    image(pipe, ["a red cube", "a blue ball"], num_inference_steps=4)  # a batch of 2: dims become dynamic
    first = counter.graphs
    assert 3 <= first <= 6, first
    # prompt lengths, seeds, guidance, step counts already seen, batch sizes 1-4, a negative prompt
    image(pipe, "a much longer prompt about a green pyramid on a wooden table", seed=5, guidance_scale=9.0)
    image(pipe, ["one", "two", "three"], seed=1, num_inference_steps=4)
    image(pipe, ["w", "x", "y", "z"], num_inference_steps=3, negative_prompt="blurry")
    image(pipe, "a red cube", guidance_scale=2.5)
    assert counter.graphs == first, f"{counter.graphs - first} recompile(s)"


def test_fast_images_match_the_eager_ones(tiny_sd, tiny_ella_file, tiny_t5, fresh_dynamo):
    eager = tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5)
    fast = tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5)
    fast.enable_fast_inference(backend="eager")
    for prompt in ("a red cube", ["a red cube", "a blue ball"]):
        a, b = image(eager, prompt), image(fast, prompt)
        assert a.shape == b.shape
        # fused QKV and channels-last reorder fp32 sums: equal to float rounding, not bit for bit
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_the_negative_prompt_is_encoded_once_across_calls(tiny_sd, tiny_ella_file, tiny_t5, fresh_dynamo):
    pipe = tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5)
    pipe.enable_fast_inference(backend="eager")
    seen: list[list[str]] = []
    encode = pipe.encode_text
    pipe.encode_text = lambda texts: seen.append(list(texts)) or encode(texts)
    image(pipe, "a red cube")
    image(pipe, "a blue ball")
    image(pipe, "a blue ball", negative_prompt="blurry")
    image(pipe, "a red cube", negative_prompt="blurry")
    assert seen == [["a red cube", ""], ["a blue ball"], ["a blue ball", "blurry"], ["a red cube"]]
    # the cache follows the LLM: another dtype is another set of features
    pipe.llm.to(torch.float64)
    image(pipe, "a red cube")
    assert seen[-1] == ["a red cube", ""]


def test_cached_negatives_give_the_images_of_a_fresh_encode(tiny_sd, tiny_ella_file, tiny_t5, fresh_dynamo):
    pipe = tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5)
    pipe.enable_fast_inference(backend="eager")
    first = image(pipe, "a red cube", seed=3)
    again = image(pipe, "a red cube", seed=3)  # "" now from the cache
    np.testing.assert_allclose(first, again, atol=1e-6)


def test_bad_options_are_refused_before_anything_changes(tiny_sd, tiny_ella_file, tiny_t5):
    pipe = tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5)
    forward = pipe.unet.forward
    with pytest.raises(EllaError, match="unknown compile mode 'fastest'"):
        pipe.enable_fast_inference(mode="fastest")
    assert pipe.unet.forward == forward and not pipe._ella_fast

    class NoUnet:
        unet = None
        vae = None

    with pytest.raises(EllaError, match="has no unet/vae"):
        enable_fast_inference(NoUnet())


def test_generate_fast_compiles_after_the_loras_and_says_so_in_the_sidecar(
    run_cli, tiny_sd, tiny_ella_file, tiny_t5, tmp_path, monkeypatch, fresh_dynamo
):
    import json

    from ella.pipelines.base import EllaMixin

    calls = []

    def eager_fast(self, **options):  # inductor on this CPU would compile for minutes; dynamo's tracing is the same
        calls.append(options)
        enable_fast_inference(self, backend="eager", **options)

    monkeypatch.setattr(EllaMixin, "enable_fast_inference", eager_fast)
    models = ["--base", str(tiny_sd), "--ella", str(tiny_ella_file), "--llm", str(tiny_t5), "--device", "cpu"]
    code, _out, err = run_cli(
        "generate",
        "a red cube",
        "--fast",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--out",
        str(tmp_path / "o"),
        *models,
    )
    assert code == 0, err
    assert calls == [{}]
    (sidecar,) = (tmp_path / "o").glob("*.json")
    assert json.loads(sidecar.read_text())["fast"] is True


def test_generate_fast_is_refused_for_the_shapes_model(run_cli, tmp_path):
    from conftest import assert_refused

    assert_refused(
        *run_cli("generate", "a red circle", "--model", "shapes", "--fast", "--out", str(tmp_path))[::2], "--fast"
    )


def test_the_compile_cache_outlives_the_process_unless_the_user_chose_one(tmp_path, monkeypatch):
    import torch._inductor.config as inductor
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ella.pipelines.fast import _inductor_settings

    saved = inductor.get_config_copy()
    try:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes back itself
        monkeypatch.setenv("ELLA_COMPILE_CACHE", str(tmp_path / "ours"))
        _inductor_settings(None)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ours") and (tmp_path / "ours").is_dir()
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))
        _inductor_settings(None)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "theirs")
        _inductor_settings(tmp_path / "asked")  # an explicit cache_dir wins over both
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "asked")
        assert inductor.conv_1x1_as_mm and not inductor.epilogue_fusion
        # coordinate-descent tuning costs minutes of compiling: only with the max-autotune modes
        inductor.coordinate_descent_tuning = False
        _inductor_settings(tmp_path / "asked", "reduce-overhead")
        assert not inductor.coordinate_descent_tuning
        _inductor_settings(tmp_path / "asked", "max-autotune")
        assert inductor.coordinate_descent_tuning
    finally:
        inductor.load_config(saved)
