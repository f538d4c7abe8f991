"""The README's examples, run as a user runs them (docstring examples run as doctests: pyproject's addopts).

- Every `maskopt ...` command the README or the CLI's docstring shows parses: its options exist and its
  values are valid (commands that need a GPU, TensorRT or the hub are checked this far).
- The embedded-default block of commands runs as written, in a fresh working folder.
- Then every Python block runs, in order, in one namespace, in a subprocess with an empty Hugging Face
  cache holding a tiny SD1.5-shaped pipeline under the hub id `stable-diffusion-v1-5/stable-diffusion-v1-5` and the hub
  offline: the README's own `from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")` loads it from there.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from maskopt.cli import main
from readme import README, blocks, commands
from tiny import tiny_pipeline

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def every_command() -> list[list[str]]:
    import maskopt.cli

    found = [argv for block in blocks("bash") for argv in commands(block)]
    found += [shlex.split(line.strip(), comments=True) for line in maskopt.cli.__doc__.splitlines()
              if line.strip().startswith("maskopt ")]
    # the first set-up command is `pip install ... && maskopt search`: its maskopt part
    found += [argv[argv.index("maskopt"):] for block in blocks("bash") for line in block.splitlines()
              if "&& maskopt" in line for argv in [shlex.split(line.replace("&&", " "), comments=True)]]
    return found


def test_every_command_the_readme_shows_parses():
    found = every_command()
    assert {argv[1] for argv in found} >= {"search", "export", "generate", "inspect"}
    for argv in found:
        command = main.commands[argv[1]]
        try:
            command.make_context(argv[1], argv[2:])  # parses options and converts values, runs nothing
        except click.ClickException as e:
            pytest.fail(f"README command {shlex.join(argv)!r}: {e.format_message()}")


def _hub_cache(root: Path) -> Path:
    """A Hugging Face cache holding a tiny SD1.5-shaped pipeline as the snapshot of stable-diffusion-v1-5/stable-diffusion-v1-5."""
    repo = root / "hub" / ("models--" + SD15.replace("/", "--"))
    commit = "0" * 40
    tiny_pipeline(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root


def test_the_readme_runs(readme_run, tmp_path):
    folder, (search, generate, export, generate_onnx, evaluation) = readme_run
    assert search.startswith("masks: runs/first/masks.json (20 evaluations)")
    assert generate.endswith("(seed 0; torch backend, ddim, 15 steps, guidance 1, 32x32; as searched)")
    assert "U-Net batch 1..4" in export  # searched at guidance 1: no classifier-free doubling
    assert generate_onnx.endswith("(seed 0; onnxruntime backend, ddim, 15 steps, guidance 1, 32x32; as searched)")
    assert evaluation.startswith("3 conditions x 80 images; first - FreeU on digits: ") and "runs/first-eval/report.md" in evaluation
    # the Python blocks, in order, with the SD1.5 hub id served from a local cache, offline
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n\n".join(blocks("python")))
    env = {**os.environ, "HF_HOME": str(_hub_cache(tmp_path / "hf")), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=folder)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout.strip().splitlines()
    assert printed[-2:] == ["unet_b3.onnx", "onnxruntime backend, ddim, 15 steps, guidance 1, 32x32; as searched"]
    assert (folder / "3.png").is_file()
    # the quickstart's mask file names the pipeline by its hub id, not by the cache folder it was loaded from
    assert json.loads((folder / "masks.json").read_text())["source"] == SD15


def test_links_to_the_docs_land_on_a_heading():
    import re as _re

    def anchor(heading: str) -> str:  # GitHub's: lower case, punctuation dropped, spaces to hyphens
        return _re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    links = _re.findall(r"\]\((docs/[\w.-]+\.md)(?:#([\w-]+))?\)", README)
    assert links
    for path, fragment in links:
        text = (Path(__file__).parent.parent / path).read_text()
        if fragment:
            assert fragment in {anchor(h) for h in _re.findall(r"^#+ (.+)$", text, _re.M)}, (path, fragment)
