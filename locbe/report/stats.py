"""Run-to-run statistics of a metric over seeds, and the verdicts the tables print.

A table with one run per seed answers two questions: where the mean of the method lies (the 95 % confidence
interval of the mean, Student t with n-1 degrees of freedom) and where one more run would land (the 95 %
prediction interval of a single run, mean +- t * s * sqrt(1 + 1/n)); a published number outside the
latter is not what the method produces from run to run. Two variants are compared with Welch's t-test
(unequal variances), which needs two runs or more on each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL = 0.95  # both intervals
ALPHA = 0.05  # the test's threshold: p < ALPHA is a difference

INSIDE = "reported value inside the run-to-run range"
ABOVE = "reported above every plausible run"
BELOW = "reported below every plausible run"
ONE_SEED = "one seed: no interval can be given"
NO_REPORTED = "no published value"
NOISE = "within seed noise"


@dataclass(frozen=True)
class Summary:
    """n values: mean, sample standard deviation (ddof 1), range and the two 95 % intervals (NaN for n < 2)."""

    n: int
    mean: float
    std: float
    min: float
    max: float
    ci_low: float
    ci_high: float
    pi_low: float
    pi_high: float


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided Student t critical value: P(|T| <= q) = level for T with ``df`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df))


def finite(values) -> list[float]:
    """The values that are numbers (a class absent from every image has NaN IoU; a failed seed None)."""
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def summarize(values, level: float = LEVEL) -> Summary:
    vals = finite(values)
    n = len(vals)
    if n == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan, nan, nan, nan)
    mean = math.fsum(vals) / n
    if n < 2:
        nan = float("nan")
        return Summary(1, mean, nan, vals[0], vals[0], nan, nan, nan, nan)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    q = t_quantile(n - 1, level)
    half_ci = q * std / math.sqrt(n)
    half_pi = q * std * math.sqrt(1 + 1 / n)
    return Summary(n, mean, std, min(vals), max(vals), mean - half_ci, mean + half_ci, mean - half_pi,
                   mean + half_pi)


def reported_verdict(reported: float | None, s: Summary) -> str:
    """Where the published number falls against the prediction interval of one run (ends included)."""
    if reported is None or (isinstance(reported, float) and math.isnan(reported)):
        return NO_REPORTED if s.n >= 2 else ONE_SEED
    if s.n < 2:
        return ONE_SEED
    if reported > s.pi_high:
        return ABOVE
    if reported < s.pi_low:
        return BELOW
    return INSIDE


@dataclass(frozen=True)
class Difference:
    """B against A: difference of means (B - A), Welch's t and two-sided p (NaN where a side has < 2 runs)."""

    diff: float
    t: float
    p: float
    verdict: str


def welch(a, b, label_a: str = "A", label_b: str = "B", alpha: float = ALPHA) -> Difference:
    """Difference of means and Welch's t-test of B against A; higher is better. The verdict names the better side
    when p < alpha, says "within seed noise" otherwise, and says why there is no test when it cannot be made."""
    from scipy import stats

    a, b = finite(a), finite(b)
    sa, sb = summarize(a), summarize(b)
    diff = sb.mean - sa.mean
    nan = float("nan")
    if sa.n < 2 or sb.n < 2:
        return Difference(diff, nan, nan, "no test: needs >= 2 seeds on both sides")
    if sa.std == 0 and sb.std == 0:
        return Difference(diff, nan, nan, NOISE if diff == 0 else "no seed-to-seed spread: no test")
    res = stats.ttest_ind(b, a, equal_var=False)
    t, p = float(res.statistic), float(res.pvalue)
    verdict = NOISE if not p < alpha else (f"{label_b} better" if diff > 0 else f"{label_a} better")
    return Difference(diff, t, p, verdict)


RUN_INSIDE, RUN_BELOW, RUN_ABOVE = "inside", "below", "above"


def run_in_range(value: float, s: Summary) -> str:
    """Where one run's value falls against the prediction interval of one run of ``s`` (ends included):
    "inside" (the gap is seed noise), "below" or "above" (not what those runs produce from seed to seed).
    Needs ``s.n >= 2``."""
    if s.n < 2:
        raise ValueError("a run-to-run range needs two runs or more")
    if value < s.pi_low:
        return RUN_BELOW
    if value > s.pi_high:
        return RUN_ABOVE
    return RUN_INSIDE
