"""VQA backends and the answer cache, offline: tiny random BLIP / LLaVA checkpoints built here in the real layout."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForQuestionAnswering,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ella.bench.vqa import (
    CachedVQA,
    FakeVQA,
    MplugVQA,
    TransformersVLM,
    VQABackend,
    ask_batch,
    first_yes_no,
    image_digest,
    load_vqa,
)
from ella.errors import EllaError, MissingModelError

QUESTIONS = ["is there a cat?", "is the dog red?", "are there two blue cats?", "is there a cat?"]


def tiles(n: int = 4, size: tuple[int, int] = (40, 40)) -> list[Image.Image]:
    colors = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 250), (10, 10, 10)]
    return [Image.new("RGB", size, colors[i % len(colors)]) for i in range(n)]


# ------------------------------------------------------------------------------------- fake + cache


def test_fake_vqa_rules_and_normalisation():
    fake = FakeVQA({"is there a cat?": "  Yes "}, default="No")
    assert fake.name == "fake"
    assert fake(tiles(1)[0], "is there a cat?") == "yes"
    assert fake.batch(tiles(2), ["is there a cat?", "other"]) == ["yes", "no"]
    by_color = FakeVQA(lambda im, q: "yes" if im.getpixel((0, 0))[0] > 128 else "no", name="red?")
    assert by_color.batch(tiles(2), ["q", "q"]) == ["yes", "no"]
    assert ask_batch(lambda im, q: " YES", tiles(2), ["a", "b"]) == ["yes", "yes"]  # plain callables work too
    with pytest.raises(ValueError):
        fake.batch(tiles(2), ["one question"])


def test_batches_group_equal_lengths_and_keep_order():
    class Probe(VQABackend):
        """Answers with the size of the chunk it was asked in: shows how a batch was split."""

        name, batch_size = "probe", 2

        def _length(self, question: str) -> int:
            return len(question)

        def _answer(self, images, questions):
            return [f"{q}/{len(questions)}" for q in questions]

    questions = ["aa", "b", "cc", "dd", "e", "fff"]
    assert Probe().batch(tiles(6), questions) == ["aa/2", "b/2", "cc/2", "dd/1", "e/2", "fff/1"]
    assert Probe().batch([], []) == []


def test_first_yes_no():
    assert first_yes_no("Yes, there is a cat.") == "yes"
    assert first_yes_no(" no ") == "no"
    assert first_yes_no("Nothing here") == "nothing here"
    assert first_yes_no("yesterday") == "yesterday"


def test_cache_hits_misses_and_persistence(tmp_path):
    images, fake = tiles(4), FakeVQA({"is there a cat?": "yes"})
    cached = CachedVQA(fake, tmp_path)
    assert cached.name == "fake"
    first = cached.batch(images, QUESTIONS)
    assert first == ["yes", "no", "no", "yes"]
    assert (cached.misses, cached.hits, fake.calls) == (4, 0, 4)
    assert cached.batch(images, QUESTIONS) == first
    assert (cached.misses, cached.hits, fake.calls) == (4, 4, 4)  # the backend was not asked again

    again = CachedVQA(FakeVQA(name="fake"), tmp_path)  # a fresh process: answers come from disk
    assert len(again) == 4
    assert again.batch(images, QUESTIONS) == first
    assert (again.misses, again.hits, again.backend.calls) == (0, 4, 0)

    # only misses reach the backend, in one batch, each distinct key once
    mixed = again.batch(images[:2] + tiles(1, (8, 8)) * 2, QUESTIONS[:2] + ["new?", "new?"])
    assert mixed == first[:2] + ["no", "no"]
    assert again.backend.batch_sizes == [1] and (again.misses, again.hits) == (1, 7)
    assert again(images[0], QUESTIONS[0]) == "yes"  # single questions share the cache


def test_cache_key_distinguishes_images_questions_and_backends(tmp_path):
    red, blue = tiles(2)
    assert image_digest(red) != image_digest(blue)
    assert image_digest(red) == image_digest(red.copy())
    assert image_digest(red) != image_digest(red.convert("RGBA"))  # same colour, other mode
    assert image_digest(Image.new("L", (4, 2))) != image_digest(Image.new("L", (2, 4)))  # same bytes, other size

    rule = FakeVQA(lambda im, q: f"{im.getpixel((0, 0))[2]} {q}", name="echo")
    cached = CachedVQA(rule, tmp_path)
    assert cached.batch([red, blue, red], ["a", "a", "b"]) == ["0 a", "255 a", "0 b"]
    assert cached.misses == 3

    other = CachedVQA(FakeVQA(lambda im, q: "other", name="another backend"), tmp_path)
    assert len(other) == 0 and other(red, "a") == "other"
    assert len(list(tmp_path.glob("*.jsonl"))) == 2  # one file per backend
    assert CachedVQA(FakeVQA(name="echo"), tmp_path)(red, "a") == "0 a"


def test_an_interrupted_run_keeps_what_it_answered(tmp_path):
    def rule(image, question):
        if question == "crash":
            raise KeyboardInterrupt
        return "yes"

    cached = CachedVQA(FakeVQA(rule, name="flaky"), tmp_path, flush_every=2)
    with pytest.raises(KeyboardInterrupt):
        cached.batch(tiles(4), ["a", "b", "crash", "d"])
    resumed = CachedVQA(FakeVQA(name="flaky"), tmp_path)
    assert len(resumed) == 2 and resumed.batch(tiles(2), ["a", "b"]) == ["yes", "yes"] and resumed.backend.calls == 0


def test_cache_survives_a_truncated_last_line(tmp_path):
    images = tiles(3)
    cached = CachedVQA(FakeVQA({"q": "yes"}), tmp_path)
    cached.batch(images, ["q", "q", "r"])
    path = cached.path
    data = path.read_bytes()
    path.write_bytes(data[:-25])  # a crash in the middle of writing the last line

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncated tail is expected after a crash: no warning
        resumed = CachedVQA(FakeVQA({"q": "yes"}), tmp_path)
    assert len(resumed) == 2
    assert resumed.batch(images, ["q", "q", "r"]) == ["yes", "yes", "no"]
    assert (resumed.hits, resumed.misses, resumed.backend.calls) == (2, 1, 1)
    lines = path.read_text().splitlines()  # the partial line was cut off before appending
    assert len(lines) == 3 and all(json.loads(line)["backend"] == "fake" for line in lines)
    assert len(CachedVQA(FakeVQA(), tmp_path)) == 3


def test_cache_skips_a_corrupt_line_with_a_warning(tmp_path):
    cached = CachedVQA(FakeVQA({"q": "yes"}), tmp_path)
    cached.batch(tiles(2), ["q", "q"])
    lines = cached.path.read_text().splitlines()
    cached.path.write_text(lines[0] + "\n{garbage\n" + lines[1] + "\n")
    with pytest.warns(UserWarning, match="unreadable"):
        assert len(CachedVQA(FakeVQA(), tmp_path)) == 2


def test_cache_needs_a_backend_name(tmp_path):
    with pytest.raises(EllaError, match="name"):
        CachedVQA(lambda im, q: "yes", tmp_path)
    assert CachedVQA(lambda im, q: "Yes", tmp_path, name="lambda")(tiles(1)[0], "q") == "yes"


# ------------------------------------------------------------------------------------------- specs


def test_unknown_spec_lists_valid_forms():
    for spec in ("clip", "vlm", "", "llava:foo"):
        with pytest.raises(EllaError, match="blip:<hub id or dir>") as err:
            load_vqa(spec)
        assert "mplug" in str(err.value) and "vlm:" in str(err.value)


def test_mplug_without_modelscope_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed, even where it is
    for make in (lambda: load_vqa("mplug"), lambda: load_vqa("mplug:damo/other"), MplugVQA):
        with pytest.raises(EllaError) as err:
            make()
        msg = str(err.value)
        assert "\n" not in msg and "pip install" in msg and "modelscope" in msg and "official DPG-Bench" in msg


def test_missing_blip_offline_is_one_paragraph(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingModelError) as err:
        load_vqa("blip:nobody/none", device="cpu")
    msg = str(err.value)
    assert "nobody/none" in msg and "hf download nobody/none" in msg and "VQA model" in msg and "\n" not in msg


# -------------------------------------------------------------------------------- tiny real models


def _spread(model, std: float = 0.3) -> None:
    """Re-draw the weight matrices wider: at the usual init (std 0.02) a tiny model gives every input
    the same answer, which would let a batching bug (an answer depending on its neighbours) pass."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, std)


