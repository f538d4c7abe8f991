"""The README's code blocks, and its first-steps block run once per test session (`readme_run` in conftest)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from click.testing import CliRunner

README = (Path(__file__).parent.parent / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def commands(text: str) -> list[list[str]]:
    """The argv of every `maskopt` command line in `text` (comments dropped)."""
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip().startswith("maskopt ")]


def run_first_steps(folder: Path) -> list[str]:
    """Run the README's block of commands on the embedded default in `folder`; the last line each printed."""
    import os

    from maskopt.cli import main

    import torch

    flow = next(b for b in blocks("bash") if "maskopt search --budget" in b)
    here, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(folder)
    torch.set_num_threads(2)  # as the command runs for a user on this 2-core machine (tests/conftest sets 1 for tiny models)
    try:
        last = []
        for argv in commands(flow):
            r = CliRunner().invoke(main, argv[1:])
            assert r.exit_code == 0, (shlex.join(argv), r.output)
            last.append(r.stdout.strip().splitlines()[-1])
        return last
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
