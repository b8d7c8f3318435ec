"""``ella serve``: the web app as its users meet it, one real server process (the shipped shapes model, CPU,
offline) driven through gradio_client and a real headless browser."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

gradio_client = pytest.importorskip(
    "gradio_client", reason="`ella serve` tests need gradio_client (pip install -e '.[serve]')"
)

READY = "ella serve: "
START_TIMEOUT = 90  # seconds for the server to print its ready line
STEPS = 4  # few sampling steps: every request stays well under a second on a CPU
PROMPT = "a big red square in the center on a white background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``ella serve`` subprocess; its output is drained by a thread (so it never blocks on a full pipe)."""

    def __init__(self, out: Path):
        self.out = out
        self.port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ella.cli",
                "serve",
                "--model",
                "shapes",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--out",
                str(out),
                "--device",
                "cpu",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.url is None and line.startswith(READY):
                self.url = line[len(READY) :].strip()
                self.ready.set()
        self.ready.set()  # the process ended: wake the waiter

    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float) -> str:
        if not self.ready.wait(timeout):
            self.stop()
            pytest.fail(f"ella serve printed no ready line in {timeout} s; its output:\n{self.output()}")
        if self.url is None:
            self.proc.wait(timeout=10)
            pytest.fail(f"ella serve exited ({self.proc.returncode}) while starting; its output:\n{self.output()}")
        return self.url

    def stop(self) -> bool:
        """SIGTERM, by its pid; True when it stopped on its own (a kill was not needed)."""
        if self.proc.poll() is not None:
            return True
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
            return True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return False
        finally:
            self.reader.join(timeout=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve-out"))
    srv.wait_ready(START_TIMEOUT)
    assert srv.url == f"http://127.0.0.1:{srv.port}", srv.output()
    yield srv
    stopped = srv.stop()
    assert srv.proc.returncode is not None, "ella serve is still running after SIGTERM and SIGKILL"
    assert stopped, f"ella serve ignored SIGTERM for 20 s (killed); its output:\n{srv.output()}"
    assert srv.proc.returncode == 0, f"SIGTERM should stop it cleanly (exit 0); its output:\n{srv.output()}"


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("client-downloads")


def client_for(server, downloads):
    return gradio_client.Client(server.url, verbose=False, download_files=str(downloads), analytics_enabled=False)


@pytest.fixture(scope="module")
def client(server, downloads):
    return client_for(server, downloads)


def image_path(entry) -> Path:
    """A gallery item from gradio_client: {"image": path} or {"image": {"path": ...}} (or a bare path / tuple)."""
    if isinstance(entry, (list, tuple)):
        entry = entry[0]
    if isinstance(entry, dict):
        entry = entry.get("image", entry)
    if isinstance(entry, dict):
        entry = entry["path"]
    return Path(entry)


def request(client, prompt: str = PROMPT, **kwargs):
    """One /generate call: (PNG bytes per image, sidecar dicts, questions text, seed used)."""
    kwargs.setdefault("steps", STEPS)
    gallery, sidecars, questions, seed_used = client.predict(prompt=prompt, api_name="/generate", **kwargs)
    return unpack(gallery, sidecars, questions, seed_used)


def unpack(gallery, sidecars, questions, seed_used):
    images = [image_path(entry).read_bytes() for entry in gallery]
    metas = [json.loads(Path(p["path"] if isinstance(p, dict) else p).read_text()) for p in sidecars]
    assert len(images) == len(metas) >= 1
    assert all(b.startswith(b"\x89PNG") for b in images)
    return images, metas, questions, seed_used


def cli_png(run_cli, out: Path, prompt: str, seed: int, steps: int = STEPS) -> bytes:
    """``ella generate --model shapes`` with the server's defaults, in this process: the PNG's bytes."""
    flags = f"--model shapes --seed {seed} --steps {steps} --guidance 5 --width 64 --height 64 --device cpu"
    code, _, err = run_cli("generate", prompt, *flags.split(), "--out", str(out))
    assert code == 0, err
    (png,) = out.glob("000-*-seed*.png")
    assert png.name.endswith(f"-seed{seed}.png")
    return png.read_bytes()


def test_generate_matches_the_cli_byte_for_byte_and_random_seeds_reproduce(server, client, run_cli, tmp_path):
    images, metas, _, seed_used = request(client, seed=11, guidance=5.0, width=64, height=64, num_images=1)
    assert seed_used == 11
    assert len(images) == 1
    meta = metas[0]
    assert (meta["prompt"], meta["seed"], meta["steps"]) == (PROMPT, 11, STEPS), meta
    assert (meta["width"], meta["height"], meta["guidance"]) == (64, 64, 5.0), meta
    assert images[0] == cli_png(run_cli, tmp_path / "cli", PROMPT, 11), "the server's PNG differs from ella generate's"
    # the server kept its own copy: PNG + sidecar in a folder of its --out
    kept = [p for p in server.out.rglob("*.png") if p.read_bytes() == images[0]]
    assert kept, f"no PNG under --out {server.out} equals the returned image"
    assert kept[0].parent != server.out and kept[0].with_suffix(".json").is_file()

    # seed -1: a random seed, reported, that reproduces the same image when passed back
    random_images, random_metas, _, drawn = request(client, seed=-1)
    assert isinstance(drawn, int) and drawn >= 0
    assert random_metas[0]["seed"] == drawn
    again, _, _, seed_again = request(client, seed=drawn)
    assert seed_again == drawn
    assert again[0] == random_images[0]
    _, _, _, other = request(client, seed=-1)
    assert other != drawn, "two random-seed requests drew the same seed"


def test_two_simultaneous_requests_each_get_their_own_image(server, downloads):
    a, b = client_for(server, downloads), client_for(server, downloads)
    asks = [
        (a, "a small blue circle in the top left corner on a black background", 21),
        (b, "a big green triangle in the bottom right corner on a white background", 22),
    ]
    t0 = time.perf_counter()
    jobs = [c.submit(prompt=p, seed=s, steps=STEPS, api_name="/generate") for c, p, s in asks]
    results = [unpack(*job.result(timeout=60)) for job in jobs]
    assert time.perf_counter() - t0 < 60
    for (_, prompt, seed), (images, metas, _, seed_used) in zip(asks, results):
        assert len(images) == 1 and seed_used == seed
        assert (metas[0]["prompt"], metas[0]["seed"]) == (prompt, seed), metas[0]
    assert results[0][0][0] != results[1][0][0], "the two requests got the same image"
    # each image is the one its request would get alone (no state leaked between the two)
    for (c, prompt, seed), (images, _, _, _) in zip(asks, results):
        alone, _, _, _ = request(c, prompt, seed=seed)
        assert alone[0] == images[0], f"{prompt!r} seed {seed}: concurrent image differs from the one drawn alone"


@pytest.mark.parametrize(
    ("change", "hint"),
    [
        ({"prompt": "   "}, ("prompt",)),
        ({"width": 100}, ("multiple", "8", "100")),
        ({"steps": 0}, ("steps",)),
        ({"init_image": "TEXT_FILE"}, ("image",)),
    ],
    ids=["empty-prompt", "width-100", "steps-0", "text-file-as-init-image"],
)
def test_bad_input_is_refused_with_a_hint_and_the_server_keeps_serving(server, client, tmp_path, change, hint):
    kwargs = {"prompt": PROMPT, "seed": 3, "steps": STEPS, **change}
    if kwargs.get("init_image") == "TEXT_FILE":
        text = tmp_path / "notes.txt"
        text.write_text("not an image\n")
        kwargs["init_image"] = gradio_client.handle_file(str(text))
    with pytest.raises(Exception) as refused:  # gradio_client's AppError (or ValueError) carrying gr.Error's text
        client.predict(api_name="/generate", **kwargs)
    message = str(refused.value)
    assert all(word in message.lower() for word in hint), f"refusal without a hint {hint}: {message!r}"
    assert "\n" not in message.strip() and "Traceback" not in message, f"not a one-line refusal: {message!r}"
    assert server.proc.poll() is None, server.output()
    images, metas, _, _ = request(client, seed=3)  # still serving
    assert len(images) == 1 and metas[0]["seed"] == 3


def test_questions_are_judged_for_a_shapes_prompt(client):
    """An example prompt (a held-out scene, as `ella demo` draws them): each of its shapes-DPG questions comes back
    PASS or FAIL, and each mark is the oracle's verdict on the returned image."""
    from PIL import Image

    from ella.shapes.captions import prompt_for
    from ella.shapes.evaluate import EVAL_KINDS, EVAL_SEED_OFFSET
    from ella.shapes.oracle import ShapesOracle
    from ella.shapes.questions import questions
    from ella.shapes.world import scene_for

    seed = EVAL_SEED_OFFSET + 7
    caption = prompt_for(seed, 0, EVAL_KINDS[0])
    images, _, text, _ = request(client, caption.text, seed=7)
    assert isinstance(text, str)
    marks = [line for line in text.splitlines() if "PASS" in line or "FAIL" in line]
    asked = questions(scene_for(seed, 0), caption.specified)
    assert asked and len(marks) == len(asked), f"{len(asked)} questions, PASS/FAIL lines: {text!r}"
    image = Image.open(io.BytesIO(images[0])).convert("RGB")
    oracle = ShapesOracle()
    for q in asked:
        verdict = "PASS" if oracle(image, q.question) == "yes" else "FAIL"
        assert any(q.question in line and verdict in line for line in marks), f"{verdict} {q.question}: {text!r}"
    # a prompt of no known scene gets no questions
    _, _, none, _ = request(client, PROMPT, seed=7)
    assert "PASS" not in none and "FAIL" not in none, none


def test_a_real_browser_generates_an_image(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (.[test])")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver_bin:
        pytest.skip("chromium / chromedriver not on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_bin), options=options)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 60)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        box.clear()
        box.send_keys("a big blue circle in the center on a white background")
        driver.find_element(By.ID, "generate").click()
        img = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#gallery img")))
        assert img.get_attribute("src"), "the gallery's image has no src"
        loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
        wait.until(lambda d: d.execute_script(loaded, img))  # the PNG itself arrived and decoded
        shot = tmp_path / "ella-serve.png"
        assert driver.save_screenshot(str(shot))
        assert shot.is_file() and shot.stat().st_size > 10_000
    finally:
        driver.quit()
