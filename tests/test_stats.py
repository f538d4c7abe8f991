import numpy as np
import pytest

from maskopt.stats import paired


def test_clear_gain_and_no_difference():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 400)
    gain = paired(base, base + 0.05 + rng.normal(0, 0.01, 400))
    assert gain.significant and gain.ci_low > 0.04 and abs(gain.diff - 0.05) < 0.005
    assert "gain" in gain.describe()
    noise = paired(base, base + rng.normal(0, 0.1, 400))
    assert noise.ci_low < 0 < noise.ci_high and not noise.significant
    assert "no significant difference" in noise.describe()
    loss = paired(base, base - 0.1)
    assert loss.ci_high < 0 and "loss" in loss.describe()


def test_rejects_unpaired():
    with pytest.raises(ValueError, match="equal-length"):
        paired([1, 2], [1])
