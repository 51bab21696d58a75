"""Properties of the synthetic household generator: each realism claim is checked as a statistic."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdfl.household import (
    DEFAULT_CLASS_EDGES_WH,
    DEVICE_KINDS,
    KIND_INDEX,
    HouseholdProfile,
    generate_households,
    outdoor_temperature_c,
    plug_reports,
    sample_profile,
    simulate_usage,
    timeline_usage,
    to_hourly,
    usage_matrix,
)

SPRING = datetime(2024, 3, 4, tzinfo=timezone.utc)  # a Monday; mild, so heating does not swamp the rest
K = len(DEVICE_KINDS)
FRIDGE, WASH, CLIMATE, EV, OTHER = (
    KIND_INDEX[k] for k in ("fridge", "washing_machine", "heating_or_ac", "ev_charger", "other")
)
DIVISORS = [30, 60, 120, 300, 600, 900, 1200, 1800, 3600]
SEEDS = st.integers(0, 2**32 - 1)


def profile_for(seed: int, **changes: object) -> tuple[HouseholdProfile, np.random.Generator]:
    rng = np.random.default_rng(seed)
    profile = sample_profile(f"t{seed}", rng)
    return dataclasses.replace(profile, **changes), rng  # type: ignore[arg-type]


def with_device(profile: HouseholdProfile, kind: int, watts: float) -> HouseholdProfile:
    rated = list(profile.rated_w)
    rated[kind] = watts
    return dataclasses.replace(profile, rated_w=tuple(rated))


def local_clock(
    profile: HouseholdProfile, start: datetime, rows: int, interval_s: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local hour, day number and weekday (0 = Monday) at the middle of each interval."""
    t = start.timestamp() + interval_s * (np.arange(rows) + 0.5) + profile.utc_offset_h * 3600
    day = np.floor(t / 86400).astype(np.int64)
    return (t % 86400) / 3600, day, (day + 3) % 7


