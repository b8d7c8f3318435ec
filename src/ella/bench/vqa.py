"""VQA backends for DPG-Bench scoring: the official mPLUG, BLIP, any transformers VLM, a fake, and a disk cache.

The scorer needs only a callable ``vqa(image, question) -> str``; backends here add a stable
``name`` (the cache key: answers from different models must never mix) and ``batch()`` (one
forward pass for many tiles). Answers are normalised (stripped, lowercased) because the scorer
compares them with ``"yes"``. Generation is greedy so a cached answer is the answer a rerun gives.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..devices import default_device, resolve_dtype
from ..errors import EllaError, MissingModelError
from ..hub import is_local, loading

#: The scorer's contract; any such callable works, backends below also have ``name`` and ``batch``.
VQA = Callable[[Image.Image, str], str]

DEFAULT_MPLUG = "damo/mplug_visual-question-answering_coco_large_en"
DEFAULT_BLIP = "Salesforce/blip-vqa-capfilt-large"
DEFAULT_PROMPT = "{question} Answer yes or no."
SPECS = ("mplug", "mplug:<modelscope id or dir>", "blip", "blip:<hub id or dir>", "vlm:<hub id or dir>")
MPLUG_HINT = (
    'the "mplug" VQA backend (mPLUG-large, the official DPG-Bench VQA model) needs modelscope: '
    'pip install "ella-diffusion[mplug]" (or pip install modelscope); or pick another with --vqa blip'
)


def normalize_answer(text: str) -> str:
    return str(text).strip().lower()


def _check(images: Sequence, questions: Sequence) -> None:
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")


def ask_batch(vqa: VQA, images: Sequence[Image.Image], questions: Sequence[str], normalize: bool = True) -> list[str]:
    """Answer many questions, batched when ``vqa`` has ``batch()``, one by one otherwise.

    ``normalize=False`` keeps a plain callable's raw answers (the official scorer compares them
    exactly with "yes"; our backends normalise their own answers either way)."""
    _check(images, questions)
    if not images:
        return []
    batch = getattr(vqa, "batch", None)
    answers = batch(list(images), list(questions)) if batch else [vqa(i, q) for i, q in zip(images, questions)]
    return [normalize_answer(a) for a in answers] if normalize else list(answers)


class VQABackend:
    """Base class: a single question is a batch of one, so a backend implements only ``_answer``
    (and ``_length`` where padding would change answers)."""

    name: str = "vqa"
    batch_size: int = 16

    def __call__(self, image: Image.Image, question: str) -> str:
        return self.batch([image], [question])[0]

    def batch(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        _check(images, questions)
        lengths = [self._length(q) for q in questions]
        answers: list[str] = [""] * len(images)
        # Equal-length groups need no padding, so an answer never depends on what it was batched with
        # (BLIP's decoder attends to padded question positions); bounded chunks keep memory flat.
        for _, group in itertools.groupby(sorted(range(len(images)), key=lengths.__getitem__), lengths.__getitem__):
            idx = list(group)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                for i, answer in zip(chunk, self._answer([images[i] for i in chunk], [questions[i] for i in chunk])):
                    answers[i] = answer
        return [normalize_answer(a) for a in answers]

    def _answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        raise NotImplementedError

    def _length(self, question: str) -> int:
        """Token count of the model input for ``question``; only equal lengths are batched together."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _device_dtype(device, dtype):
    """fp16 on CUDA, fp32 on CPU unless told otherwise (the project-wide convention)."""
    device = str(device or default_device())
    return device, resolve_dtype(dtype, device)


def _ident(model_id: str | os.PathLike) -> str:
    """The id as a stable cache-key part: hub ids as given, local dirs as absolute paths."""
    path = Path(model_id).expanduser()
    return str(path.resolve()) if path.exists() else str(model_id)


class _HFBackend(VQABackend):
    """Shared generate-and-decode for transformers models (greedy, so answers are reproducible)."""

    def _text(self, question: str) -> str:
        return question

    def _length(self, question: str) -> int:
        return len(self.processor.tokenizer(self._text(question))["input_ids"])

    def _generate(self, inputs, strip_prompt: bool) -> list[str]:
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        prompt = inputs.get("input_ids")
        if (
            strip_prompt
            and prompt is not None
            and ids.shape[1] >= prompt.shape[1]
            and torch.equal(ids[:, : prompt.shape[1]], prompt)
        ):  # decoder-only models echo the prompt
            ids = ids[:, prompt.shape[1] :]
        return self.processor.batch_decode(ids, skip_special_tokens=True)


