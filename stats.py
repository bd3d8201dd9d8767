"""Paired statistics for comparing two systems on the same test items (toy.py uses them; stdlib only, copyable).

    mcnemar(a, b)            exact two-sided McNemar test on paired 0/1 outcomes
    paired_bootstrap(a, b)   mean difference of paired scores, its 95% bootstrap interval and a two-sided p
    mean_sd(xs)              mean and sample standard deviation (over training seeds)

a and b are sequences over the same items in the same order (0/1 correctness, or per-item means over seeds).
"""
import math
import random


def mcnemar(a, b):
    """Exact two-sided McNemar test: of the n01 items only b gets right and the n10 only a gets right, under
    H0 each discordant item is a fair coin. Returns (n10, n01, p)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n01 = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = n10 + n01, min(n10, n01)
    if n == 0:
        return n10, n01, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return n10, n01, min(1.0, 2 * tail)


def paired_bootstrap(a, b, n_boot=10000, seed=0):
    """Mean of a - b over items, the 2.5% / 97.5% percentiles of that mean over n_boot resamples of the items
    (the same items for both systems: the pairing is kept), and a two-sided p: twice the share of resampled
    means on the other side of zero (floored at 1 / n_boot). Returns dict(diff, lo, hi, p, n)."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired scores must be non-empty and of one length: {len(a)} vs {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n, rng = len(d), random.Random(seed)
    means = sorted(sum(rng.choices(d, k=n)) / n for _ in range(n_boot))
    diff = sum(d) / n
    below = sum(m <= 0 for m in means) / n_boot
    above = sum(m >= 0 for m in means) / n_boot
    p = 1.0 if diff == 0 else max(1.0 / n_boot, min(1.0, 2 * min(below, above)))
    return dict(diff=diff, lo=means[int(0.025 * n_boot)], hi=means[min(n_boot - 1, int(0.975 * n_boot))], p=p, n=n)


def mean_sd(xs):
    """(mean, sample standard deviation; 0 for a single value)."""
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)
