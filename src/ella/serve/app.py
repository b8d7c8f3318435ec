"""The ``ella serve`` page: gradio components over :class:`~ella.serve.backend.Backend`.

Gradio does the web work (components, the request queue, the progress bar, the ``/generate`` API that
``gradio_client`` calls); this module only lays out the form and turns a click into a
:class:`~ella.serve.backend.Request`. Bad input comes back as a ``gr.Error`` in the page (one line, the same
text ``ella generate`` prints) and the server keeps serving.

Script use, against a running server::

    from gradio_client import Client
    images, sidecars, questions, seed = Client("http://127.0.0.1:7860").predict(
        prompt="a red square above a blue circle", seed=7, api_name="/generate")
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import gradio as gr

from ..errors import EllaError
from ..schedulers import SCHEDULER_ALIASES
from .backend import Backend, Request

SHAPES_BANNER = (
    "**Shapes model** — the mini ELLA shipped in the package (MiniLM + a trained connector, 64×64 shapes on a "
    "3×3 grid), running offline. Every image of an example prompt is marked PASS/FAIL per question by the "
    "shapes-DPG oracle. For Stable Diffusion 1.5 with Flan-T5-XL, download the models (see the README: "
    "`hf download QQGYLab/ELLA ella-sd1.5-tsc-t5xl.safetensors`, `google/flan-t5-xl`, an SD1.5 base) and start "
    "`ella serve --base BASE --ella QQGYLab/ELLA --llm google/flan-t5-xl`."
)


def questions_markdown(marks: list[list[tuple[str, bool]]]) -> str:
    if not marks:
        return ""
    lines = []
    for k, image in enumerate(marks):
        passed = sum(ok for _, ok in image)
        lines.append(f"**image {k + 1}: {passed}/{len(image)} questions pass**\n")
        lines += [f"- {'PASS' if ok else 'FAIL'} — {q}" for q, ok in image]
    return "\n".join(lines)


def build_app(backend: Backend) -> gr.Blocks:
    d = backend.defaults
    with gr.Blocks(title="ELLA") as app:
        gr.Markdown("# ELLA — an LLM's understanding of language for Stable Diffusion")
        if backend.shapes:
            gr.Markdown(SHAPES_BANNER, elem_id="banner")
        else:
            gr.Markdown(f"Models: `{json.dumps(backend.sources)}`", elem_id="banner")
        last_sidecars = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="prompt", lines=4, elem_id="prompt", placeholder="a dense description")
                negative = gr.Textbox(label="negative prompt", value="", elem_id="negative")
                clip_prompt = gr.Textbox(
                    label="CLIP prompt (ella+clip: trigger words, tags; empty = the prompt)",
                    value="",
                    visible=not backend.shapes,
                    elem_id="clip_prompt",
                )
                with gr.Row():
                    seed = gr.Number(label="seed (-1 = random)", value=-1, precision=0, elem_id="seed")
                    random_seed = gr.Button("random seed", size="sm")
                    reuse = gr.Button("reuse last seed", size="sm")
                with gr.Row():
                    steps = gr.Slider(0, 150, value=d.steps, step=1, label="steps", elem_id="steps")
                    guidance = gr.Slider(0, 20, value=d.guidance, step=0.5, label="guidance", elem_id="guidance")
                with gr.Row():
                    width = gr.Slider(0, 2048, value=d.width, step=8, label="width", elem_id="width")
                    height = gr.Slider(0, 2048, value=d.height, step=8, label="height", elem_id="height")
                with gr.Row():
                    scheduler = gr.Dropdown(["default", *SCHEDULER_ALIASES], value="default", label="scheduler")
                    num_images = gr.Slider(0, 8, value=1, step=1, label="images")
                    mode = gr.Radio(
                        ["ella", "ella+clip"], value="ella", label="mode", visible=not backend.shapes, elem_id="mode"
                    )
                with gr.Accordion(
                    "image to image, inpainting" + ("" if not backend.controlnet else ", ControlNet"), open=False
                ):
                    # files, not gr.Image: the backend reads them with `ella generate`'s own checks, so a file
                    # that is not a picture gets one error line (gr.Image would fail inside gradio first)
                    init_image = gr.File(label="init image", file_types=["image"], type="filepath")
                    mask_image = gr.File(label="mask (white = repaint)", file_types=["image"], type="filepath")
                    strength = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="strength")
                    control_image = gr.File(
                        label="ControlNet input", file_types=["image"], type="filepath", visible=backend.controlnet
                    )
                loras = gr.CheckboxGroup(
                    list(backend.loras), value=[], label="LoRAs (loaded with --lora)", visible=bool(backend.loras)
                )
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                if backend.shapes:
                    new_scene = gr.Button("new scene prompt (questions known)", size="sm")
                gr.Examples(backend.examples(), inputs=[prompt], label="examples")
            with gr.Column(scale=4):
                gallery = gr.Gallery(
                    label="results", format="png", columns=2, height=420, object_fit="contain", elem_id="gallery",
                    interactive=False,
                )  # fmt: skip
                sidecars = gr.File(label="sidecar JSON (every setting)", file_count="multiple", elem_id="sidecars")
                questions = gr.Markdown(elem_id="questions")
                last_seed = gr.Number(label="last seed", precision=0, interactive=False, elem_id="last_seed")
                gr.Markdown("Click an image to send its settings back to the form.")

        def run(
            prompt: str,
            negative_prompt: str = "",
            seed: int = -1,
            steps: int = d.steps,
            guidance: float = d.guidance,
            width: int = d.width,
            height: int = d.height,
            scheduler: str = "default",
            num_images: int = 1,
            mode: str = "ella",
            clip_prompt: str = "",
            init_image: str | None = None,
            mask_image: str | None = None,
            strength: float = 0.8,
            control_image: str | None = None,
            loras: list[str] | None = None,
            progress=gr.Progress(),  # noqa: B008 -- gradio's way to ask for a progress bar
        ):
            request = Request(
                prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, num_images, mode,
                clip_prompt, init_image, mask_image, strength, control_image, list(loras or []),
            )  # fmt: skip
            try:
                result = backend.generate(request, on_step=lambda done, total: progress(done / total, desc="denoising"))
            except EllaError as err:
                raise gr.Error(str(err)) from None
            shown = [
                (str(p), f"seed {json.loads(s.read_text())['seed']}") for p, s in zip(result.images, result.sidecars)
            ]
            files = [str(s) for s in result.sidecars]
            return shown, files, questions_markdown(result.questions), result.seed, files

        inputs = [prompt, negative, seed, steps, guidance, width, height, scheduler, num_images, mode, clip_prompt]
        inputs += [init_image, mask_image, strength, control_image, loras]
        generate.click(
            run, inputs, [gallery, sidecars, questions, last_seed, last_sidecars], api_name="generate",
            concurrency_limit=1,
        )  # fmt: skip
        random_seed.click(lambda: -1, None, seed, api_visibility="private")
        reuse.click(lambda last: last if last is not None else -1, last_seed, seed, api_visibility="private")

        def send_back(files: list[str], evt: gr.SelectData):
            """The clicked image's sidecar, back into the form (the image's own seed, not the request's)."""
            record = json.loads(Path(files[evt.index]).read_text())
            values = [record.get(k) for k in ("prompt", "negative_prompt", "seed", "steps", "guidance")]
            values += [record.get(k) for k in ("width", "height", "condition_mode")]
            return [*values, record.get("clip_prompt") or ""]

        gallery.select(
            send_back, last_sidecars, [prompt, negative, seed, steps, guidance, width, height, mode, clip_prompt],
            api_visibility="private",
        )  # fmt: skip
        if backend.shapes:
            counter = gr.State(EXAMPLES_OFFSET)
            new_scene.click(
                lambda i: (backend.scene_prompt(i), i + 1), counter, [prompt, counter], api_visibility="private"
            )
    return app


#: "new scene prompt" draws held-out scenes after the examples' own.
EXAMPLES_OFFSET = 100


def serve(backend: Backend, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Queue (one generation at a time, others wait their turn), launch, print where, block until stopped."""
    app = build_app(backend)
    app.queue(default_concurrency_limit=1, max_size=64)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        show_error=True,
        quiet=True,
        allowed_paths=[str(backend.out.resolve())],
        footer_links=["api"],
    )
    print(f"ella serve: http://{host}:{port}", flush=True)
    # SIGTERM (a service manager, a test stopping it by PID) stops it like Ctrl-C: gradio's own shutdown, exit 0
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app.block_thread()  # returns on KeyboardInterrupt, after closing the server
    finally:
        app.close()


def _interrupt(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough: a second must not cut the shutdown short
    raise KeyboardInterrupt
