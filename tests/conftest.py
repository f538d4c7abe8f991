import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # tiny models: a second thread costs more than it gives

from tiny import TINY_SD, tiny_unet  # noqa: E402


@pytest.fixture
def unet():
    return tiny_unet(TINY_SD)


@pytest.fixture(scope="session")
def pipe_dir():
    """The tiny SD pipeline saved once per run (export_helpers.pipeline), for the tests that only read it."""
    from export_helpers import pipeline

    return pipeline()


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory):
    """The README's first steps on the embedded default (search, generate, export, generate), run once: the folder
    they ran in and the last line each command printed. test_docs and test_default read what they wrote."""
    from readme import run_first_steps

    folder = tmp_path_factory.mktemp("readme")
    return folder, run_first_steps(folder)
