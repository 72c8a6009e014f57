"""Intervals: Wilson for accuracies, bootstrap for differences."""

from __future__ import annotations

import numpy as np

Z95 = 1.959963984540054


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (nan, nan when n == 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                   paired: bool = True) -> tuple[float, float]:
    """95% percentile interval of mean(a) - mean(b); paired resamples the same indices."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if paired:
        idx = rng.integers(0, len(a), size=(n_boot, len(a)))
        d = a[idx].mean(1) - b[idx].mean(1)
    else:
        d = (a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(1)
             - b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(1))
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_mean(x: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of mean(x) (nan, nan when x is empty)."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    lo, hi = np.percentile(x[idx].mean(1), [2.5, 97.5])
    return float(lo), float(hi)


def share_of_effect(a: np.ndarray, b: np.ndarray, x: np.ndarray, n_boot: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """How far ``x`` moves from run B back to run A, as a ratio of means over the same
    cases: ``(mean(x) - mean(b)) / (mean(a) - mean(b))`` (1: all of A's advantage, 0: none),
    with a paired 95% percentile bootstrap interval over cases. NaN when the runs' means
    are equal (no effect to share); NaN bounds when the effect itself is not clear (more
    than 2.5% of the resamples have no effect or the opposite one), where a ratio's
    interval means nothing."""
    a, b, x = (np.asarray(v, dtype=float) for v in (a, b, x))
    if len(a) == 0 or a.mean() == b.mean():
        return float("nan"), float("nan"), float("nan")
    value = float((x.mean() - b.mean()) / (a.mean() - b.mean()))
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    den = a[idx].mean(1) - b[idx].mean(1)
    clear = np.sign(den) == np.sign(a.mean() - b.mean())
    if clear.mean() < 0.975:
        return value, float("nan"), float("nan")
    boot = (x[idx].mean(1) - b[idx].mean(1))[clear] / den[clear]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return value, float(lo), float(hi)


# ----------------------------------------------------------------- verdicts
MIN_CASES = 20  # fewer cases behind a figure: it cannot be judged
MIN_ACCURACY = 0.5  # an unablated accuracy below this: it cannot be judged
VERDICTS = ("reproduces", "does not", "cannot be judged")
VERDICT_RULE = (
    "A finding *reproduces* when the effect has the paper's direction and its 95% interval "
    "excludes the random control; it *does not* when the interval includes the control or "
    "the direction is reversed; it *cannot be judged* when fewer than "
    f"{MIN_CASES} cases stand behind it or the unablated accuracy is under "
    f"{MIN_ACCURACY:.0%} (and when a value or its interval is missing, e.g. a share of an "
    "effect that is not itself clear).")


def verdict(value: float, lo: float, hi: float, control: float, n: int, accuracy: float,
            higher: bool = True) -> str:
    """The one verdict rule (``VERDICT_RULE``) for an effect ``value`` with 95% interval
    ``[lo, hi]`` against a random ``control``, measured on ``n`` cases of a model whose
    unablated accuracy is ``accuracy``; ``higher``: the paper's effect is above the control
    (False: below it)."""
    if not n or n < MIN_CASES or not accuracy >= MIN_ACCURACY:
        return "cannot be judged"
    if any(np.isnan(float(v)) for v in (value, lo, hi, control)):
        return "cannot be judged"
    sign = 1.0 if higher else -1.0
    if sign * (value - control) > 0 and (lo > control if higher else hi < control):
        return "reproduces"
    return "does not"
