"""The training step's speed settings (``ella.train.speed``): each is checked before any model loads, the fp8
conversion touches only what it should, and the attention-kernel switch is exactly the one asked for."""

from __future__ import annotations

import warnings

import pytest
import torch

from ella.errors import EllaError
from ella.train import speed
from ella.train.config import build_config


def config(tmp_path, **overrides):
    values = dict(train_data_dir=str(tmp_path), output_dir=str(tmp_path / "out"), report_to="none")
    return build_config({**values, **overrides})


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("compile_scope", "everything", r"--compile_scope must be one of unet, step, got 'everything'"),
        ("compile_mode", "turbo", r"--compile_mode must be one of default, reduce-overhead, "),
        ("attention_backend", "fa3", r"--attention_backend must be one of auto, flash, cudnn, efficient, math"),
    ],
)
def test_speed_flags_are_checked_with_the_config(tmp_path, flag, value, message):
    with pytest.raises(EllaError, match=message):
        config(tmp_path, **{flag: value})


def test_fp8_needs_a_gpu_with_fp8_tensor_cores_and_says_so_in_one_line():
    with pytest.raises(EllaError, match=r"--fp8_unet needs a GPU with fp8 tensor cores .* this run has cpu"):
        speed.check_fp8(torch.device("cpu"))


@pytest.mark.parametrize("name", ["flash", "cudnn", "efficient", "math"])
def test_one_attention_backend_is_allowed_and_reset_allows_all_again(name):
    cuda = torch.backends.cuda
    enabled = {
        "flash": cuda.flash_sdp_enabled,
        "cudnn": cuda.cudnn_sdp_enabled,
        "efficient": cuda.mem_efficient_sdp_enabled,
        "math": cuda.math_sdp_enabled,
    }
    import torch._functorch.config as functorch_config

    cached = functorch_config.enable_autograd_cache
    try:
        speed.set_attention_backend(name)
        assert {k: f() for k, f in enabled.items()} == {k: k == name for k in enabled}
        assert functorch_config.enable_autograd_cache is False  # a graph traced under another kernel isn't reused
    finally:
        speed.reset_attention_backend()
    assert all(f() for f in enabled.values()) and functorch_config.enable_autograd_cache == cached
    speed.set_attention_backend("auto")  # auto changes nothing
    assert all(f() for f in enabled.values())


def test_fp8_converts_only_large_frozen_linears_never_a_lora():
    """torchao's rule (dims multiples of 16, not a small matmul) over a UNet-like stack; a LoRA's own layers and
    anything trainable stay in full precision, and the converted model computes what it did (to fp8 precision is
    not checked here: conversion runs on any device, the fp8 matmuls only on a GPU)."""
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "ff": torch.nn.Linear(1280, 5120),  # large: converted
            "to_q": torch.nn.Linear(320, 320),  # small: not worth it
            "odd": torch.nn.Linear(1288, 5000),  # 5000 is not a multiple of 16
            "lora_B": torch.nn.Linear(16, 5120),  # a LoRA's layer: never
            "learning": torch.nn.Linear(2048, 2048),  # trainable: never
        }
    )
    for name, module in model.items():
        module.requires_grad_(name == "learning" or name == "lora_B")
    converted = speed.fp8_unet(model)
    assert converted == ["ff"]
    assert isinstance(model["ff"], Float8Linear)
    assert not any(isinstance(model[k], Float8Linear) for k in ("to_q", "odd", "lora_B", "learning"))
    assert not model["ff"].weight.requires_grad


