"""The trend and cohort statistics of services/trends.py against hand-computed values."""
from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services import trends

UTC = timezone.utc
END = date(2024, 1, 5)


def at(day: int, hour: int = 12, tz=UTC) -> datetime:
    """A timestamp on 2024-01-0<day> (local to `tz`)."""
    return datetime(2024, 1, day, hour, tzinfo=tz)


def test_gaps_daily_means_slope_and_r_squared_by_hand():
    points = [(at(1, 8), 10.0), (at(1, 20), 20.0),       # day 0: mean 15
              (at(3), 30.0),                            # day 2
              (at(5), 40.0),                            # day 4
              (datetime(2023, 12, 31, 12, tzinfo=UTC), 999.0)]  # outside the window
    trend = trends.compute_trend(points, end=END, window=5)
    assert trend["start_date"] == date(2024, 1, 1) and trend["end_date"] == END
    assert trend["sparkline"] == [15.0, None, 30.0, None, 40.0]
    assert trend["count"] == 4 and trend["days_with_data"] == 3
    # x = 0, 2, 4; y = 15, 30, 40: mean x 2, mean y 85/3, Sxx 8, Sxy 50, Syy 2850/9
    assert trend["slope"] == pytest.approx(6.25)
    assert trend["r_squared"] == pytest.approx(2500 / (8 * 2850 / 9))   # 0.98684...
    assert trend["direction"] == "rising"
    assert trend["start"] == 15.0 and trend["end"] == 40.0
    assert trend["percent_change"] == pytest.approx(100 * 25 / 15)
    assert trend["mean"] == pytest.approx(85 / 3)
    assert trend["min"] == 15.0 and trend["max"] == 40.0


def test_days_are_utc_calendar_days():
    plus_two = timezone(timedelta(hours=2))
    # 01:00 at +02:00 on Jan 3 is 23:00 UTC on Jan 2
    trend = trends.compute_trend([(at(3, 1, plus_two), 7.0)], end=END, window=5)
    assert trend["sparkline"] == [None, 7.0, None, None, None]


def test_one_point():
    trend = trends.compute_trend([(at(4), 42.0)], end=END, window=7)
    assert trend["sparkline"] == [None] * 5 + [42.0, None]
    assert trend["count"] == 1 and trend["days_with_data"] == 1
    assert trend["slope"] == 0.0 and trend["r_squared"] is None
    assert trend["direction"] == "flat"
    assert trend["start"] == trend["end"] == 42.0
    assert trend["percent_change"] == 0.0


def test_no_data_gives_zeros_and_nulls():
    trend = trends.compute_trend([], end=END, window=3)
    assert trend["sparkline"] == [None, None, None]
    assert trend["count"] == 0 and trend["days_with_data"] == 0
    assert trend["slope"] == 0.0 and trend["r_squared"] is None and trend["direction"] == "flat"
    assert trend["start"] is None and trend["end"] is None and trend["percent_change"] is None
    assert trend["mean"] is None


def test_flat_series():
    trend = trends.compute_trend([(at(d), 5.0) for d in (1, 2, 4, 5)], end=END, window=5)
    assert trend["slope"] == 0.0
    assert trend["r_squared"] == 0.0
    assert trend["direction"] == "flat"
    assert trend["percent_change"] == 0.0


def test_flat_up_to_floating_point_noise():
    # day means 0.15000000000000002 (from 0.1 and 0.2) and 0.15 are the same value
    trend = trends.compute_trend([(at(1, 8), 0.1), (at(1, 9), 0.2), (at(2), 0.15)], end=END, window=5)
    assert trend["slope"] == 0.0 and trend["direction"] == "flat"


def test_falling_perfect_line():
    trend = trends.compute_trend([(at(1), 10.0), (at(2), 8.0), (at(3), 6.0)], end=date(2024, 1, 3),
                                 window=3)
    assert trend["slope"] == pytest.approx(-2.0)
    assert trend["r_squared"] == pytest.approx(1.0)
    assert trend["direction"] == "falling"
    assert trend["percent_change"] == pytest.approx(-40.0)


