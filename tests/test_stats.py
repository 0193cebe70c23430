"""Seed statistics (issue 18) against hand-computed values and textbook t tables, and the verdicts' boundaries."""

from __future__ import annotations

import math

import pytest

from locbe.report import stats
from locbe.report.seeds import parse_seeds


def test_summary_of_1_2_3_by_hand():
    # mean 2, sample variance ((1)^2 + 0 + 1^2) / 2 = 1; t(0.975, df=2) = 4.303 (t table)
    s = stats.summarize([3.0, 1.0, 2.0])
    assert (s.n, s.mean, s.std, s.min, s.max) == (3, 2.0, 1.0, 1.0, 3.0)
    assert s.ci_low == pytest.approx(2 - 4.303 / math.sqrt(3), abs=1e-3)  # 2 -+ 2.484
    assert s.ci_high == pytest.approx(2 + 2.4842, abs=1e-3)
    assert s.pi_low == pytest.approx(2 - 4.303 * math.sqrt(1 + 1 / 3), abs=1e-3)  # 2 -+ 4.968
    assert s.pi_high == pytest.approx(6.9683, abs=1e-3)


def test_summary_of_two_seeds_uses_t_with_one_degree_of_freedom():
    # the two smoke seeds of the README: 51.53 and 48.80; t(0.975, df=1) = 12.706
    s = stats.summarize([51.53, 48.80])
    assert s.mean == pytest.approx(50.165) and s.std == pytest.approx(2.73 / math.sqrt(2))
    assert s.ci_high - s.mean == pytest.approx(12.706 * s.std / math.sqrt(2), rel=1e-4)
    assert s.pi_high - s.mean == pytest.approx(12.706 * s.std * math.sqrt(1.5), rel=1e-4)


def test_t_quantiles_match_the_table():
    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert stats.t_quantile(df) == pytest.approx(q, abs=1e-3)


def test_one_seed_and_failed_seeds():
    s = stats.summarize([50.0, None, float("nan")])  # a failed seed (None), a class absent (NaN)
    assert s.n == 1 and s.mean == 50.0 and math.isnan(s.std) and math.isnan(s.pi_low)
    assert stats.reported_verdict(73.1, s) == stats.ONE_SEED
    assert stats.reported_verdict(None, s) == stats.ONE_SEED
    assert stats.summarize([]).n == 0


def test_reported_verdict_boundaries():
    s = stats.summarize([1.0, 2.0, 3.0])
    eps = 1e-9
    assert stats.reported_verdict(s.pi_high, s) == stats.INSIDE  # the ends belong to the interval
    assert stats.reported_verdict(s.pi_low, s) == stats.INSIDE
    assert stats.reported_verdict(s.pi_high + eps, s) == stats.ABOVE
    assert stats.reported_verdict(s.pi_low - eps, s) == stats.BELOW
    assert stats.reported_verdict(2.0, s) == stats.INSIDE
    # outside the CI of the mean but inside the PI of one run: still "inside the run-to-run range"
    assert s.ci_high < 5.0 < s.pi_high and stats.reported_verdict(5.0, s) == stats.INSIDE
    assert stats.reported_verdict(None, s) == stats.NO_REPORTED


def test_welch_by_hand():
    # a = 1,2,3 and b = 4,5,6: difference 3, se = sqrt(1/3 + 1/3) = 0.8165, t = 3.674, Welch df = 4,
    # two-sided p = 0.0213 (t table: t(0.975, 4) = 2.776 < 3.674 < t(0.99, 4) = 3.747)
    d = stats.welch([1, 2, 3], [4, 5, 6], "A", "B")
    assert d.diff == 3 and d.t == pytest.approx(3.6742, abs=1e-4) and d.p == pytest.approx(0.02131, abs=1e-4)
    assert d.verdict == "B better"
    r = stats.welch([4, 5, 6], [1, 2, 3], "A", "B")
    assert r.diff == -3 and r.p == pytest.approx(d.p) and r.verdict == "A better"


def test_welch_unequal_variances_by_hand():
    # a = 0, 2 (mean 1, var 2), b = 10, 11, 12, 13 (mean 11.5, var 5/3): se^2 = 2/2 + (5/3)/4 = 17/12,
    # t = 10.5 / 1.1902 = 8.822; Welch-Satterthwaite df = (17/12)^2 / (1^2/1 + (5/12)^2/3) = 1.897
    from scipy import stats as sps

    d = stats.welch([0, 2], [10, 11, 12, 13])
    assert d.diff == 10.5 and d.t == pytest.approx(8.8218, abs=1e-4)
    df = (17 / 12) ** 2 / (1 + (5 / 12) ** 2 / 3)
    assert df == pytest.approx(1.897, abs=1e-3)
    assert d.p == pytest.approx(2 * sps.t.sf(d.t, df), rel=1e-9)


def test_welch_verdict_boundary_and_small_samples():
    d = stats.welch([1, 2, 3], [4, 5, 6])
    assert stats.welch([1, 2, 3], [4, 5, 6], alpha=d.p).verdict == stats.NOISE  # p < alpha is strict
    assert stats.welch([1, 2, 3], [4, 5, 6], alpha=d.p * (1 + 1e-9)).verdict == "B better"
    assert stats.welch([1, 2, 3], [2, 3, 4]).verdict == stats.NOISE  # p = 0.29
    one = stats.welch([50.0], [52.0, 53.0])
    assert one.diff == pytest.approx(2.5) and math.isnan(one.p) and one.verdict.startswith("no test")
    assert stats.welch([5, 5], [5, 5]).verdict == stats.NOISE
    assert math.isnan(stats.welch([5, 5], [6, 6]).p)


def test_parse_seeds():
    from locbe.errors import ConfigError

    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("1") == [0]
    assert parse_seeds("0,4,7") == [0, 4, 7] and parse_seeds("5,") == [5] and parse_seeds(" 2, 1 ") == [2, 1]
    for bad in ("0", "-1", "a", "1,1", "1,-2", ","):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
