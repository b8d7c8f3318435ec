"""The core install (no [train], no [bench]) runs the README's offline commands; the extras' commands say
in one line which extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

#: The packages the optional groups bring (pyproject.toml [project.optional-dependencies] train, bench);
#: pyyaml is in [train] too but huggingface_hub, a core dependency, already needs it.
EXTRA_PACKAGES = ("webdataset", "datasets", "tensorboard", "matplotlib")


def run_without_extras(body: str, tmp_path) -> subprocess.CompletedProcess:
    """``body`` in a fresh interpreter where importing any extra's package fails, as on a core install."""
    # None in sys.modules is how Python spells "not installed" to both `import` and importlib.util.find_spec
    code = textwrap.dedent(
        f"""
        import sys

        EXTRA_PACKAGES = {EXTRA_PACKAGES!r}
        sys.modules.update(dict.fromkeys(EXTRA_PACKAGES))
        from ella.cli import main
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )


def test_core_install_runs_the_offline_demo_and_names_the_extra_elsewhere(tmp_path):
    done = run_without_extras(
        """
        assert main(["demo", "--out", "demo.png", "--items", "1", "--steps", "2"]) == 0
        assert main(["generate", "a red circle", "--model", "shapes", "--steps", "2", "--out", "img"]) == 0
        for argv in (["train", "--train_data_dir", "x"], ["cache", "--output", "c", "--train_data_dir", "x"],
                     ["shapes", "reproduce", "--smoke", "--out", "s"]):
            assert main(argv) == 2, argv
        loaded = sorted(m for m in EXTRA_PACKAGES if sys.modules.get(m) is not None)
        print("extras imported:", loaded)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "demo.png").is_file() and len(list((tmp_path / "img").glob("*.png"))) == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("ella: error:")]
    assert len(errors) == 3, done.stderr
    assert all("pip install 'ella-diffusion[train]'" in line for line in errors), errors
    assert "Traceback" not in done.stderr
    assert "extras imported: []" in done.stdout
