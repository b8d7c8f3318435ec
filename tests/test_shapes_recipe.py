"""`ella shapes reproduce --smoke`: every stage of the mini-ELLA recipe runs, resumes, stops where asked, is
carried between machines by the bundle script, and exports like the shipped model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from ella.cli import main as cli
from ella.errors import EllaError
from ella.shapes.evaluate import CEILING, roundtrip_accuracy
from ella.shapes.recipe import STAGES, Recipe, plan, stage_done
from ella.shapes.ship import describe, export_model, load_shapes_pipeline

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_bundle_script():
    """``benchmarks/shapes_bundle.py``: transfer plumbing, so a script beside the benchmarks, not package code."""
    spec = importlib.util.spec_from_file_location("shapes_bundle", BENCHMARKS / "shapes_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """One whole smoke run (every stage, all three variants), shared by this module's tests."""
    out = tmp_path_factory.mktemp("shapes") / "run"
    assert cli(["shapes", "reproduce", "--smoke", "--out", str(out)]) == 0
    return out


def test_smoke_recipe_runs_every_stage_resumes_and_exports(smoke, tmp_path, capsys):
    out = smoke
    first = json.loads((out / "reproduce.json").read_text())
    assert list(first["seconds"]) == list(STAGES) and first["skipped"] == []
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
    recipe = json.loads((out / "recipe.json").read_text())  # the values decided at run time, recorded
    assert (recipe["device"], recipe["compile"], recipe["processes"]) == ("cpu", False, 1)

    # a second run skips every finished stage (no retraining: the weights are untouched) and rescores the
    # same grids to the same numbers
    unet = out / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    before = digest(unet), digest(out / "connector-tsc" / "ella.safetensors")
    assert cli(["shapes", "reproduce", "--smoke", "--out", str(out)]) == 0
    second = json.loads((out / "reproduce.json").read_text())
    assert (digest(unet), digest(out / "connector-tsc" / "ella.safetensors")) == before
    assert second["scores"] == first["scores"]
    assert list(second["seconds"]) == ["eval"] and second["skipped"] == list(STAGES[:-1])

    # the run exports like the shipped model: fp16 files under 30 MB, loadable by both pipeline kinds, and
    # `ella demo --model` writes its PASS/FAIL sheet (the scores of a 3-step model mean nothing)
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
    prompt = "two small red circles on a white background"
    assert cli(["generate", prompt, "--model", str(model), "--steps", "2", "--out", str(gen)]) == 0
    (png,) = gen.glob("*.png")
    assert Image.open(png).size == (64, 64)
    assert json.loads(png.with_suffix(".json").read_text())["models"]["model"] == str(model)


def test_a_bundle_carries_the_trained_stages_to_another_machine(smoke, tmp_path):
    """≤ 8 files of ≤ 16 MiB; restored with every stage trained, reproduce only scores (no world, no latent
    cache), and the base UNet comes back bit-identical (stored fp16, and the base is rounded to fp16 when
    written). Restoring never replaces other weights."""
    bundle_script = load_bundle_script()
    bundle = tmp_path / "bundle"
    assert bundle_script.main(["write", str(smoke), str(bundle)]) == 0
    files = list(bundle.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files)
    run2 = tmp_path / "run2"
    assert bundle_script.main(["restore", str(bundle), str(run2)]) == 0
    assert cli(["shapes", "reproduce", "--smoke", "--out", str(run2)]) == 0
    third = json.loads((run2 / "reproduce.json").read_text())
    assert list(third["seconds"]) == ["eval"] and not (run2 / "world").exists() and not (run2 / "cache").exists()
    unet = "base/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(smoke / unet), load_file(run2 / unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = json.loads((smoke / "reproduce.json").read_text())
    assert set(third["scores"]) == set(first["scores"])
    assert (run2 / "connector-tsc" / "training.json").is_file() and (run2 / "base" / "training.json").is_file()

    # the same bundle again: every stage is already there with these weights, so nothing changes
    before = digest(run2 / unet)
    assert bundle_script.restore_bundle(bundle, run2) == []
    assert digest(run2 / unet) == before
    # another run's weights under the same names are never replaced
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    weights = load_file(other / "vae.safetensors")
    weights = {k: v + 1 for k, v in weights.items()}
    save_file(weights, str(other / "vae.safetensors"))
    with pytest.raises(EllaError, match="already has other weights for vae"):
        bundle_script.restore_bundle(other, run2)
    assert digest(run2 / unet) == before and bundle_script.main(["restore", str(other), str(run2)]) == 2
    with pytest.raises(EllaError, match="is not empty"):  # nor is a bundle written over another
        bundle_script.write_bundle(smoke, bundle)


def test_the_committed_base_bundle_restores_to_a_base_that_connectors_train_on(tmp_path):
    """``benchmarks/shapes/bundle-base`` (VAE + base of the published run) restores to a loadable base, and a
    connector run on it rebuilds only the world and the latents, never the VAE or the base."""
    run = tmp_path / "run"
    assert load_bundle_script().restore_bundle(BENCHMARKS / "shapes" / "bundle-base", run) == ["vae", "base"]
    pipe = StableDiffusionPipeline.from_pretrained(run / "base")
    assert pipe.unet.config.cross_attention_dim == 384 and pipe.text_encoder.config.num_hidden_layers == 0
    recipe = Recipe(out=str(run), variants=("tsc",))
    done = {stage: stage_done(recipe, stage) for stage in STAGES}
    assert plan(done, "connectors") == ["world", "cache", "connectors"]
    assert plan(done, "eval") == ["world", "cache", "connectors", "eval"]


def test_until_stops_after_that_stage(tmp_path):
    """``--until vae`` trains the VAE and stops: no latent cache, no base."""
    out = tmp_path / "run"
    assert cli(["shapes", "reproduce", "--smoke", "--out", str(out), "--until", "vae"]) == 0
    result = json.loads((out / "reproduce.json").read_text())
    assert list(result["seconds"]) == ["world", "vae"]
    assert (out / "vae" / "config.json").is_file()
    assert not (out / "cache").exists() and not (out / "base").exists()
    # each stage asks only for what it reads: with everything trained, `--until world` has nothing to do,
    # and a missing world is rebuilt for the cache, not for the eval of trained connectors
    everything = dict.fromkeys(STAGES, True)
    assert [plan({**everything, "eval": False}, s) for s in STAGES[:-1]] == [[]] * 5
    assert plan({**everything, "world": False, "cache": False, "eval": False}, "eval") == ["eval"]
    assert plan({**everything, "world": False, "cache": False}, "cache") == ["world", "cache"]
    assert plan(dict.fromkeys(STAGES, False), "base") == ["world", "vae", "cache", "base"]


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
    assert roundtrip_accuracy(_Autoencoder(grey=False), n_scenes=6) == 100.0
    assert roundtrip_accuracy(_Autoencoder(grey=True), n_scenes=6) < 80.0