class BlipVQA(_HFBackend):
    """BLIP VQA (transformers ``BlipForQuestionAnswering``): no extra dependency, a good offline stand-in."""

    def __init__(
        self,
        model_id: str | os.PathLike = DEFAULT_BLIP,
        device: str | None = None,
        dtype=None,
        batch_size: int = 16,
        max_new_tokens: int = 10,
    ):
        # heavy: a transformers model class imports its modelling code; only the chosen backend pays for it
        from transformers import BlipForQuestionAnswering, BlipProcessor

        self.device, self.dtype = _device_dtype(device, dtype)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.name = f"blip:{_ident(model_id)}"
        with loading("VQA model", str(model_id)):
            self.processor = BlipProcessor.from_pretrained(model_id)
            self.model = BlipForQuestionAnswering.from_pretrained(model_id, dtype=self.dtype)
        self.model.to(self.device).eval()

    def _answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        inputs = self.processor(
            images=[im.convert("RGB") for im in images], text=questions, return_tensors="pt", padding=True
        )
        return self._generate(inputs, strip_prompt=False)


class TransformersVLM(_HFBackend):
    """Any transformers image-text-to-text model (LLaVA, Qwen-VL, SmolVLM ...) asked for a yes/no answer.

    The question goes through the processor's chat template when it has one (instruction-tuned
    models answer badly without it), else ``prompt_template`` is used as plain text. Answers that
    begin with yes/no ("Yes, there is a cat.") are cut to that word, which is what the scorer checks.
    """

    def __init__(
        self,
        model_id: str | os.PathLike,
        device: str | None = None,
        dtype=None,
        prompt_template: str = DEFAULT_PROMPT,
        batch_size: int = 8,
        max_new_tokens: int = 8,
    ):
        # heavy: a transformers model class imports its modelling code; only the chosen backend pays for it
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device, self.dtype = _device_dtype(device, dtype)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.prompt_template = prompt_template
        self.name = f"vlm:{_ident(model_id)}"
        if prompt_template != DEFAULT_PROMPT:  # a different prompt gives different answers: another cache
            self.name += f"|{prompt_template}"
        with loading("VQA model", str(model_id)):
            self.processor = AutoProcessor.from_pretrained(model_id)
            self.model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=self.dtype)
        self.model.to(self.device).eval()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # batched decoder-only generation continues from the right end

    def _text(self, question: str) -> str:
        text = self.prompt_template.format(question=question)
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return text

    def _answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        inputs = self.processor(
            images=[im.convert("RGB") for im in images],
            text=[self._text(q) for q in questions],
            return_tensors="pt",
            padding=True,
        )
        return [first_yes_no(a) for a in self._generate(inputs, strip_prompt=True)]


def first_yes_no(answer: str) -> str:
    """``"Yes, there is."`` -> ``"yes"``; anything not starting with yes/no is kept (normalised)."""
    answer = normalize_answer(answer)
    match = re.match(r"(yes|no)\b", answer)
    return match.group(1) if match else answer


class MplugVQA(VQABackend):
    """mPLUG-large through modelscope, exactly as the official ``compute_dpg_bench.py`` asks it."""

    def __init__(self, model_id: str | os.PathLike = DEFAULT_MPLUG, device: str | None = None):
        try:  # modelscope is the optional `mplug` extra (and heavy): imported only for this backend
            from modelscope.pipelines import pipeline
            from modelscope.utils.constant import Tasks
        except ImportError:
            raise EllaError(MPLUG_HINT) from None
        device = str(device or default_device())  # modelscope takes cpu, cuda, cuda:N
        self.name = f"mplug:{_ident(model_id)}"
        self.batch_size = 1  # the modelscope pipeline takes one {image, question} at a time
        try:
            self.pipe = pipeline(Tasks.visual_question_answering, model=str(model_id), device=device)
        except Exception as err:  # modelscope's hub is not Hugging Face's: its own fetch command
            if is_local(model_id):
                raise EllaError(f"could not load the VQA model from {model_id}: {type(err).__name__}: {err}") from err
            raise MissingModelError(
                f"Missing VQA model: {str(model_id)!r} is not a local path and could not be fetched from ModelScope "
                f"({type(err).__name__}). On a machine with internet run `modelscope download --model {model_id} "
                "--local_dir DIR` and pass that directory with --vqa mplug:DIR."
            ) from None

    def _answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        return [self.pipe({"image": im, "question": q})["text"] for im, q in zip(images, questions)]