def test_direction_threshold_is_one_percent_of_the_mean():
    # fitted change 0.4 over 2 days against a mean of 100.2: 0.4 % → flat
    small = [(at(1), 100.0), (at(2), 100.2), (at(3), 100.4)]
    assert trends.compute_trend(small, end=END, window=5)["direction"] == "flat"
    # fitted change 2 against a mean of 101: ~2 % → rising
    large = [(at(1), 100.0), (at(2), 101.0), (at(3), 102.0)]
    assert trends.compute_trend(large, end=END, window=5)["direction"] == "rising"


def test_percent_change_edge_cases():
    assert trends.percent_change(0.0, 10.0) is None     # from zero: undefined
    assert trends.percent_change(0.0, 0.0) == 0.0
    assert trends.percent_change(-10.0, -5.0) == pytest.approx(50.0)
    assert trends.percent_change(4.0, 3.0) == pytest.approx(-25.0)
    assert trends.percent_change(None, 3.0) is None
    trend = trends.compute_trend([(at(1), 0.0), (at(2), 10.0)], end=END, window=5)
    assert trend["percent_change"] is None and trend["direction"] == "rising"


def test_least_squares_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        trends.least_squares([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        trends.compute_trend([], end=END, window=0)


def test_describe_by_hand():
    stats = trends.describe([float(v) for v in range(10, 0, -1)])   # 1..10, unsorted
    assert stats["count"] == 10
    assert stats["mean"] == pytest.approx(5.5)
    assert stats["std"] == pytest.approx(math.sqrt(8.25))            # population std
    assert stats["min"] == 1.0 and stats["max"] == 10.0
    assert stats["p50"] == pytest.approx(5.5)
    assert stats["p90"] == pytest.approx(9.1)                        # 9 + 0.1·(10 − 9)
    single = trends.describe([4.0])
    assert single["std"] == 0.0 and single["p50"] == single["p90"] == 4.0
    assert trends.describe([])["count"] == 0


def test_percentile_position():
    assert trends.percentile_position(10, 0.9) == (8, pytest.approx(0.1))
    assert trends.percentile_position(1, 0.5) == (0, 0.0)
    assert trends.percentile_position(4, 0.5) == (1, 0.5)


def test_cache_keys_sit_under_the_user_prefix():
    user = "00000000-0000-0000-0000-000000000001"
    key = trends.cache_key(user, "weight", 7, END)
    assert key == f"sma:trend:{user}:weight:7:2024-01-05"
    assert key.startswith(trends.cache_prefix(user))
    assert trends.generation_key(user, "weight").startswith(trends.cache_prefix(user))
    assert trends.generation_key(user, "weight") != key


days = st.lists(st.integers(min_value=0, max_value=364), min_size=2, max_size=60, unique=True)


@settings(max_examples=200, deadline=None)
@given(xs=days, intercept=st.floats(-1e4, 1e4), slope=st.floats(-100, 100))
def test_slope_of_a_perfect_line_is_its_slope(xs, intercept, slope):
    assume(abs(slope) >= 1e-3 * (1 + abs(intercept)))
    xs = sorted(xs)
    fitted, fitted_intercept, r_squared = trends.least_squares(
        [float(x) for x in xs], [intercept + slope * x for x in xs])
    assert fitted == pytest.approx(slope, rel=1e-6, abs=1e-9)
    assert fitted_intercept == pytest.approx(intercept, rel=1e-6, abs=1e-6 * (1 + abs(slope) * 365))
    assert r_squared == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6)), min_size=1, max_size=90))
def test_statistics_stay_in_range(values):
    trend = trends.summarize_daily(values, count=sum(v is not None for v in values))
    assert len(trend["sparkline"]) == len(values)
    assert trend["days_with_data"] == sum(v is not None for v in values)
    assert math.isfinite(trend["slope"])
    if trend["r_squared"] is not None:
        assert 0.0 <= trend["r_squared"] <= 1.0
    if trend["direction"] == "rising":
        assert trend["slope"] > 0
    elif trend["direction"] == "falling":
        assert trend["slope"] < 0
    present = [v for v in values if v is not None]
    if present:
        assert trend["min"] <= trend["mean"] + 1e-6 * (1 + abs(trend["mean"]))
        assert trend["mean"] <= trend["max"] + 1e-6 * (1 + abs(trend["mean"]))


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), q=st.floats(0, 1))
def test_percentile_lies_between_neighbouring_ranks(values, q):
    ordered = sorted(values)
    value = trends.percentile(ordered, q)
    assert ordered[0] - 1e-6 <= value <= ordered[-1] + 1e-6