def test_the_whole_loss_captured_as_one_graph_gives_the_eager_loss_and_gradients(tiny_sd):
    """``--compile_scope step`` (the default with --torch_compile): the capture of noise draws, connector, casts,
    UNet and MSE as one function (dynamo + AOT autograd, the part the scope changes; ``aot_eager`` runs the captured
    graphs with eager kernels) gives exactly the eager loss and connector gradients, with the same random draws."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from conftest import T5_DIM, tiny_connector
    from ella.train.models import Dims
    from ella.train.train import diffusion_loss

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").requires_grad_(False).eval()
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    connector = tiny_connector(width=unet.config.cross_attention_dim).train()
    dims = Dims(T5_DIM, unet.config.cross_attention_dim, None, {})
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    features = torch.randn(2, 16, T5_DIM, generator=torch.Generator().manual_seed(1))

    def run(loss_fn):
        connector.zero_grad(set_to_none=True)
        loss = loss_fn(
            connector, unet, scheduler, latents, features, None, dims=dims, generator=torch.Generator().manual_seed(2)
        )
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in connector.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = run(diffusion_loss)
    torch._dynamo.reset()
    captured_loss, captured_grads = run(torch.compile(diffusion_loss, backend="aot_eager", dynamic=False))
    assert torch.equal(captured_loss, eager_loss)
    assert captured_grads.keys() == eager_grads.keys() and len(eager_grads) > 0
    for k in eager_grads:
        torch.testing.assert_close(captured_grads[k], eager_grads[k], rtol=1e-5, atol=1e-8)


def test_a_cpu_never_compiles_and_says_why():
    with pytest.warns(UserWarning, match=r"--torch_compile is ignored on a CPU: .* wrong gradients"):
        assert speed.resolve_compile(True, "cpu") is False
    # a device, not a check of this machine's GPUs
    assert speed.resolve_compile(True, torch.device("cuda", 0)) is True
    # the trainer's default (None): a GPU compiles, a CPU quietly doesn't; off is off without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert speed.resolve_compile(None, "cuda") is True and speed.resolve_compile(None, "cpu") is False
        assert speed.resolve_compile(False, "cuda") is False and speed.resolve_compile(False, "cpu") is False
        assert speed.resolve_compile(True, "cuda:1") is True


def test_the_cpu_miscompile_that_keeps_a_cpu_from_compiling_is_what_the_warning_says():
    """Why :func:`speed.resolve_compile` refuses CPUs, kept honest: on this torch, inductor's CPU kernels give the
    input gradient through SD's ResnetBlock2D -> Upsample2D as zeros (the forward is right), and disabling kernel
    fusion fixes it. When a torch release fixes the miscompile this test fails: then let CPUs compile again."""
    import torch._inductor.config as inductor
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    resnet = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=2).double().eval()
    upsample = Upsample2D(8, use_conv=True).double().eval()
    for module in (resnet, upsample):
        module.requires_grad_(False)

    def block(x):
        return upsample(resnet(x, None))

    def input_grad(fn) -> torch.Tensor:
        x = torch.randn(2, 8, 4, 4, dtype=torch.double, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = fn(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return x.grad

    eager = input_grad(block)
    torch._dynamo.reset()
    assert input_grad(torch.compile(block, dynamic=False)).abs().max() == 0  # the miscompile
    torch._dynamo.reset()
    with inductor.patch(max_fusion_size=1):  # no kernel fusion: right
        torch.testing.assert_close(input_grad(torch.compile(block, dynamic=False)), eager)


def test_the_training_benchmark_runs_its_rows_and_its_gradient_check_sees_an_identical_step(tmp_path):
    """``benchmarks/bench_train.py --tiny`` (what the GPU calls run, shrunk): an eager row's gradient check compares
    the step with itself, so it must find no difference; the JSON row carries what RESULTS.md reports."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_train.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_train", path)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        argv = ["--tiny", "--only", "bf16", "--steps", "2", "--warmup", "1", "--check-grads", "--out", str(tmp_path)]
        assert bench.main(argv) == 0
    finally:
        sys.path.remove(str(path.parent))
    (row,) = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert row["config"] == "bf16" and row["loss_finite"] and row["samples_per_s"] > 0
    assert row["grad_check"]["grad_rel_l2"] == 0 and row["grad_check"]["loss_rel_diff"] == 0
    assert row["grad_check"]["grad_cosine"] == pytest.approx(1.0, abs=1e-5)
