"""Paired comparisons of two conditions over the same images, with a bootstrap interval.

Every evaluation of the toy world draws the same prompts with the same seeds under each condition, so the
images pair up: `paired_bootstrap(a, b, statistic)` gives statistic(a) - statistic(b) and its 95 %
percentile interval, the rows resampled with replacement and the same rows taken for both. The
statistics take rows [..., n, k] (resampled rows stack in front): `mean_value` of one column,
`product_of_means` of the two columns (CP, PF), the benchmarks' CP·PF.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RESAMPLES = 10_000


def mean_value(x: np.ndarray) -> np.ndarray:
    """[..., n, 1] rows -> their mean."""
    return x[..., 0].mean(-1)


def product_of_means(x: np.ndarray) -> np.ndarray:
    """[..., n, 2] (CP, PF) rows -> mean CP x mean PF over the rows."""
    return x[..., 0].mean(-1) * x[..., 1].mean(-1)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], seed: int = 0,
                     resamples: int = RESAMPLES) -> tuple[float, float, float]:  # fmt: skip
    """statistic(a) - statistic(b) for paired rows [n, k] (the same images under two conditions) and its
    95 % percentile interval: the rows resampled with replacement, the same rows for both."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or not len(a):
        raise ValueError(f"paired_bootstrap takes the same rows [n, k] of both conditions, got shapes {a.shape} and {b.shape}")
    rows = np.random.default_rng(seed).integers(0, len(a), (resamples, len(a)))
    low, high = np.percentile(statistic(a[rows]) - statistic(b[rows]), [2.5, 97.5])
    return float(statistic(a) - statistic(b)), float(low), float(high)
