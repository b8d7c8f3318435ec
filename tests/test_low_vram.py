"""Low-VRAM mode (ella.pipelines.memory): one model at a time on the accelerator, the same images.

On a CPU-only machine diffusers' offload runs with ``device="cpu"``: the same accelerate hooks, the
same chain of "load this model, push the previous one back", only the copies cost nothing. Latents and
single images are compared exactly: the hooks move modules and tensors but run the same kernels on the
same device. (Batches of images differ by float rounding: VAE slicing decodes them one at a time.)
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import T5_DIM, assert_refused, plain_of, tiny_connector, tiny_pipeline
from ella.errors import EllaError
from ella.pipelines import PIPELINE_KINDS, PIPELINE_KINDS_XL
from ella.pipelines.memory import PinnedCpuOffload, enable_low_vram
from tiny_models import TINY_SDXL_CROSS_ATTENTION_DIM, TINY_SDXL_POOLED_DIM, build_tiny_sdxl

# the tiny LLM runs in fp32, the tiny connector says fp16: base.py warns once per pipeline
pytestmark = pytest.mark.filterwarnings("ignore:these ELLA weights were trained:UserWarning")

PROMPTS = ["a red cat sitting on a blue chair", "a green lamp"]
KW = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}


def gen(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def generate(pipe, n: int = 1, **kw) -> np.ndarray:
    """Images (or latents) of the first ``n`` prompts; one prompt by default: a batch of 1, the issue's case."""
    return pipe(PROMPTS[:n], negative_prompt="blurry", generator=gen(*range(n)), **{**KW, **kw}).images


def modules(pipe) -> dict[str, nn.Module]:
    return {name: m for name, m in pipe.components.items() if isinstance(m, nn.Module)}


def chain(pipe) -> list[tuple[str, str | None]]:
    """Each offload hook's model and the model it pushes back to the CPU when it runs (diffusers' seq chain)."""
    names = {id(m): name for name, m in modules(pipe).items()}
    return [
        (names[id(h.model)], names[id(h.hook.prev_module_hook.model)] if h.hook.prev_module_hook else None)
        for h in pipe._all_hooks
    ]


def record_loads(pipe) -> list[str]:
    """The order in which the offload hooks load their models (accelerate's pre_forward), one entry per run."""
    seen = []

    def spy(name, pre_forward):
        def pre_forward_and_record(module, *args, **kwargs):
            seen.append(name)
            return pre_forward(module, *args, **kwargs)

        return pre_forward_and_record

    names = {id(m): name for name, m in modules(pipe).items()}
    for h in pipe._all_hooks:
        h.hook.pre_forward = spy(names[id(h.model)], h.hook.pre_forward)
    return seen


@pytest.fixture(scope="module")
def sd_pipes(tiny_sd, tiny_ella_file, tiny_t5):
    """A tiny SD1.5 ELLA pipeline, and what it makes without offloading: one image; two images, and their latents."""
    pipe = tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5)
    return pipe, {"one": generate(pipe), "two": generate(pipe, 2), "latents": generate(pipe, 2, output_type="latent")}


