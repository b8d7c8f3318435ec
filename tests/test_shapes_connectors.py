"""The shapes world's connector stage (data held in memory, the product's loss) and the language evaluation."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import assert_refused
from ella.bench.generate import make_grid
from ella.errors import EllaError
from ella.shapes import models as M
from ella.shapes.captions import GroupSpec, Specified, captions_for, prompt_for
from ella.shapes.connectors import ConnectorPlan, FrozenBase, prepare_data, train_connector
from ella.shapes.evaluate import seed_diversity, summarise_diversity
from ella.shapes.language import UnknownWordsWarning, warn_unknown_words
from ella.shapes.oracle import ShapesOracle
from ella.shapes.recipe import Recipe, train_connectors
from ella.shapes.ship import PACKAGED
from ella.shapes.world import Obj, Scene, render, scene_for

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    latents = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return prepare_data(0, latents, [10, 11, 12, 13, 14, 15], captions_per_scene=3, device=DEVICE)


@pytest.fixture(scope="module")
def frozen():
    return FrozenBase.load(PACKAGED, DEVICE, compile=False)  # the shipped base: a real UNet and schedule


def test_every_wording_of_every_scene_is_encoded_once_and_scenes_with_more_objects_are_drawn_more(data):
    assert data.features.shape == (6 * 3, M.LLM_MAX_LENGTH, M.CROSS_ATTENTION_DIM)
    assert data.features.dtype == torch.bfloat16 and data.masks.shape == (18, M.LLM_MAX_LENGTH)
    # row i*k + j is caption j of scene i: its mask covers exactly its tokens ([CLS] ... [SEP])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(M.minilm_path()))
    for i, scene in enumerate([10, 11, 12, 13, 14, 15]):
        for j, text in enumerate(captions_for(0, scene, 3)):
            assert int(data.masks[i * 3 + j].sum()) == len(tokenizer(text)["input_ids"])
    assert int(data.empty_mask.sum()) == 2  # "" is [CLS] [SEP]: the negative prompt at inference
    objects = [len(scene_for(0, s).objects) for s in [10, 11, 12, 13, 14, 15]]
    assert data.weights.tolist() == [float(n) for n in objects for _ in range(3)]


def test_a_connector_trains_reproducibly_against_the_frozen_base(data, frozen, tmp_path):
    before = {k: v.clone() for k, v in frozen.unet.state_dict().items()}
    plan = ConnectorPlan(variant="tsc", steps=3, batch=4, lr=1e-3, log_every=1)
    first = train_connector(plan, data, frozen, tmp_path / "a", device=DEVICE)
    again = train_connector(plan, data, frozen, tmp_path / "b", device=DEVICE)
    assert (first["steps"], first["samples_seen"], first["stopped_by"]) == (3, 12, "steps")
    a = (tmp_path / "a" / "ella.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "ella.safetensors").read_bytes()  # same seed, same bytes
    assert again["steps"] == 3
    assert all(torch.equal(v, before[k]) for k, v in frozen.unet.state_dict().items())  # the base stays frozen
    fresh = M.new_connector("tsc", seed=0).state_dict()
    from ella.connector import TimestepAwareSemanticConnector

    trained = TimestepAwareSemanticConnector.from_single_file(tmp_path / "a" / "ella.safetensors").state_dict()
    assert any(not torch.equal(trained[k], fresh[k]) for k in fresh)  # it learned
    assert json.loads((tmp_path / "a" / "training.json").read_text())["captions_per_scene"] == 3


def test_continuing_from_a_run_starts_from_its_weights_and_counts_every_sample(data, frozen, tmp_path):
    from ella.connector import TimestepAwareSemanticConnector

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return TimestepAwareSemanticConnector.from_single_file(path / "ella.safetensors").state_dict()

    plan = ConnectorPlan(variant="tsc", steps=2, batch=4, lr=1e-3)
    train_connector(plan, data, frozen, tmp_path / "first" / "connector-tsc", device=DEVICE)
    r = Recipe(out=str(tmp_path / "second"), connector_init=str(tmp_path / "first"), variants=("tsc",))
    r.check()
    import ella.shapes.recipe as recipe

    continued = ConnectorPlan(variant="tsc", steps=1, batch=4, lr=1e-12, **recipe._continued(r, "tsc"))
    record = train_connector(continued, data, frozen, tmp_path / "second" / "connector-tsc", device=DEVICE)
    assert record["continued_from"]["samples_seen"] == 8 and record["samples_total"] == 8 + 4
    first, second = weights(tmp_path / "first" / "connector-tsc"), weights(tmp_path / "second" / "connector-tsc")
    fresh = M.new_connector("tsc", seed=0).state_dict()
    # lr 1e-12: the continued run ends where the first left off, not at a fresh initialisation
    assert all(torch.allclose(second[k], first[k], atol=1e-6) for k in first)
    assert any(not torch.allclose(second[k], fresh[k], atol=1e-3) for k in fresh)
    # a variant without weights there is refused before any work, naming the missing file
    with pytest.raises(EllaError, match=r"--connector-init .*connector-mlp/ella\.safetensors"):
        replace(r, variants=("tsc", "mlp")).check()


def test_feature_noise_changes_the_training_but_stays_seeded(data, frozen, tmp_path):
    assert data.features_rms == pytest.approx(data.features.float().pow(2).mean().sqrt().item(), rel=1e-4)
    paths = {}
    for name, noise in (("plain", 0.0), ("noisy", 0.5), ("noisy-again", 0.5)):
        plan = ConnectorPlan(variant="tsc", steps=2, batch=4, lr=1e-3, feature_noise=noise, warmup=1)
        record = train_connector(plan, data, frozen, tmp_path / name, device=DEVICE)
        assert record.get("feature_noise", 0.0) == noise
        paths[name] = (tmp_path / name / "ella.safetensors").read_bytes()
    assert paths["noisy"] == paths["noisy-again"] and paths["noisy"] != paths["plain"]
    with pytest.raises(EllaError, match=r"--feature-noise must be in \[0, 10\]"):
        Recipe(out=str(tmp_path / "r"), feature_noise=-1.0).check()


def test_with_a_time_budget_every_variant_sees_as_many_samples_as_the_first(tmp_path, monkeypatch, data, frozen):
    import ella.shapes.recipe as recipe

    calls = []

    def fake_train(plan, data_, frozen_, out, **kwargs):
        calls.append((plan.variant, plan.steps, plan.deadline is not None))
        reached = 7 if plan.deadline is not None else plan.steps  # the budget stops the first at step 7
        out.mkdir(parents=True, exist_ok=True)
        (out / "ella.safetensors").write_bytes(b"")
        (out / "training.json").write_text(json.dumps({"steps": reached}))
        return {"steps": reached}

    monkeypatch.setattr(recipe, "train_connector", fake_train)
    monkeypatch.setattr(recipe, "prepare_data", lambda *a, **k: data)
    monkeypatch.setattr(recipe.FrozenBase, "load", classmethod(lambda cls, *a, **k: frozen))
    monkeypatch.setattr(recipe, "cached_latents_and_keys", lambda cache: (torch.zeros(1, 4, 16, 16), ["00000/0000001"]))
    r = Recipe(out=str(tmp_path), device="cpu", compile=False, connector_steps=1000, connector_minutes=0.5)
    train_connectors(r, recipe.Group(device=DEVICE), tmp_path / "cache", tmp_path / "base")
    assert calls == [("tsc", 1000, True), ("resampler", 7, False), ("mlp", 7, False)]
    # a rerun after the first variant finished (another call of a lent machine): the rest still match it
    (tmp_path / "connector-mlp" / "ella.safetensors").unlink()
    calls.clear()
    train_connectors(r, recipe.Group(device=DEVICE), tmp_path / "cache", tmp_path / "base")
    assert calls == [("mlp", 7, False)]


def grid_of(scenes: list[Scene], path: Path) -> Path:
    make_grid([render(s, size=64) for s in scenes]).save(path)
    return path


def test_seed_diversity_counts_the_choices_made_for_what_a_prompt_left_out(tmp_path):
    oracle = ShapesOracle()
    circle = lambda row, col, size="small": Obj("circle", "red", size, row, col)
    scenes = [
        Scene("white", (circle(0, 0),)),
        Scene("black", (circle(1, 1),)),
        Scene("gray", (circle(2, 2, "large"),)),
        Scene("white", (circle(0, 0),)),
    ]
    nothing_said = Specified(background=False, groups=(GroupSpec("circle", size=False, cells=(False,)),))
    record = seed_diversity(scenes[0], nothing_said, grid_of(scenes, tmp_path / "a.png"), oracle)
    assert record == {"background": 3, "size/circle": 2, "position/circle": 3}
    same = seed_diversity(scenes[0], nothing_said, grid_of([scenes[0]] * 4, tmp_path / "b.png"), oracle)
    assert same == {"background": 1, "size/circle": 1, "position/circle": 1}
    summary = summarise_diversity([record, same])
    assert summary["background"] == {"facts": 2, "mean_distinct": 2.0, "varied_percent": 50.0}
    assert summary["position"]["mean_distinct"] == 2.0
    everything = Specified.everything(scenes[0])
    assert seed_diversity(scenes[0], everything, tmp_path / "a.png", oracle) == {}


def test_words_outside_the_world_are_named_in_one_warning_per_prompt():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unknown_words(["a pink star and a black horse", prompt_for(3, 0, "heldout").text, "a red circle."])
    messages = [str(w.message) for w in caught if issubclass(w.category, UnknownWordsWarning)]
    assert len(messages) == 1 and messages[0].startswith("prompt 0: the shapes model has never seen 'pink', 'star'")
    assert "'horse'" in messages[0]


def test_generate_model_shapes_warns_about_unknown_words_and_refuses_another_size(run_cli, tmp_path):
    with pytest.warns(UnknownWordsWarning, match="prompt 0: the shapes model has never seen 'pink', 'star'"):
        code, _, _ = run_cli("generate", "a pink star", "--model", "shapes", "--steps", "2", "--out", str(tmp_path))
    assert code == 0
    code, _, err = run_cli("generate", "a red circle", "--model", "shapes", "--width", "128", "--out", str(tmp_path))
    assert_refused(code, err, "64")


def test_several_minilm_layers_train_a_wider_connector_that_the_pipeline_reads_the_same_way(frozen, tmp_path):
    """``--llm-layers -1 -4``: the features are MiniLM's hidden states 6 and 3 side by side — the same ones
    ``ella.text.encode_text(hidden_layer=[-1, -4])`` gives the pipeline at inference — the connector is twice as
    wide at its input, records its layers, and the evaluation's pipeline reads them back (no flag needed)."""
    from transformers import AutoModel, AutoTokenizer

    from ella.connector import TimestepAwareSemanticConnector
    from ella.shapes.ship import ella_pipeline
    from ella.text import encode_text

    layers = (-1, -4)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    data = prepare_data(0, latents, [10, 11], captions_per_scene=2, device=DEVICE, llm_layers=layers)
    assert data.features.shape == (4, M.LLM_MAX_LENGTH, 2 * M.CROSS_ATTENTION_DIM)
    llm = AutoModel.from_pretrained(str(M.minilm_path())).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(M.minilm_path()))
    ref = encode_text(llm, tokenizer, captions_for(0, 10, 2), max_length=M.LLM_MAX_LENGTH, hidden_layer=list(layers))
    torch.testing.assert_close(data.features[:2].float(), ref.hidden_states.to(torch.bfloat16).float())
    last = prepare_data(0, latents, [10, 11], captions_per_scene=2, device=DEVICE)
    assert not torch.equal(data.features[..., : M.CROSS_ATTENTION_DIM], data.features[..., M.CROSS_ATTENTION_DIM :])
    torch.testing.assert_close(data.features[..., : M.CROSS_ATTENTION_DIM], last.features)  # -1 is the last layer

    plan = ConnectorPlan(variant="tsc", steps=2, batch=2, lr=1e-3, llm_layers=layers)
    record = train_connector(plan, data, frozen, tmp_path / "wide", device=DEVICE)
    assert record["llm_layers"] == [-1, -4]
    connector = TimestepAwareSemanticConnector.from_single_file(tmp_path / "wide" / "ella.safetensors")
    assert connector.config.input_dim == 2 * M.CROSS_ATTENTION_DIM and connector.config.llm_layers == [-1, -4]
    pipe = ella_pipeline(PACKAGED, tmp_path / "wide" / "ella.safetensors", device="cpu", dtype=torch.float32)
    assert pipe.llm_hidden_layer == [-1, -4]
    image = pipe("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert image.images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image.images)).all())


@pytest.mark.parametrize("layers", [(-1,), (-1, -1), (-1, 7), (-8, -1)])
def test_llm_layers_outside_minilm_are_refused_in_one_line(tmp_path, layers):
    with pytest.raises(EllaError, match=r"--llm-layers takes two or more distinct MiniLM hidden-state indices"):
        Recipe(out=str(tmp_path / "r"), llm_layers=layers).check()
