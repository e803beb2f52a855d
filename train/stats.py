"""Paired statistics of the verdict: per-seed differences against scratch and their t-interval.

Seeds are paired: scratch and a method share a seed's labelled-vertex file and augmentation
stream, so the difference d_s = x_s(method) - x_s(scratch) removes what the seed alone does. For n
seeds, the mean difference d_bar = (1/n) sum_s d_s, its sample standard deviation
s_d = sqrt(sum_s (d_s - d_bar)^2 / (n - 1)), and the two-sided 95 % confidence interval
d_bar -+ t_{0.975, n-1} s_d / sqrt(n) (Student's t with n - 1 degrees of freedom).
"""

from __future__ import annotations

import math

from scipy.stats import t as student_t

__all__ = ["paired_difference", "t_critical"]


def t_critical(df: int, level: float = 0.95) -> float:
    """The two-sided critical value of Student's t: P(|T| <= c) = level for df degrees of freedom."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom (2 seeds), got {df}")
    return float(student_t.ppf(0.5 + level / 2.0, df))


def paired_difference(method: dict[int, float], scratch: dict[int, float], level: float = 0.95) -> dict:
    """Per-seed differences ``method - scratch`` over the seeds both have, their mean, sample
    standard deviation and t-interval (``ci95_low`` / ``ci95_high``; None with one seed)."""
    seeds = sorted(set(method) & set(scratch))
    if not seeds:
        raise ValueError("no seed is shared by the method and scratch: nothing to pair")
    d = [float(method[s]) - float(scratch[s]) for s in seeds]
    n = len(d)
    mean = sum(d) / n
    out = {"seeds": seeds, "per_seed": d, "mean": mean, "std": None, "ci95_low": None, "ci95_high": None}
    if n > 1:
        std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        half = t_critical(n - 1, level) * std / math.sqrt(n)
        out.update(std=std, ci95_low=mean - half, ci95_high=mean + half)
    return out