@pytest.fixture()
def sd(sd_pipes):
    """The module's pipeline, back to plain (no hooks, no VAE options, LLM offloaded like the rest) after the test."""
    pipe, plain = sd_pipes
    yield pipe, plain
    pipe.remove_all_hooks()
    pipe._ella_llm_device = None
    pipe.vae.disable_slicing()
    pipe.vae.disable_tiling()
    pipe.to("cpu")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tiny_t5):
    """A tiny SDXL ELLA pipeline in ella+clip mode (both CLIPs loaded: the longest offload chain), and its images."""
    from ella import load_pipeline

    root = tmp_path_factory.mktemp("sdxl")
    ella_file = root / "ella-sdxl.safetensors"
    tiny_connector(
        seed=2, width=TINY_SDXL_CROSS_ATTENTION_DIM, input_dim=T5_DIM, pooled_dim=TINY_SDXL_POOLED_DIM
    ).save_single_file(ella_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_pipeline(
            build_tiny_sdxl(root / "base"), ella_file, tiny_t5, device="cpu", dtype="float32", mode="ella+clip"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe, generate(pipe)


def test_every_ella_pipeline_offloads_the_llm_then_the_connector_first():
    for cls in [*PIPELINE_KINDS.values(), *PIPELINE_KINDS_XL.values()]:
        parent = next(b for b in cls.__mro__ if b.__module__.startswith("diffusers."))
        assert cls.model_cpu_offload_seq == "llm->connector->" + parent.model_cpu_offload_seq, cls.__name__


def test_low_vram_sd15_same_images_one_model_at_a_time(sd):
    """The LLM is pushed back by the connector, the connector by the UNet, the UNet by the VAE; each loads once
    per call (the UNet stays for its steps). One image: bit-identical (slicing acts on batches, and 64 px is the
    VAE's own size: no tiling). Two: the same latents; VAE slicing decodes them one at a time, which reorders
    the decoder's float32 sums (1.1e-6 at most here, far below 8-bit pixel steps of 3.9e-3)."""
    pipe, plain = sd
    enable_low_vram(pipe, device="cpu")
    assert chain(pipe) == [("llm", None), ("connector", "llm"), ("unet", "connector"), ("vae", "unet")]
    assert pipe._execution_device == torch.device("cpu", 0)
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    loads = record_loads(pipe)
    assert np.array_equal(generate(pipe), plain["one"])
    assert loads == ["llm", "connector"] + ["unet"] * KW["num_inference_steps"] + ["vae"]
    assert all(hasattr(m, "_hf_hook") for m in modules(pipe).values())  # re-armed by maybe_free_model_hooks
    assert all(isinstance(h.hook, PinnedCpuOffload) and h.model._hf_hook is h.hook for h in pipe._all_hooks)
    assert torch.equal(generate(pipe, 2, output_type="latent"), plain["latents"])
    assert np.abs(generate(pipe, 2) - plain["two"]).max() <= 1e-5


def test_offload_points_unchanged_weights_back_at_their_cpu_copy_and_keeps_changed_ones():
    """The no-copy offload: a tensor that still holds what was loaded returns to its kept CPU copy (same
    storage, no copy); one written in place, or replaced, while loaded keeps its new value and becomes the copy.
    A load is simulated on the CPU by giving every tensor fresh storage, as module.to(cuda) would."""
    from accelerate.hooks import CpuOffload, add_hook_to_module

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    hook = PinnedCpuOffload("cpu")
    add_hook_to_module(module, hook)  # init_hook: the CPU copies are made
    assert isinstance(hook, CpuOffload)  # what diffusers' LoRA loading looks for to lift the offload
    home = {name: t.data_ptr() for name, t in module.state_dict(keep_vars=True).items()}
    before = {name: t.detach().clone() for name, t in module.state_dict().items()}

    def load():
        for t in [*module.parameters(), *module.buffers()]:
            t.data = t.data.clone()
        hook.pre_forward(module)

    load()
    assert all(t.data_ptr() != home[n] for n, t in module.state_dict(keep_vars=True).items())
    hook.init_hook(module)  # offload, nothing changed: every tensor points at its CPU copy again
    assert {n: t.data_ptr() for n, t in module.state_dict(keep_vars=True).items()} == home

    load()
    with torch.no_grad():
        module[0].weight.add_(1.0)  # written in place while loaded (a fused LoRA, say)
    module[1].running_mean.data = torch.full((4,), 7.0)  # replaced while loaded
    hook.init_hook(module)
    state = module.state_dict(keep_vars=True)
    assert torch.equal(state["0.weight"], before["0.weight"] + 1) and state["0.weight"].data_ptr() != home["0.weight"]
    assert torch.equal(state["1.running_mean"], torch.full((4,), 7.0))
    assert state["0.bias"].data_ptr() == home["0.bias"] and torch.equal(state["0.bias"], before["0.bias"])
    load()  # the changed values are the CPU copies now: the next offload returns to them without a copy
    hook.init_hook(module)
    assert torch.equal(module[0].weight, before["0.weight"] + 1)
    assert module[0].weight.data_ptr() == module._ella_cpu_copies["0.weight"].data_ptr()


def test_low_vram_sdxl_ella_clip_same_images(sdxl):
    """Both CLIPs run between the LLM and the connector: the connector still pushes the LLM back before the UNet."""
    pipe, plain = sdxl
    enable_low_vram(pipe, device="cpu")
    try:
        assert chain(pipe) == [
            ("llm", None),
            ("connector", "llm"),
            ("text_encoder", "connector"),
            ("text_encoder_2", "text_encoder"),
            ("unet", "text_encoder_2"),
            ("vae", "unet"),
        ]
        loads = record_loads(pipe)
        assert np.array_equal(generate(pipe), plain)
        first_unet = loads.index("unet")
        assert loads[:first_unet] == ["llm", "text_encoder", "text_encoder_2", "connector"]
    finally:
        pipe.remove_all_hooks()


def test_llm_device_cpu_keeps_the_llm_off_the_hooks_across_calls(sd):
    pipe, plain = sd
    enable_low_vram(pipe, device="cpu", llm_device="cpu")
    for _ in range(2):  # diffusers re-hooks every model after each call (maybe_free_model_hooks)
        assert not hasattr(pipe.llm, "_hf_hook") and pipe.llm.device == torch.device("cpu")
        assert chain(pipe) == [("connector", None), ("unet", "connector"), ("vae", "unet")]
        assert pipe._execution_device == torch.device("cpu", 0)  # the accelerator, not the LLM's CPU
        assert np.array_equal(generate(pipe), plain["one"])
    enable_low_vram(pipe, device="cpu")  # called again without llm_device: the LLM is offloaded like the rest
    assert chain(pipe)[:2] == [("llm", None), ("connector", "llm")]


def test_vae_tiles_only_images_larger_than_its_own_size(sd, monkeypatch):
    pipe, _ = sd
    tiled = []
    decode = type(pipe.vae).tiled_decode
    monkeypatch.setattr(
        type(pipe.vae), "tiled_decode", lambda self, *a, **k: (tiled.append(1), decode(self, *a, **k))[1]
    )
    big = {"height": 2 * pipe.vae.config.sample_size, "width": 2 * pipe.vae.config.sample_size}
    untiled = generate(pipe, **big)
    enable_low_vram(pipe, device="cpu", vae_tiling=False)
    assert not pipe.vae.use_tiling and np.array_equal(generate(pipe, **big), untiled) and not tiled
    enable_low_vram(pipe, device="cpu")
    generate(pipe, **big)
    assert tiled


def test_sequential_cpu_offload_same_images(sd):
    pipe, plain = sd
    pipe.enable_sequential_cpu_offload(device="cpu")
    # diffusers names the device "cpu:0", on which accelerate 1.15 cannot put weights back to 'meta' (a tied or
    # CPU-resident weight comes back a plain tensor; diffusers' own StableDiffusionPipeline fails the same way).
    # On a GPU the device is "cuda:0"; here the hooks are pointed at "cpu", which they handle.
    for module in modules(pipe).values():
        for m in module.modules():
            hook = getattr(m, "_hf_hook", None)
            for h in getattr(hook, "hooks", [hook]):
                if getattr(h, "execution_device", None) is not None:
                    h.execution_device = torch.device("cpu")
    assert np.array_equal(generate(pipe), plain["one"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "gpu9"}, "unknown device 'gpu9'"),
        ({"device": "cpu", "llm_device": "cuda:1"}, "llm_device 'cuda:1' is not the offload device 'cpu'"),
        ({"device": "cpu", "llm_device": "ram"}, "unknown llm_device 'ram'"),
        pytest.param(
            {},
            "this machine has no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused only without a GPU"),
        ),
        ({"plain": True}, "enable_low_vram takes an ELLA pipeline"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_anything_moves(sd, kwargs, message):
    pipe, _ = sd
    kwargs, target = dict(kwargs), pipe
    if kwargs.pop("plain", False):  # the same parts, in diffusers' own pipeline
        target = plain_of(pipe)
    with pytest.raises(EllaError) as err:
        enable_low_vram(target, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not any(hasattr(m, "_hf_hook") for m in modules(pipe).values())
    assert not getattr(pipe, "_all_hooks", None) and pipe._ella_llm_device is None
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--llm-device", "cpu"], ["--llm-device applies with --low-vram"]),
        (["--fast", "--low-vram"], ["--fast and --low-vram do not combine"]),
        (["--low-vram", "--device", "cpu"], ["--low-vram saves GPU memory"]),
    ],
)
def test_generate_refuses_speed_flags_that_cannot_work_before_loading(run_cli, tmp_path, flags, needles):
    # the models named do not exist: a refusal that came after loading would name them instead
    missing = ["--base", str(tmp_path / "nope"), "--ella", str(tmp_path / "nope.safetensors")]
    assert_refused(*run_cli("generate", "a red cube", *flags, *missing, "--out", str(tmp_path / "o"))[::2], *needles)


def test_fast_and_low_vram_refuse_each_other_in_either_order(tiny_sd, tiny_ella_file, tiny_t5, sd):
    # offloaded first: fast mode refuses before compiling or fusing anything
    pipe, _ = sd
    enable_low_vram(pipe, device="cpu")
    forward = pipe.unet.forward
    with pytest.raises(EllaError, match="enable_fast_inference after an offload") as err:
        pipe.enable_fast_inference(backend="eager")
    assert "\n" not in str(err.value) and pipe.unet.forward == forward and not pipe._ella_fast
    # fast first (a pipeline of its own: fast mode cannot be undone): low-VRAM refuses before hooking anything
    fast = tiny_pipeline(tiny_sd, tiny_ella_file, tiny_t5)
    fast.enable_fast_inference(backend="eager")
    with pytest.raises(EllaError, match="enable_low_vram after enable_fast_inference"):
        enable_low_vram(fast, device="cpu")
    assert not getattr(fast, "_all_hooks", None) and not any(hasattr(m, "_hf_hook") for m in modules(fast).values())