def windows(hourly: np.ndarray, start: datetime, utc_offset_h: int) -> tuple[np.ndarray, np.ndarray]:
    """The learning task: last 24 h per kind (+ clock) -> total energy of the next 6 h."""
    total = np.concatenate([[0.0], np.cumsum(hourly.sum(axis=1, dtype=np.float64))])
    ends = np.arange(24, hourly.shape[0] - 5)
    past = np.lib.stride_tricks.sliding_window_view(hourly, 24, axis=0)[: ends.size]  # (n, K, 24)
    t = start.timestamp() + ends * 3600 + utc_offset_h * 3600
    hod, dow = ((t % 86400) // 3600).astype(int), ((t // 86400 + 3) % 7).astype(int)
    x = np.hstack([np.log1p(past.reshape(ends.size, -1)), np.log1p(past.sum(axis=1)), np.eye(24)[hod], np.eye(7)[dow]])
    return x, total[ends + 6] - total[ends]


# --- shape, determinism, basic invariants -----------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=SEEDS,
    interval_s=st.sampled_from(DIVISORS),
    intervals=st.integers(0, 400),
    minute=st.integers(0, 59),
    tz_hours=st.integers(-12, 12),
)
def test_matrix_is_float32_non_negative_and_shaped(
    seed: int, interval_s: int, intervals: int, minute: int, tz_hours: int
) -> None:
    profile, rng = profile_for(seed)
    start = datetime(2024, 1, 15, 13, minute, tzinfo=timezone(timedelta(hours=tz_hours)))
    m = usage_matrix(profile, start, intervals, interval_s, rng)
    assert m.dtype == np.float32 and m.shape == (intervals, K)
    assert np.isfinite(m).all() and (m >= 0).all()
    # a column can stack a few devices (washer + dryer, hob + oven, heating + water heater), but
    # never beyond a few times its rated power
    cap = np.asarray(profile.rated_w) * interval_s / 3600 * 4 + 1e-3
    assert (m <= cap).all()


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS)
def test_same_seed_same_data_other_seed_other_data(seed: int) -> None:
    profile, rng = profile_for(seed)
    again, rng_again = profile_for(seed)
    assert profile == again
    a = usage_matrix(profile, SPRING, 96 * 3, 900, rng)
    b = usage_matrix(again, SPRING, 96 * 3, 900, rng_again)
    c = usage_matrix(profile, SPRING, 96 * 3, 900, np.random.default_rng(seed + 1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS)
def test_missing_devices_stay_zero_and_do_not_reshuffle_the_rest(seed: int) -> None:
    profile, _ = profile_for(seed)
    full = usage_matrix(profile, SPRING, 96 * 4, 900, np.random.default_rng(seed))
    for k in np.flatnonzero(np.asarray(profile.rated_w) == 0):
        assert not full[:, k].any(), DEVICE_KINDS[k]
    for drop in (k for k in range(K) if k not in (FRIDGE, OTHER) and profile.rated_w[k] > 0):
        fewer = usage_matrix(with_device(profile, drop, 0.0), SPRING, 96 * 4, 900, np.random.default_rng(seed))
        assert not fewer[:, drop].any()
        keep = [k for k in range(K) if k != drop]
        assert np.array_equal(full[:, keep], fewer[:, keep]), DEVICE_KINDS[drop]


@settings(max_examples=50, deadline=None)
@given(seed=SEEDS)
def test_sampled_profiles_are_coherent(seed: int) -> None:
    p = sample_profile("x", np.random.default_rng(seed))
    assert p.has("fridge") and p.has("other") and p.has("lighting")
    assert 1 <= p.occupants <= 5
    assert p.laundry_days and set(p.laundry_days) <= set(range(7))
    assert set(p.wfh_days) <= set(range(5)) and (p.commuter or not p.wfh_days)
    assert 5.0 <= p.wake_h < p.leave_h < p.return_h < p.dinner_h + 3 and p.wake_h < p.sleep_h <= 25.5
    assert p.rated_w[CLIMATE] == max(p.heating_w, p.cooling_w, p.water_heater_w)
    assert p.kinds_present == tuple(k for k in DEVICE_KINDS if p.has(k))


def test_profile_rejects_bad_rated_power() -> None:
    p, _ = profile_for(1)
    with pytest.raises(ValueError):
        dataclasses.replace(p, rated_w=p.rated_w[:-1])
    with pytest.raises(ValueError):
        with_device(p, FRIDGE, -1.0)


def test_window_arguments_are_checked() -> None:
    p, rng = profile_for(2)
    with pytest.raises(ValueError):
        usage_matrix(p, datetime(2024, 1, 1), 10, 900, rng)  # naive datetime
    with pytest.raises(ValueError):
        usage_matrix(p, SPRING, 10, 7, rng)  # does not divide an hour


def test_generate_households_is_deterministic_and_prefix_stable() -> None:
    five = generate_households(5, 11, SPRING, 3, 900)
    three = generate_households(3, 11, SPRING, 3, 900)
    assert [p for p, _ in three] == [p for p, _ in five[:3]]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(three, five))
    assert len({p.household_id for p, _ in five}) == 5
    assert all(m.shape == (3 * 96, K) for _, m in five)
    other = generate_households(1, 12, SPRING, 3, 900)
    assert other[0][0].household_id != five[0][0].household_id


def test_ten_households_sixty_days_quarter_hourly_is_fast() -> None:
    start = datetime(2024, 10, 1, tzinfo=timezone.utc)
    best = min(_timed(lambda: generate_households(10, 5, start, 60, 900)) for _ in range(3))
    print(f"10 households x 60 days @ 15 min: {best * 1000:.0f} ms")
    assert best < 1.0


def _timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


# --- daily rhythm ------------------------------------------------------------------------------


