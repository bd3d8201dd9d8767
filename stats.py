"""Paired statistics for comparing two systems on the same test items (toy.py uses them; stdlib only, copyable).

    mcnemar(a, b)            exact two-sided McNemar test on paired 0/1 outcomes
    paired_bootstrap(a, b)   mean difference of paired scores over runs (seeds) and items, its 95% bootstrap
                             interval and a two-sided p, resampling items and runs
    mean_sd(xs)              mean and sample standard deviation (over training seeds)
    percentile(xs, q)        the q-quantile with linear interpolation (numpy's default)

mcnemar's a and b are 0/1 outcomes over the same items in the same order; paired_bootstrap's are one such list per
run (training seed).
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
    """Mean of a - b, its 95% bootstrap interval and a two-sided p, for two systems scored on the same items.
    a, b: one list of per-item scores per run (a run: one training seed; every run over the same items in the same
    order; a system with one run, e.g. an untrained base, may be given as that run repeated). Each resample draws
    the items with replacement, the same items for both systems and every run (the pairing is kept), and, with
    several runs, the runs with replacement too, so the interval and p include the spread between training seeds,
    not only the test items'. The interval is the 2.5% / 97.5% percentiles of the resampled means; p is twice the
    share of resampled means on the other side of zero (floored at 1 / n_boot). Returns dict(diff, lo, hi, p, n)."""
    if len(a) != len(b) or not len(a) or len({len(r) for r in a} | {len(r) for r in b}) != 1 or not len(a[0]):
        raise ValueError(f"paired scores must be non-empty runs over one set of items: {len(a)} vs {len(b)} runs of "
                         f"{sorted({len(r) for r in a} | {len(r) for r in b})} items")
    d = [[float(x) - float(y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]  # (runs, items)
    n_runs, n, rng = len(d), len(d[0]), random.Random(seed)
    means = []
    for _ in range(n_boot):
        items = rng.choices(range(n), k=n)
        runs = rng.choices(range(n_runs), k=n_runs) if n_runs > 1 else [0]
        means.append(sum(sum(d[r][i] for i in items) for r in runs) / (len(runs) * n))
    means.sort()
    diff = sum(map(sum, d)) / (n_runs * n)
    below = sum(m <= 0 for m in means) / n_boot
    above = sum(m >= 0 for m in means) / n_boot
    p = 1.0 if diff == 0 else max(1.0 / n_boot, min(1.0, 2 * min(below, above)))
    return dict(diff=diff, lo=means[int(0.025 * n_boot)], hi=means[min(n_boot - 1, int(0.975 * n_boot))], p=p, n=n)


def mean_sd(xs):
    """(mean, sample standard deviation; 0 for a single value)."""
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def percentile(xs, q):
    """The q-quantile (0..1) of xs with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
