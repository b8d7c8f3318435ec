"""`ella shapes reproduce --smoke`: every stage of the mini-ELLA recipe runs, resumes, and is deterministic."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from ella.cli import main as cli


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_smoke_recipe_runs_every_stage_resumes_and_exports(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["shapes", "reproduce", "--smoke", "--out", str(out)]) == 0
    first = json.loads((out / "reproduce.json").read_text())
    from ella.shapes.evaluate import CEILING

    assert set(first["scores"]) == {CEILING, "base (weak encoder)", "+tsc", "+resampler", "+mlp"}
    assert all(0.0 <= r["overall"] <= 100.0 for r in first["scores"].values())
    assert {p.name for p in (out / "eval").glob("*.png")} == {  # one grid picture per table row
        "VAE-round-trip-of-the-true-scene-ceiling.png",
        "base-weak-encoder.png",
        "tsc.png",
        "resampler.png",
        "mlp.png",
    }
    assert (out / "base" / "model_index.json").is_file() and (out / "base" / "text_encoder").is_dir()
    assert 0.0 <= json.loads((out / "vae" / "roundtrip.json").read_text())["oracle_yes_percent"] <= 100.0
    vae_config = json.loads((out / "base" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured from the trained VAE's latents, not SD's constant
    for variant in ("tsc", "resampler", "mlp"):
        assert (out / f"connector-{variant}" / "ella.safetensors").is_file()
        assert json.loads((out / f"connector-{variant}" / "training.json").read_text())["steps"] == 2
    assert json.loads((out / "base" / "training.json").read_text()) == {
        "steps": 3,
        "max_steps": 3,
        "batch": 4,
        "stopped_by": "steps",
        "samples": 12,
    }
    # one variant on several processes: the trainer under torchrun (gloo here), connector_batch split over them
    from dataclasses import replace

    from ella.shapes.recipe import Recipe, train_variant

    ddp = replace(Recipe.smoke(str(tmp_path / "ddp")), processes=2, variants=("tsc",))
    ddp.root.mkdir()
    run = train_variant(ddp, "tsc", out / "cache", out / "base")
    ranks = [json.loads(p.read_text()) for p in sorted(run.glob("checkpoint-*/progress-rank*.json"))]
    assert [(r["global_step"], r["samples_seen"]) for r in ranks] == [(2, 4), (2, 4)]  # 2 steps x batch 4/2
    assert (run / "ella.safetensors").is_file() and "data-parallel over 2" in capsys.readouterr().out
    unet = out / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    before = digest(unet)
    # a second run skips every finished stage (no retraining: the base's weights are untouched) and rescores
    # the same grids to the same numbers
    assert cli(["shapes", "reproduce", "--smoke", "--out", str(out)]) == 0
    second = json.loads((out / "reproduce.json").read_text())
    assert digest(unet) == before
    assert second["scores"] == first["scores"]
    assert second["seconds"]["base"] < 1.0 and second["seconds"]["connectors"] < 1.0

    # a bundle carries the trained stages to another machine (≤ 8 files of ≤ 16 MiB); restored there with every
    # stage trained, reproduce only scores (no world, no latent cache), and the base UNet comes back
    # bit-identical (stored fp16, and the base is rounded to fp16 when written)
    from safetensors.torch import load_file

    bundle = tmp_path / "bundle"
    assert (
        cli(["shapes", "reproduce", "--smoke", "--out", str(out), "--until", "connectors", "--bundle", str(bundle)])
        == 0
    )
    files = list(bundle.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files)
    run2 = tmp_path / "run2"
    assert cli(["shapes", "reproduce", "--smoke", "--out", str(run2), "--from-bundle", str(bundle)]) == 0
    third = json.loads((run2 / "reproduce.json").read_text())
    assert "world" not in third["seconds"] and not (run2 / "world").exists() and not (run2 / "cache").exists()
    assert third["seconds"]["base"] < 1.0 and third["seconds"]["connectors"] < 1.0
    a, b = load_file(unet), load_file(run2 / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(third["scores"]) == set(first["scores"])
    assert (run2 / "connector-tsc" / "training.json").is_file() and (run2 / "base" / "training.json").is_file()

    # the run exports like the shipped model: fp16 files under 30 MB, loadable by both pipeline kinds, and
    # `ella demo --model` writes its PASS/FAIL sheet (the scores of a 3-step model mean nothing)
    from PIL import Image

    from ella.errors import EllaError
    from ella.shapes.ship import describe, export_model, load_shapes_pipeline

    model = export_model(out / "base", out / "connector-tsc" / "ella.safetensors", tmp_path / "model")
    info = describe(model)
    assert info["bytes"] < 30_000_000 and not list((model / "text_encoder").glob("*.safetensors"))
    for kind in ("ella", "base"):
        assert load_shapes_pipeline(model, kind=kind).unet.dtype == torch.float32  # fp16 files, fp32 on CPU
    demo = tmp_path / "demo.png"
    capsys.readouterr()
    assert cli(["demo", "--model", str(model), "--out", str(demo), "--items", "2", "--steps", "2"]) == 0
    assert "questions pass" in capsys.readouterr().out
    assert Image.open(demo).width > 64 * 3
    with pytest.raises(EllaError, match="no shapes model"):
        load_shapes_pipeline(tmp_path / "nothing")
    # `ella generate --model DIR`: the same files through the ordinary generate path (64 px, sidecar)
    gen = tmp_path / "gen"
    assert (
        cli(
            [
                "generate",
                "two small red circles on a white background",
                "--model",
                str(model),
                "--steps",
                "2",
                "--out",
                str(gen),
            ]
        )
        == 0
    )
    (png,) = gen.glob("*.png")
    assert Image.open(png).size == (64, 64)
    assert json.loads(png.with_suffix(".json").read_text())["models"]["model"] == str(model)


class _Autoencoder(torch.nn.Module):
    """Stands in for AutoencoderKL's encode/decode interface: identity, or one that forgets colour."""

    def __init__(self, grey: bool):
        super().__init__()
        self.grey, self.p = grey, torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        mode = (lambda: x.mean(1, keepdim=True).expand_as(x)) if self.grey else (lambda: x)
        return type("Out", (), {"latent_dist": type("Dist", (), {"mode": staticmethod(mode)})()})()

    def decode(self, z):
        return type("Out", (), {"sample": z})()


def test_vae_roundtrip_accuracy_is_100_for_a_lossless_vae_and_low_without_colour():
    from ella.shapes.evaluate import roundtrip_accuracy

    assert roundtrip_accuracy(_Autoencoder(grey=False), n_scenes=6) == 100.0
    assert roundtrip_accuracy(_Autoencoder(grey=True), n_scenes=6) < 80.0
