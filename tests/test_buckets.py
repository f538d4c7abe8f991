import pytest
import torch

from maskopt import Buckets, MaskoptError
from maskopt.buckets import scalar_timestep


def test_uniform_and_edges():
    b = Buckets.uniform(4)
    assert b.ranges == ((0, 249), (250, 499), (500, 749), (750, 999))
    assert [b.index(t) for t in (0, 249, 249.99, 250, 499, 500, 999)] == [0, 0, 0, 1, 1, 2, 3]
    assert b.index(-3) == 0 and b.index(5000) == 3  # clamped
    assert Buckets.uniform(3).ranges == ((0, 332), (333, 666), (667, 999))
    assert Buckets.from_edges([100, 900]).ranges == ((0, 99), (100, 899), (900, 999))


def test_invalid_buckets():
    with pytest.raises(MaskoptError, match="bucket 1 starts at 300, expected 250"):
        Buckets(((0, 249), (300, 999)))
    with pytest.raises(MaskoptError, match="ends at 899, expected 999"):
        Buckets(((0, 899),))
    with pytest.raises(MaskoptError, match="K=0"):
        Buckets.uniform(0)


def test_scalar_timestep():
    assert scalar_timestep(torch.tensor(7)) == 7.0
    assert scalar_timestep(torch.tensor([5.5, 5.5])) == 5.5
    with pytest.raises(MaskoptError, match="mixes timesteps"):
        scalar_timestep(torch.tensor([5, 6]))
