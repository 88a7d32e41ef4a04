"""How sure an evaluation number is, from its per-query values (scipy.stats).

A model's score on a set is the mean of its queries' values; on several sets, the plain mean of the
sets' means (as sentence-transformers pools NanoBEIR). So every statistic here takes one array of
per-query values per set, resamples queries within each set (a stratified bootstrap: scipy
resamples each sample on its own) and pools the resampled means as the score is pooled.

- `interval`: the score's percentile bootstrap interval and standard error.
- `paired_difference`: the same for model A minus model B on the same queries (the per-query
  differences resampled: a paired bootstrap), with a one-sided paired randomization test (each
  query's difference keeps or flips its sign, the sets weighted as the pooled mean weighs them).
Both are seeded: the same values give the same interval and p-value on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# resamples drawn at once: MS MARCO dev's 6,980 queries x 500 stay in 28 MB
BATCH = 500
TEST_NAME = "paired randomization test (sign flips of the per-query differences)"


@dataclass(frozen=True)
class Resampling:
    """How intervals and tests are drawn; params.yaml's evaluate.intervals (config.IntervalConfig)
    has the same fields and is passed as one."""
    resamples: int = 2000
    confidence: float = 0.95
    test_resamples: int = 10_000
    seed: int = 0


def _pooled_mean(*samples, axis=-1):
    return np.mean([np.mean(sample, axis=axis) for sample in samples], axis=0)


def pooled(per_set: list[np.ndarray]) -> float:
    """The score as evaluate reports it: the mean over sets of each set's mean over its queries."""
    return float(_pooled_mean(*per_set))


def interval(per_set: list[np.ndarray], resampling: Resampling = Resampling()) -> dict:
    """The pooled mean, its bootstrap interval (percentile) and standard error, and the number of
    queries. One query, or every query alike, gives a zero-width interval."""
    from scipy.stats import bootstrap

    value = pooled(per_set)
    queries = int(sum(len(s) for s in per_set))
    if all(len(s) < 2 or np.ptp(s) == 0 for s in per_set):  # nothing to resample
        return {"value": value, "low": value, "high": value, "standard_error": 0.0, "queries": queries,
                "confidence": resampling.confidence, "resamples": 0}
    result = bootstrap(tuple(np.asarray(s, dtype=float) for s in per_set), _pooled_mean, paired=False,
                       vectorized=True, n_resamples=resampling.resamples, confidence_level=resampling.confidence,
                       method="percentile", batch=BATCH, rng=np.random.default_rng(resampling.seed))
    return {"value": value, "low": float(result.confidence_interval.low),
            "high": float(result.confidence_interval.high), "standard_error": float(result.standard_error),
            "queries": queries, "confidence": resampling.confidence, "resamples": resampling.resamples}


def one_sided_p(differences: list[np.ndarray], alternative: str, resampling: Resampling = Resampling()) -> float:
    """p-value of the paired randomization test that the pooled mean difference is `alternative`
    ("greater" or "less") than 0; each query's difference is weighted as the pooled mean weighs it."""
    from scipy.stats import permutation_test

    weighted = np.concatenate([np.asarray(d, dtype=float) / (len(d) * len(differences)) for d in differences])
    if not np.any(weighted):
        return 1.0
    result = permutation_test((weighted,), lambda x, axis=-1: np.sum(x, axis=axis), permutation_type="samples",
                              vectorized=True, alternative=alternative, n_resamples=resampling.test_resamples, batch=BATCH,
                              rng=np.random.default_rng(resampling.seed))
    return float(result.pvalue)


def paired_difference(a: list[np.ndarray], b: list[np.ndarray], resampling: Resampling = Resampling()) -> dict:
    """A − B on the same queries (set by set, in the same order): the pooled difference, its paired
    bootstrap interval and standard error, and the one-sided p-values that A is better (p_greater)
    and that A is worse (p_less)."""
    differences = [np.asarray(x, dtype=float) - np.asarray(y, dtype=float) for x, y in zip(a, b, strict=True)]
    spread = interval(differences, resampling)
    return {"difference": spread.pop("value"), **spread, "test": TEST_NAME,
            "p_greater": one_sided_p(differences, "greater", resampling),
            "p_less": one_sided_p(differences, "less", resampling)}


def shown(stat: dict, digits: int = 4) -> str:
    """'0.9218 [0.8950, 0.9460]' or, for a difference, '+0.0120 [-0.0100, +0.0340]'."""
    if "difference" in stat:
        return f"{stat['difference']:+.{digits}f} [{stat['low']:+.{digits}f}, {stat['high']:+.{digits}f}]"
    return f"{stat['value']:.{digits}f} [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"
