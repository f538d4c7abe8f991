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


def test_bca_is_the_interval_and_percentile_stays_available():
    """BCa (scipy) by default; on skewed differences it is shifted towards the long tail, unlike the percentile one."""
    rng = np.random.default_rng(1)
    d = rng.exponential(0.05, 80) - 0.02  # skewed like held-out reward gains: many small, a few large
    bca, pct = paired(np.zeros(80), d), paired(np.zeros(80), d, method="percentile")
    assert bca.diff == pct.diff and bca.ci_low > pct.ci_low and bca.ci_high > pct.ci_high
    same = paired([0.5, 0.6, 0.7], [0.6, 0.7, 0.8])  # equal differences up to float rounding: no NaN
    assert abs(same.ci_low - 0.1) < 1e-9 and abs(same.ci_high - 0.1) < 1e-9
    with pytest.raises(ValueError, match="unknown method"):
        paired([1.0], [2.0], method="normal")
