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
