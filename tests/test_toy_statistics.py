"""The paired bootstrap of the toy evaluations (minigen/toy/statistics.py).

References: the statistic recomputed on the whole sample (the point estimate is exact), and the normal
approximation of a mean's 95 % interval, mean ± 1.96·sd/√n, which the percentile bootstrap of 200 paired
gaps meets within 15 % at each end's distance from the mean.
"""

import numpy as np
import pytest

from minigen.toy.statistics import mean_value, paired_bootstrap, product_of_means


def test_the_mean_gap_has_an_interval_around_it():
    rng = np.random.default_rng(0)
    b = rng.random((200, 1))
    assert paired_bootstrap(b + 0.1, b, mean_value) == pytest.approx((0.1, 0.1, 0.1))
    a = b + rng.normal(0.05, 0.2, b.shape)  # a noisy gap of 0.05: the interval brackets the mean
    mean, low, high = paired_bootstrap(a, b, mean_value)
    d = (a - b)[:, 0]
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))  # 0.027
    assert mean == pytest.approx(float(d.mean()))
    assert mean - low == pytest.approx(half, rel=0.15) and high - mean == pytest.approx(half, rel=0.15)


def test_the_product_of_means_is_compared_over_the_same_rows():
    rng = np.random.default_rng(0)
    b = rng.random((300, 2))
    a = np.clip(b + rng.normal(0.1, 0.1, b.shape), 0, 1)
    mean, low, high = paired_bootstrap(a, b, product_of_means)
    assert mean == pytest.approx(a[:, 0].mean() * a[:, 1].mean() - b[:, 0].mean() * b[:, 1].mean())
    assert low < mean < high and high - low < 0.1


def test_rows_that_do_not_pair_up_are_refused():
    with pytest.raises(ValueError, match=r"the same rows \[n, k\] of both conditions, got shapes \(3, 1\) and \(2, 1\)"):
        paired_bootstrap(np.zeros((3, 1)), np.zeros((2, 1)), mean_value)