def population_by_hour(n: int, seed: int, start: datetime, days: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean hourly energy without heating/cooling and EV, by local hour, for weekdays and weekends."""
    sums, counts = np.zeros((2, 24)), np.zeros((2, 24))
    for p, m in generate_households(n, seed, start, days):
        load = m.sum(axis=1) - m[:, CLIMATE] - m[:, EV]
        hour, _, dow = local_clock(p, start, m.shape[0], 3600)
        weekend = (dow >= 5).astype(int)
        np.add.at(sums, (weekend, hour.astype(int)), load)
        np.add.at(counts, (weekend, hour.astype(int)), 1)
    return sums / counts, counts


def test_nights_are_quiet_with_morning_and_evening_peaks() -> None:
    by_hour, counts = population_by_hour(40, 1, SPRING, 28)
    mean = (by_hour * counts).sum(axis=0) / counts.sum(axis=0)
    night, morning, evening = mean[3:5].mean(), mean[6:9].mean(), mean[18:21].mean()
    assert evening > 4 * night
    assert morning > 1.5 * night
    assert mean[18:21].mean() == pytest.approx(mean.max(), rel=0.35)  # the peak is in the evening


def test_fridge_duty_cycles_around_the_clock() -> None:
    profile, rng = profile_for(3, away_spells_per_year=0.0)
    m = usage_matrix(profile, SPRING, 7 * 1440, 60, rng)
    per_minute_on = profile.rated_w[FRIDGE] / 60
    fridge = m[:, FRIDGE]
    assert np.allclose(fridge[(fridge > 0)], per_minute_on, rtol=1e-4)  # compressor on or off
    on_share_by_hour = (fridge > 0).reshape(-1, 60).mean(axis=1)
    assert on_share_by_hour.min() > 0.05 and on_share_by_hour.max() < 0.95
    hour, _, _ = local_clock(profile, SPRING, m.shape[0], 60)
    day_duty = (fridge[(hour > 10) & (hour < 20)] > 0).mean()
    night_duty = (fridge[(hour > 2) & (hour < 5)] > 0).mean()
    assert day_duty > night_duty  # the door gets opened while people are up


# --- weekly rhythm -----------------------------------------------------------------------------


def test_weekends_differ_from_weekdays() -> None:
    by_hour, _ = population_by_hour(40, 2, SPRING, 28)
    weekday, weekend = by_hour
    assert weekend[10:16].mean() > 1.3 * weekday[10:16].mean()  # people are home at midday
    assert weekday[6:8].mean() > 1.2 * weekend[6:8].mean()  # and get up later


@pytest.mark.parametrize("seed", range(8))
def test_laundry_happens_on_the_households_laundry_days(seed: int) -> None:
    profile, rng = profile_for(seed)
    profile = with_device(profile, WASH, 2000.0)
    m = usage_matrix(profile, SPRING, 56 * 24, 3600, rng)
    # count a late load finishing after midnight towards the evening it started
    t = SPRING.timestamp() + 3600 * (np.arange(m.shape[0]) + 0.5) + (profile.utc_offset_h - 4) * 3600
    dow = (np.floor(t / 86400).astype(np.int64) + 3) % 7
    on_days = m[np.isin(dow, profile.laundry_days), WASH].sum()
    assert m[:, WASH].sum() > 0
    assert on_days / m[:, WASH].sum() > 0.97


# --- households differ, each one is consistent -----------------------------------------------


def test_households_are_recognisable_week_after_week() -> None:
    """A week's hourly-by-kind fingerprint is closest to another week of the same household."""
    weeks = 4
    fingerprints, owners = [], []
    for i, (p, m) in enumerate(generate_households(25, 4, SPRING, 7 * weeks)):
        per_week = m.reshape(weeks, 7, 24, K)
        daily_kind = np.log1p(per_week.sum(axis=2).mean(axis=1))  # (weeks, K)
        daily_shape = np.log1p(per_week.sum(axis=3).mean(axis=1))  # (weeks, 24)
        fingerprints.append(np.hstack([daily_kind, daily_shape]))
        owners += [i] * weeks
    f, owner = np.vstack(fingerprints), np.asarray(owners)
    dist = ((f[:, None] - f[None]) ** 2).sum(axis=2)
    np.fill_diagonal(dist, np.inf)
    nearest = owner[dist.argmin(axis=1)]
    assert (nearest == owner).mean() > 0.9
    within = dist[(owner[:, None] == owner[None]) & np.isfinite(dist)].mean()
    between = dist[owner[:, None] != owner[None]].mean()
    assert between > 5 * within


def test_days_are_noisy_not_copies() -> None:
    profile, rng = profile_for(5, away_spells_per_year=0.0)
    daily = usage_matrix(profile, SPRING, 28 * 24, 3600, rng).reshape(28, 24, K)
    flat = daily.reshape(28, -1)
    assert len({row.tobytes() for row in flat}) == 28
    totals = daily.sum(axis=(1, 2))
    assert totals.std() / totals.mean() > 0.05


# --- weather and season -----------------------------------------------------------------------


def heated_households(seed: int, n: int) -> list[HouseholdProfile]:
    out: list[HouseholdProfile] = []
    rng = np.random.default_rng(seed)
    while len(out) < n:
        p = sample_profile(f"h{len(out)}", rng)
        if p.heating_w > 0:
            out.append(dataclasses.replace(p, away_spells_per_year=0.0))
    return out


def test_heating_follows_outdoor_temperature_and_season() -> None:
    autumn = datetime(2024, 9, 1, tzinfo=timezone.utc)
    for i, p in enumerate(heated_households(6, 5)):
        trace = simulate_usage(p, autumn, 120 * 24, 3600, np.random.default_rng(i))
        heat = trace.matrix[:, CLIMATE].reshape(120, 24).sum(axis=1)
        temp = trace.outdoor_c.reshape(120, 24).mean(axis=1)
        if p.cooling_w == 0:
            assert np.corrcoef(heat, temp)[0, 1] < -0.7
        assert heat[-21:].mean() > 2 * heat[:21].mean() + 100  # December needs more than September


def test_outdoor_temperature_is_seasonal_and_diurnal() -> None:
    jan = datetime(2024, 1, 15, tzinfo=timezone.utc).timestamp() + np.arange(24 * 14) * 3600
    jul = datetime(2024, 7, 15, tzinfo=timezone.utc).timestamp() + np.arange(24 * 14) * 3600
    assert outdoor_temperature_c(jul).mean() > outdoor_temperature_c(jan).mean() + 12
    day = outdoor_temperature_c(jan).reshape(14, 24)
    assert (day[:, 14:16].mean(axis=1) > day[:, 3:5].mean(axis=1)).all()


def test_air_conditioning_runs_in_summer_only() -> None:
    p, rng = profile_for(
        8,
        cooling_w=2000.0,
        cooling_w_per_k=100.0,
        cooling_setpoint_c=23.0,
        heating_w=0.0,
        water_heater_w=0.0,
        away_spells_per_year=0.0,
    )
    p = with_device(p, CLIMATE, 2000.0)
    july = usage_matrix(p, datetime(2024, 7, 1, tzinfo=timezone.utc), 31 * 24, 3600, rng)[:, CLIMATE]
    january = usage_matrix(p, datetime(2024, 1, 1, tzinfo=timezone.utc), 31 * 24, 3600, rng)[:, CLIMATE]
    assert july.sum() > 1000 and january.sum() == 0


# --- anomalies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_holidays_leave_only_the_fridge_and_standby(seed: int) -> None:
    profile, rng = profile_for(seed, away_spells_per_year=60.0)
    trace = simulate_usage(profile, SPRING, 60 * 96, 900, rng)
    # only look at intervals a full day into an absence: runs started before leaving may finish
    full_day_away = np.lib.stride_tricks.sliding_window_view(trace.away, 96).all(axis=1)
    idle = np.zeros(trace.away.size, dtype=bool)
    idle[95:] = full_day_away
    assert idle.sum() > 96 * 3
    m = trace.matrix[idle]
    others = [k for k in range(K) if k not in (FRIDGE, OTHER)]
    assert not m[:, others].any()
    assert np.allclose(m[:, OTHER], profile.standby_w * 0.25, rtol=1e-4)
    assert m[:, FRIDGE].sum() > 0
    home = trace.matrix[~trace.away]
    assert home.sum(axis=1).mean() > 2 * m.sum(axis=1).mean()


def test_guests_raise_consumption() -> None:
    ratios = []
    for seed in range(6):
        profile, rng = profile_for(seed, guest_days_per_year=120.0, away_spells_per_year=0.0)
        trace = simulate_usage(profile, SPRING, 56 * 24, 3600, rng)
        load = trace.matrix.sum(axis=1) - trace.matrix[:, CLIMATE] - trace.matrix[:, EV]
        ratios.append(load[trace.guests].mean() / load[~trace.guests].mean())
    assert np.mean(ratios) > 1.15


# --- telemetry ---------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, interval_s=st.sampled_from([60, 300, 900, 1800, 3600]), hours=st.integers(1, 30))
def test_plug_reports_reproduce_the_hourly_matrix(seed: int, interval_s: int, hours: int) -> None:
    profile, rng = profile_for(seed)
    start = datetime(2024, 2, 1, 6, tzinfo=timezone.utc)
    intervals = hours * 3600 // interval_s
    m = usage_matrix(profile, start, intervals, interval_s, rng)
    reports = plug_reports(profile, m, start, interval_s)
    present = [k for k in DEVICE_KINDS if profile.has(k)]
    assert len(reports) == intervals * len(present)
    assert {r.kind for r in reports} == set(present)
    assert all(r.device_id == f"{profile.household_id}-{r.kind}" for r in reports)

    hourly = np.zeros((hours, K))
    last = dict.fromkeys(present, 0.0)
    for r in reports:
        delta = r.energy_total_kwh - last[r.kind]
        assert delta >= 0
        last[r.kind] = r.energy_total_kwh
        i = round((r.ts - start.timestamp()) / interval_s) - 1
        assert r.ts == pytest.approx(start.timestamp() + (i + 1) * interval_s)
        assert r.power_w * interval_s / 3600 == pytest.approx(float(m[i, KIND_INDEX[r.kind]]), rel=1e-6, abs=1e-9)
        assert r.on == (r.power_w > 5.0)
        hourly[int((r.ts - 1 - start.timestamp()) // 3600), KIND_INDEX[r.kind]] += delta * 1000
    assert np.allclose(hourly, to_hourly(m, interval_s), rtol=1e-5, atol=1e-3)
    ts = [r.ts for r in reports]
    assert ts == sorted(ts)


def test_plug_reports_reject_a_wrong_layout() -> None:
    p, _ = profile_for(1)
    with pytest.raises(ValueError):
        plug_reports(p, np.zeros((4, K - 1), np.float32), SPRING, 900)


@settings(max_examples=30, deadline=None)
@given(interval_s=st.sampled_from(DIVISORS), hours=st.integers(0, 10), seed=SEEDS)
def test_to_hourly_sums_groups_of_intervals(interval_s: int, hours: int, seed: int) -> None:
    per_hour = 3600 // interval_s
    m = np.random.default_rng(seed).random((hours * per_hour, K)).astype(np.float32)
    h = to_hourly(m, interval_s)
    assert h.shape == (hours, K) and h.dtype == np.float32
    assert np.allclose(h.sum(axis=0), m.sum(axis=0, dtype=np.float64), rtol=1e-4)
    if hours:
        assert np.allclose(h[0], m[:per_hour].sum(axis=0), rtol=1e-5)


def test_to_hourly_rejects_partial_hours() -> None:
    with pytest.raises(ValueError):
        to_hourly(np.zeros((5, K), np.float32), 900)
    with pytest.raises(ValueError):
        to_hourly(np.zeros((4, K), np.float32), 700)


# --- the learning task -------------------------------------------------------------------------


def test_class_edges_are_roughly_balanced_over_a_year() -> None:
    y = []
    for month in (1, 4, 7, 10):
        start = datetime(2023, month, 1, tzinfo=timezone.utc)
        for p, m in generate_households(30, month, start, 14):
            y.append(windows(m, start, p.utc_offset_h)[1])
    share = np.bincount(np.searchsorted(DEFAULT_CLASS_EDGES_WH, np.concatenate(y), side="right"), minlength=4)
    share = share / share.sum()
    assert share.min() > 0.15 and share.max() < 0.4, share


def test_next_six_hours_class_is_learnable_but_not_trivial() -> None:
    """Least squares on log energies, cross-validated over households it never saw, beats the
    majority class by a wide margin yet stays far from perfect."""
    start = datetime(2023, 10, 1, tzinfo=timezone.utc)
    data = [windows(m, start, p.utc_offset_h) for p, m in generate_households(40, 9, start, 21)]
    hits, majority_hits = [], []
    for fold in range(4):
        train = [d for i, d in enumerate(data) if i % 4 != fold]
        test = [d for i, d in enumerate(data) if i % 4 == fold]
        x_tr, y_tr = np.vstack([x for x, _ in train]), np.concatenate([y for _, y in train])
        x_te, y_te = np.vstack([x for x, _ in test]), np.concatenate([y for _, y in test])
        c_tr = np.searchsorted(DEFAULT_CLASS_EDGES_WH, y_tr, side="right")
        c_te = np.searchsorted(DEFAULT_CLASS_EDGES_WH, y_te, side="right")
        mu, sd = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-6
        z_tr = np.hstack([(x_tr - mu) / sd, np.ones((len(x_tr), 1))])
        z_te = np.hstack([(x_te - mu) / sd, np.ones((len(x_te), 1))])
        w = np.linalg.solve(z_tr.T @ z_tr + np.eye(z_tr.shape[1]), z_tr.T @ np.log1p(y_tr))
        hits.append(np.searchsorted(DEFAULT_CLASS_EDGES_WH, np.expm1(z_te @ w), side="right") == c_te)
        majority_hits.append(c_te == np.bincount(c_tr, minlength=4).argmax())
    accuracy, majority = np.concatenate(hits).mean(), np.concatenate(majority_hits).mean()
    print(f"next-6h class: majority {majority:.3f}, least squares {accuracy:.3f}")
    assert accuracy > majority + 0.2
    assert accuracy < 0.9


# --- a timeline for sources that poll ----------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, cuts=st.lists(st.integers(1, 700), min_size=1, max_size=6), offset=st.integers(0, 2000))
def test_timeline_windows_join_up_however_they_are_cut(seed: int, cuts: list[int], offset: int) -> None:
    profile, _ = profile_for(seed)
    start = datetime(2024, 2, 1, tzinfo=timezone.utc) + timedelta(minutes=15 * offset)
    whole = timeline_usage(profile, seed, start, sum(cuts), 900)
    pieces, at = [], start
    for n in cuts:
        pieces.append(timeline_usage(profile, seed, at, n, 900))
        at += timedelta(seconds=900 * n)
    assert np.array_equal(whole, np.concatenate(pieces))
    assert whole.shape == (sum(cuts), K) and whole.dtype == np.float32


def test_timeline_is_the_same_at_every_resolution() -> None:
    profile, _ = profile_for(21)
    start = datetime(2024, 5, 6, 3, tzinfo=timezone.utc)
    quarter = timeline_usage(profile, 4, start, 4 * 24 * 10, 900)
    hourly = timeline_usage(profile, 4, start, 24 * 10, 3600)
    assert np.allclose(to_hourly(quarter, 900), hourly, rtol=1e-4, atol=1e-3)


def test_timeline_looks_like_the_household() -> None:
    profile, rng = profile_for(22, away_spells_per_year=0.0)
    start = datetime(2024, 3, 4, tzinfo=timezone.utc)
    direct = usage_matrix(profile, start, 28 * 24, 3600, rng)
    stitched = timeline_usage(profile, 3, start, 28 * 24, 3600)
    assert not np.array_equal(direct, stitched)
    assert stitched.sum() == pytest.approx(direct.sum(), rel=0.3)
    assert stitched[:, FRIDGE].sum() == pytest.approx(direct[:, FRIDGE].sum(), rel=0.1)
    with pytest.raises(ValueError):
        timeline_usage(profile, 3, start + timedelta(minutes=7), 4, 900)