BLIP_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"] + sorted(
    {"yes", "no", "a", "an", "the", "is", "are", "there", "cat", "cats", "dog", "dogs", "red", "blue", "green", "two"}
    | {"one", "on", "of", "in", "?", ".", ",", "left", "right"}
)


def build_tiny_blip_vqa(path: Path, seed: int = 0) -> Path:
    """A random BLIP VQA model in ``Salesforce/blip-vqa-capfilt-large``'s layout: ``config.json``,
    ``model.safetensors``, ``preprocessor_config.json`` (saying ``BlipImageProcessor``, the torchvision
    class, so loading must fall back to the PIL one when torchvision is absent) and a WordPiece
    ``BertTokenizer`` (``vocab.txt``, ``tokenizer.json``, ...) with BLIP's ``[DEC]`` bos token."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(BLIP_VOCAB) + "\n")
    tokenizer = BertTokenizer(vocab=str(path / "vocab.txt"), bos_token="[DEC]", model_max_length=512)
    tokenizer.save_pretrained(path)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre.update(image_processor_type="BlipImageProcessor", processor_class="BlipProcessor")
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))

    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(BLIP_VOCAB),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        encoder_hidden_size=32,
        pad_token_id=ids("[PAD]"),
        bos_token_id=ids("[DEC]"),
        sep_token_id=ids("[SEP]"),
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
        _spread(model)
    model.eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return build_tiny_blip_vqa(tmp_path_factory.mktemp("vqa") / "blip-vqa")


def test_blip_end_to_end(tiny_blip, tmp_path):
    vqa = load_vqa(f"blip:{tiny_blip}", device="cpu")
    assert vqa.name == f"blip:{tiny_blip.resolve()}"
    assert type(vqa.processor.image_processor).__name__ == "BlipImageProcessorPil"  # no torchvision here
    images = tiles(5, (50, 37)) + [Image.new("RGBA", (32, 32), (255, 0, 0, 128))]
    questions = QUESTIONS + ["is there a dog on the left?", "red?"]
    answers = vqa.batch(images, questions)
    assert len(answers) == 6 and all(isinstance(a, str) and a == a.strip().lower() for a in answers)
    assert len(set(answers)) > 2, answers  # the answers depend on image and question
    assert [vqa(im, q) for im, q in zip(images, questions)] == answers  # batching never changes an answer
    assert vqa.batch(images, questions) == answers  # deterministic
    vqa.batch_size = 2
    assert vqa.batch(images[::-1], questions[::-1]) == answers[::-1]

    cached = CachedVQA(vqa, tmp_path)
    assert cached.batch(images, questions) == answers
    assert CachedVQA(vqa, tmp_path).batch(images, questions) == answers


def build_tiny_llava(path: Path, seed: int = 0) -> Path:
    """A random LLaVA (CLIP vision tower + Llama) with a word-level tokenizer and a chat template."""
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + sorted(
        {"USER", "ASSISTANT", ":", "?", ".", ",", "yes", "no", "Yes", "No", "is", "there", "a", "cat", "dog", "red"}
        | {"blue", "Answer", "or"}
    )
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    template = (
        "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        chat_template=template,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(path)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(words),
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_id=words.index("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        _spread(model)
    model.eval().save_pretrained(path, safe_serialization=True)
    return path


def test_transformers_vlm_end_to_end(tmp_path):
    path = build_tiny_llava(tmp_path / "llava")
    vqa = load_vqa(f"vlm:{path}", device="cpu")
    assert isinstance(vqa, TransformersVLM) and vqa.name == f"vlm:{path.resolve()}"
    assert vqa._text("is there a cat?") == "USER: <image> is there a cat? Answer yes or no. ASSISTANT:"
    images, questions = tiles(4, (30, 20)), ["is there a cat?", "is there a red dog?", "red?", "is there a cat?"]
    answers = vqa.batch(images, questions)
    assert len(answers) == 4 and all(isinstance(a, str) and a == a.strip().lower() for a in answers)
    assert all("assistant" not in a for a in answers)  # the echoed prompt is cut off
    assert [vqa(im, q) for im, q in zip(images, questions)] == answers
    plain = TransformersVLM(path, device="cpu", prompt_template="Q: {question}")
    assert plain.name.endswith("|Q: {question}")  # another prompt, another cache


def test_cache_writers_share_answers(tmp_path):
    """Processes of a sharded run append to their own files and read each other's."""
    first = CachedVQA(FakeVQA({"q": "yes"}), tmp_path, writer="rank0")
    first.batch(tiles(1), ["q"])
    second = CachedVQA(FakeVQA({"q": "no"}), tmp_path, writer="rank1")
    assert second.batch(tiles(1), ["q"]) == ["yes"] and second.misses == 0
    second.batch(tiles(2)[1:], ["q"])
    assert sorted(p.name.split(".")[-2] for p in tmp_path.glob("*.jsonl")) == ["rank0", "rank1"]
    assert len(CachedVQA(FakeVQA(), tmp_path)) == 2