class FakeVQA(VQABackend):
    """Deterministic answers from a rule, for tests and docs: a dict question -> answer (``default``
    otherwise) or a callable ``(image, question) -> answer``. Counts what it was asked."""

    def __init__(
        self,
        rule: Mapping[str, str] | Callable[[Image.Image, str], str] | None = None,
        default: str = "no",
        name: str = "fake",
    ):
        self.rule, self.default, self.name = rule or {}, default, name
        self.calls = 0  # questions answered (the cache tests check the backend is not asked again)
        self.batch_sizes: list[int] = []

    def batch(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        self.batch_sizes.append(len(images))
        return super().batch(images, questions)

    def _answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        self.calls += len(questions)
        if callable(self.rule):
            return [self.rule(im, q) for im, q in zip(images, questions)]
        return [self.rule.get(q, self.default) for q in questions]


def load_vqa(spec: str = "mplug", device: str | None = None, dtype=None) -> VQABackend:
    """A backend from ``mplug`` (official), ``blip``, ``blip:<id|dir>``, ``vlm:<id|dir>`` or ``mplug:<id|dir>``.

    ``dtype`` does not apply to mplug (modelscope chooses).
    """
    kind, _, ident = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind == "mplug":
        return MplugVQA(ident or DEFAULT_MPLUG, device=device)
    if kind == "blip":
        return BlipVQA(ident or DEFAULT_BLIP, device=device, dtype=dtype)
    if kind == "vlm" and ident:
        return TransformersVLM(ident, device=device, dtype=dtype)
    raise EllaError(f"unknown VQA backend {spec!r}; use one of: {', '.join(SPECS)}")


# ----------------------------------------------------------------------------------------- cache


def image_digest(image: Image.Image) -> str:
    """sha256 over mode, size and raw pixels: identical tiles hit, any pixel change misses (no PNG encode)."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class CachedVQA(VQABackend):
    """Answers cached on disk per (image pixels, question, backend name): rescoring is free and an
    interrupted run resumes where it stopped.

    One append-only JSONL file per backend in ``cache_dir``, loaded at start and appended (flushed
    and fsynced) after every ``flush_every`` answers, so a crash loses at most those. A line cut
    short by a crash is dropped. Only cache misses reach the backend. Concurrent processes pass
    distinct ``writer`` names: each appends to its own file and reads everyone's.
    """

    def __init__(
        self,
        backend: VQA,
        cache_dir: str | os.PathLike,
        name: str | None = None,
        flush_every: int = 64,
        writer: str = "",
    ):
        self.backend, self.flush_every = backend, flush_every
        self.name = name or getattr(backend, "name", None)
        if not self.name:
            raise EllaError("CachedVQA needs a backend with a `name` (or pass name=...): it keys the cache")
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)[-80:]
        stem = f"{slug}-{hashlib.sha256(self.name.encode()).hexdigest()[:10]}"
        self.path = Path(cache_dir) / f"{stem}{'.' + writer if writer else ''}.jsonl"
        self._pattern = f"{stem}*.jsonl"
        self.hits = self.misses = 0
        self._answers: dict[tuple[str, str], str] = {}
        self._valid_bytes: int | None = None  # where a crash-truncated tail starts, if there is one
        self._load()

    def _load(self) -> None:
        for path in sorted(self.path.parent.glob(self._pattern)):
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data) and path == self.path:  # a crash mid-write: cut the partial line before appending
                self._valid_bytes = end
            for number, line in enumerate(data[:end].splitlines(), 1):
                try:
                    row = json.loads(line)
                    if row["backend"] == self.name:
                        self._answers[row["image"], row["question"]] = row["answer"]
                except (ValueError, KeyError, TypeError):
                    warnings.warn(f"{path}:{number}: skipping an unreadable VQA cache line", stacklevel=2)

    def __len__(self) -> int:
        return len(self._answers)

    def batch(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        _check(images, questions)
        keys = [(image_digest(im), q) for im, q in zip(images, questions)]
        todo: dict[tuple[str, str], int] = {}  # each missing key once, even if asked twice in this batch
        for i, key in enumerate(keys):
            if key not in self._answers and key not in todo:
                todo[key] = i
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        misses = list(todo.values())
        for start in range(0, len(misses), self.flush_every):
            idx = misses[start : start + self.flush_every]
            answers = ask_batch(self.backend, [images[i] for i in idx], [questions[i] for i in idx])
            self._append([(keys[i], a) for i, a in zip(idx, answers)])
        return [self._answers[key] for key in keys]

    def _append(self, rows: list[tuple[tuple[str, str], str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(
            json.dumps({"image": img, "question": q, "backend": self.name, "answer": a}) + "\n" for (img, q), a in rows
        )
        with open(self.path, "ab") as f:
            if self._valid_bytes is not None:
                f.truncate(self._valid_bytes)
                self._valid_bytes = None
            f.write(lines.encode())
            f.flush()
            os.fsync(f.fileno())
        for key, answer in rows:
            self._answers[key] = answer
