"""Synthetic household device-usage data for agents, simulations and tests.

Each household gets habits (`HouseholdProfile`) that stay fixed; `usage_matrix` turns them into
per-device energy with a daily rhythm (sleep, commute, meals, evening TV), a weekly rhythm (weekend
lie-ins, laundry days), weather-driven heating and cooling, hot water, and noise plus the odd
anomaly (guests, holidays away, an oven left on). Everything is drawn from the caller's generator,
so a seed reproduces a household exactly; `timeline_usage` serves sources that poll a little at a
time. numpy only. The device kinds and the plug report are in `crowdfl.devices`.

Time model: appliances are simulated as on/off events and continuous loads on a fine grid
(one minute, or the interval if that is shorter) and summed into intervals. Habits follow the
household's local clock, which is UTC + `utc_offset_h` (no daylight saving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

# the kinds and the plug report live in crowdfl.devices (the agent needs them without the generator);
# they stay importable from here for the generator's callers
from crowdfl.devices import DEVICE_KINDS, KIND_INDEX, ON_THRESHOLD_W, PlugReport  # noqa: F401

# Classes for "total household energy over the next 6 hours": class i means
# edges[i-1] <= energy < edges[i]. The quartiles of generate_households populations pooled over a
# year, so the classes are balanced over a year (checked in the tests); within a season they are
# not: winter leans to the top classes, summer to the bottom ones.
DEFAULT_CLASS_EDGES_WH: tuple[float, ...] = (950.0, 2500.0, 5400.0)

# The first hour of the generated world: the manufacturer's lab and held-out homes and the
# simulated customers' histories all start here, so their hour indices line up.
WORLD_START = datetime(2026, 9, 1, tzinfo=timezone.utc)

_FRIDGE, _WASH, _DISH, _COOK, _KETTLE, _MEDIA, _CLIMATE, _LIGHT, _EV, _OTHER = range(10)
_DAY_S = 86_400
_H_S = 3_600

# Shared regional weather: a mid-European climate plus a few slow "weather systems", all
# deterministic functions of time so every household in a simulation sees the same weather.
_MEAN_TEMP_C = 10.5
_SEASON_AMPLITUDE_C = 9.0
_WARMEST_EPOCH_DAY = 200.0  # 20 July 1970; the yearly cycle repeats from there
_DIURNAL_AMPLITUDE_C = 4.0
_WEATHER_PERIODS_D = (3.1, 5.7, 11.3, 23.9)
_WEATHER_AMPLITUDES_C = (1.5, 2.0, 2.0, 1.5)
_WEATHER_PHASES = (0.3, 2.1, 4.4, 1.2)


@dataclass(frozen=True)
class HouseholdProfile:
    """Habits of one household. Hours are local clock hours; values above 24 mean after midnight."""

    household_id: str
    occupants: int
    utc_offset_h: int
    # daily routine
    wake_h: float
    sleep_h: float
    weekend_shift_h: float  # how much later the weekend starts
    commuter: bool  # leaves the house on working weekdays
    leave_h: float
    return_h: float
    wfh_days: tuple[int, ...]  # weekdays (0 = Monday) worked from home
    # laundry
    laundry_days: tuple[int, ...]
    laundry_h: float  # first load on weekdays
    laundry_weekend_h: float
    loads_per_laundry_day: float
    has_dryer: bool
    # kitchen
    dinner_h: float
    cook_prob: float  # chance of a cooked dinner on an evening at home
    cooking_scale: float  # multiplies cooking durations
    bake_prob: float  # chance of a long oven session on a weekend day
    kettle_per_day: float
    dishwasher_prob: float
    dishwasher_timer_h: float | None  # delayed start (e.g. 25.5 = 01:30); None = after dinner
    # media
    tv_prob: float
    office_w: float  # home-office equipment on work-from-home days
    # climate
    heating_w: float  # electrical maximum; 0 = no electric heating (gas, district heating)
    heat_loss_w_per_k: float  # electrical watts per kelvin of indoor/outdoor difference
    heating_setpoint_c: float
    heating_setback_c: float  # lower set-point while asleep or out
    cooling_w: float  # 0 = no air conditioning
    cooling_w_per_k: float
    cooling_setpoint_c: float
    climate_offset_c: float  # local climate relative to the shared regional weather
    water_heater_w: float  # electric hot-water tank (metered with heating, as in the UCI house); 0 = none
    hot_water_kwh: float  # per person and day at home
    water_heater_timer_h: float | None  # off-peak reheat start (e.g. 22.5); None = reheats after use
    # EV
    ev_kwh: float  # typical top-up
    ev_charge_prob: float
    ev_timer_h: float | None  # off-peak timer; None = plug in on arrival
    # fridge
    fridge_period_min: float
    fridge_duty: float
    # everything else
    standby_w: float
    active_w: float
    away_spells_per_year: float
    guest_days_per_year: float
    rated_w: tuple[float, ...]  # per DEVICE_KINDS; 0 = the household has no such device

    def __post_init__(self) -> None:
        if len(self.rated_w) != len(DEVICE_KINDS):
            raise ValueError(f"rated_w needs {len(DEVICE_KINDS)} entries, got {len(self.rated_w)}")
        if min(self.rated_w) < 0:
            raise ValueError("rated_w must be non-negative")
        if self.occupants < 1:
            raise ValueError("a household needs at least one occupant")

    def has(self, kind: str) -> bool:
        return self.rated_w[KIND_INDEX[kind]] > 0

    @property
    def kinds_present(self) -> tuple[str, ...]:
        return tuple(kind for kind, w in zip(DEVICE_KINDS, self.rated_w, strict=True) if w > 0)


@dataclass(frozen=True)
class UsageTrace:
    """A usage matrix plus the ground truth behind it, for tests and anomaly-detection work."""

    matrix: np.ndarray  # float32 (intervals, len(DEVICE_KINDS)), Wh per interval
    away: np.ndarray  # bool (intervals,), household on holiday
    guests: np.ndarray  # bool (intervals,), guests staying that day
    outdoor_c: np.ndarray  # float32 (intervals,), mean outdoor temperature


def sample_profile(household_id: str, rng: np.random.Generator) -> HouseholdProfile:
    """Draw plausible habits and appliances for one (European-style) household."""
    occupants = int(rng.choice([1, 2, 3, 4, 5], p=[0.28, 0.34, 0.16, 0.15, 0.07]))
    commuter = bool(rng.random() < 0.7)
    n_wfh = int(rng.choice([0, 1, 2, 3], p=[0.45, 0.25, 0.2, 0.1])) if commuter else 0
    wfh_days = tuple(sorted(int(d) for d in rng.choice(5, size=n_wfh, replace=False)))
    wake_h = float(np.clip(rng.normal(6.7, 0.6) + (0.0 if commuter else 0.8), 5.0, 9.5))
    sleep_h = float(np.clip(rng.normal(23.0, 0.6), 21.0, 25.5))

    day_weights = np.array([1, 1, 1, 1, 1, 2.5, 2], dtype=float)
    n_laundry = int(np.clip(round(0.7 * occupants + rng.normal(0, 0.5)), 1, 5))
    laundry_days = tuple(
        sorted(int(d) for d in rng.choice(7, n_laundry, replace=False, p=day_weights / day_weights.sum()))
    )

    heating_kind = rng.choice(3, p=[0.5, 0.3, 0.2])  # none, heat pump, resistive
    heating_w = (0.0, float(rng.uniform(2500, 4000)), float(rng.uniform(4000, 8000)))[heating_kind]
    heat_loss = (0.0, float(rng.uniform(20, 60)), float(rng.uniform(70, 160)))[heating_kind]
    has_ac = rng.random() < 0.25
    cooling_w = float(rng.uniform(800, 2500)) if has_ac else 0.0
    water_heater_w = float(rng.uniform(1500, 3000)) if rng.random() < 0.3 else 0.0
    has_ev = rng.random() < 0.18

    def maybe(p: float, low: float, high: float) -> float:
        present = rng.random() < p
        value = float(rng.uniform(low, high))  # drawn either way: keeps later draws aligned
        return value if present else 0.0

    standby_w = float(rng.uniform(10, 40))
    active_w = float(rng.uniform(20, 80) * math.sqrt(occupants))
    rated = (
        float(rng.uniform(80, 180)),  # fridge: every household has one
        maybe(0.9, 1800, 2400),
        maybe(0.65, 1800, 2400),
        maybe(0.8, 2500, 7000),
        maybe(0.75, 2000, 3000),
        maybe(0.97, 80, 300),
        max(heating_w, cooling_w, water_heater_w),
        float(rng.uniform(60, 400)),
        float(rng.choice([3700.0, 7400.0, 11000.0], p=[0.4, 0.5, 0.1])) if has_ev else 0.0,
        standby_w + active_w,
    )
    return HouseholdProfile(
        household_id=household_id,
        occupants=occupants,
        utc_offset_h=int(rng.choice([0, 1, 2], p=[0.15, 0.7, 0.15])),
        wake_h=wake_h,
        sleep_h=sleep_h,
        weekend_shift_h=float(rng.uniform(0.3, 2.0)),
        commuter=commuter,
        leave_h=wake_h + float(rng.uniform(0.6, 1.3)),
        return_h=float(np.clip(rng.normal(17.6, 0.7), 15.0, 20.5)),
        wfh_days=wfh_days,
        laundry_days=laundry_days,
        laundry_h=float(rng.normal(18.8, 0.6) if commuter else rng.normal(9.8, 1.0)),
        laundry_weekend_h=float(rng.normal(9.8, 0.8)),
        loads_per_laundry_day=float(1.0 + 0.2 * occupants * rng.uniform(0.5, 1.5)),
        has_dryer=bool(rng.random() < 0.45),
        dinner_h=float(np.clip(rng.normal(19.0, 0.6), 17.0, 21.5)),
        cook_prob=float(rng.uniform(0.4, 0.95)),
        cooking_scale=float(rng.uniform(0.6, 1.5)),
        bake_prob=float(rng.uniform(0.05, 0.5)),
        kettle_per_day=float(rng.uniform(1.0, 3.0) * math.sqrt(occupants)),
        dishwasher_prob=float(min(1.0, 0.2 * occupants + rng.uniform(0.1, 0.4))),
        dishwasher_timer_h=float(rng.uniform(23.5, 26.5)) if rng.random() < 0.25 else None,
        tv_prob=float(rng.uniform(0.5, 0.95)),
        office_w=float(rng.uniform(60, 150)),
        heating_w=heating_w,
        heat_loss_w_per_k=heat_loss,
        heating_setpoint_c=float(np.clip(rng.normal(20.5, 1.0), 17.5, 23.0)),
        heating_setback_c=float(rng.uniform(1.0, 5.0)),
        cooling_w=cooling_w,
        cooling_w_per_k=float(rng.uniform(60, 150)) if has_ac else 0.0,
        cooling_setpoint_c=float(rng.uniform(22.0, 26.0)),
        climate_offset_c=float(rng.normal(0.0, 1.5)),
        water_heater_w=water_heater_w,
        hot_water_kwh=float(rng.uniform(0.8, 1.8)),
        water_heater_timer_h=float(rng.uniform(22.0, 23.5)) if rng.random() < 0.6 else None,
        ev_kwh=float(rng.uniform(8, 30)),
        ev_charge_prob=float(rng.uniform(0.25, 0.6)),
        ev_timer_h=float(rng.uniform(22.0, 25.0)) if rng.random() < 0.5 else None,
        fridge_period_min=float(rng.uniform(30, 60)),
        fridge_duty=float(rng.uniform(0.25, 0.45)),
        standby_w=standby_w,
        active_w=active_w,
        away_spells_per_year=float(rng.uniform(1.0, 4.0)),
        guest_days_per_year=float(rng.uniform(4.0, 30.0)),
        rated_w=rated,
    )


def outdoor_temperature_c(unix_s: np.ndarray, utc_offset_h: int = 0, climate_offset_c: float = 0.0) -> np.ndarray:
    """Regional outdoor temperature: season + weather systems + day/night swing."""
    t = np.asarray(unix_s, dtype=np.float64)
    days = t / _DAY_S
    local_h = ((t + utc_offset_h * _H_S) % _DAY_S) / _H_S
    temp: np.ndarray = (
        _MEAN_TEMP_C + climate_offset_c + _SEASON_AMPLITUDE_C * np.cos(2 * np.pi * (days - _WARMEST_EPOCH_DAY) / 365.25)
    )
    temp = temp + _DIURNAL_AMPLITUDE_C * np.cos(2 * np.pi * (local_h - 15.0) / 24.0)
    for period, amplitude, phase in zip(_WEATHER_PERIODS_D, _WEATHER_AMPLITUDES_C, _WEATHER_PHASES, strict=True):
        temp = temp + amplitude * np.sin(2 * np.pi * days / period + phase)
    return temp


def usage_matrix(
    profile: HouseholdProfile, start: datetime, intervals: int, interval_s: int, rng: np.random.Generator
) -> np.ndarray:
    """Energy (Wh) per device kind and interval, float32 of shape (intervals, len(DEVICE_KINDS))."""
    return simulate_usage(profile, start, intervals, interval_s, rng).matrix


def simulate_usage(
    profile: HouseholdProfile, start: datetime, intervals: int, interval_s: int, rng: np.random.Generator
) -> UsageTrace:
    """`usage_matrix` plus the hidden state that produced it (holidays, guests, weather)."""
    t0 = _check_window(start, intervals, interval_s)
    base_s = math.gcd(interval_s, 60)
    per_interval = interval_s // base_s
    n = intervals * per_interval
    offset_s = profile.utc_offset_h * _H_S

    # local days that can hold an event reaching into the window (one day back for overnight runs)
    first_day = math.floor((t0 + offset_s) / _DAY_S) - 1
    last_day = math.floor((t0 + n * base_s + offset_s) / _DAY_S)
    plan = _plan_days(profile, np.arange(first_day, last_day + 1, dtype=np.int64), rng)

    t_mid = t0 + base_s * (np.arange(n, dtype=np.float64) + 0.5)
    local = t_mid + offset_s
    di = (np.floor(local / _DAY_S) - first_day).astype(np.int64)
    hour = (local % _DAY_S) / _H_S
    step_hour = (np.arange(n, dtype=np.int64) * base_s) // _H_S  # hour index since the window start
    n_hours = int(step_hour[-1]) + 1 if n else 0

    awake = (hour >= plan.wake[di]) & (hour < plan.sleep[di])
    awake |= hour + 24.0 < plan.sleep[np.maximum(di - 1, 0)]
    out = plan.works_away[di] & (hour >= plan.leave[di]) & (hour < plan.back[di])
    away = plan.away[di]
    home = ~out & ~away
    home_awake = awake & home
    k_hour = n_hours + 1
    hour_mid = t0 + _H_S * (np.arange(k_hour, dtype=np.float64) + 0.5)
    outdoor = outdoor_temperature_c(hour_mid, profile.utc_offset_h, profile.climate_offset_c)[step_hour]

    power = _rasterise(_events(profile, plan, rng), first_day, offset_s, t0, n, base_s)
    r = profile.rated_w

    # fridge: compressor duty cycle, longer while the door gets opened
    phase = (t_mid - t0) / (60.0 * profile.fridge_period_min) + rng.random()
    duty = profile.fridge_duty + 0.12 * home_awake
    power[_FRIDGE] += r[_FRIDGE] * ((phase % 1.0) < duty)

    # climate: set-point schedule against the outdoor temperature, hourly multiplicative noise
    heat_noise, cool_noise = rng.lognormal(0.0, 0.15, k_hour), rng.lognormal(0.0, 0.2, k_hour)
    if profile.heating_w > 0:
        setpoint = profile.heating_setpoint_c - profile.heating_setback_c * ~home_awake
        demand = profile.heat_loss_w_per_k * (setpoint - outdoor) * heat_noise[step_hour]
        power[_CLIMATE] += np.where(away, 0.0, np.clip(demand, 0.0, profile.heating_w))
    if profile.cooling_w > 0:
        demand = profile.cooling_w_per_k * (outdoor - profile.cooling_setpoint_c) * cool_noise[step_hour]
        power[_CLIMATE] += np.where(home, np.clip(demand, 0.0, profile.cooling_w), 0.0)

    # lighting: when it is dark and someone is up at home
    daily = rng.lognormal(0.0, 0.2, plan.day.size)[di]
    if r[_LIGHT] > 0:
        half_day = 6.0 + 2.25 * np.sin(2 * np.pi * (plan.day + 0.5 - 80.0) / 365.25)  # daylight / 2
        dark = np.clip((np.abs(hour - 12.5) - half_day[di]) / 0.75 + 0.5, 0.0, 1.0)
        people = 0.4 + 0.6 * np.minimum(plan.people[di] / 3.0, 1.0)
        power[_LIGHT] += r[_LIGHT] * dark * home_awake * people * np.minimum(daily, 1.5) / 1.5

    # other: standby always, small appliances while someone is up
    active = profile.active_w * np.minimum(rng.lognormal(0.0, 0.3, k_hour), 2.0)[step_hour] * home_awake
    power[_OTHER] += profile.standby_w + active

    power[power < 1e-6] = 0.0  # cumulative sums leave +-1e-13 residue where runs ended
    energy = power.reshape(len(DEVICE_KINDS), intervals, per_interval).sum(axis=2).T * (base_s / _H_S)
    energy[:, np.asarray(r) <= 0] = 0.0
    return UsageTrace(
        matrix=energy.astype(np.float32),
        away=np.asarray(away.reshape(intervals, per_interval).any(axis=1)),
        guests=np.asarray(plan.guests[di].reshape(intervals, per_interval).any(axis=1)),
        outdoor_c=outdoor.reshape(intervals, per_interval).mean(axis=1).astype(np.float32),
    )


def to_hourly(matrix: np.ndarray, interval_s: int) -> np.ndarray:
    """Sum consecutive intervals into hours, counted from the first row."""
    if interval_s <= 0 or _H_S % interval_s:
        raise ValueError(f"interval_s must divide 3600, got {interval_s}")
    per_hour = _H_S // interval_s
    if matrix.ndim != 2 or matrix.shape[0] % per_hour:
        raise ValueError(f"need a 2-D matrix with a multiple of {per_hour} rows, got {matrix.shape}")
    hours = matrix.shape[0] // per_hour
    summed: np.ndarray = matrix.reshape(hours, per_hour, matrix.shape[1]).sum(axis=1, dtype=np.float64)
    return summed.astype(np.float32)


def plug_reports(profile: HouseholdProfile, matrix: np.ndarray, start: datetime, interval_s: int) -> list[PlugReport]:
    """Telemetry for each device the household has, one report per device and interval, in time order."""
    t0 = _check_window(start, matrix.shape[0], interval_s)
    if matrix.ndim != 2 or matrix.shape[1] != len(DEVICE_KINDS):
        raise ValueError(f"matrix must be (intervals, {len(DEVICE_KINDS)}), got {matrix.shape}")
    present = [k for k, w in enumerate(profile.rated_w) if w > 0]
    energy_wh = matrix[:, present].astype(np.float64)
    totals = (np.cumsum(energy_wh, axis=0) / 1000.0).tolist()
    powers = (energy_wh * (_H_S / interval_s)).tolist()
    ends = (t0 + interval_s * np.arange(1, matrix.shape[0] + 1, dtype=np.float64)).tolist()
    kinds = [DEVICE_KINDS[k] for k in present]
    ids = [f"{profile.household_id}-{kind}" for kind in kinds]
    return [
        PlugReport(ids[j], kinds[j], ts, row_p[j], row_e[j], row_p[j] > ON_THRESHOLD_W)
        for ts, row_p, row_e in zip(ends, powers, totals, strict=True)
        for j in range(len(present))
    ]


def generate_households(
    n: int, seed: int, start: datetime, days: int, interval_s: int = 3600
) -> list[tuple[HouseholdProfile, np.ndarray]]:
    """n households over the same window. Household i depends only on (seed, i), not on n."""
    intervals = days * _DAY_S // interval_s
    result = []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        rng = np.random.default_rng(child)
        profile = sample_profile(f"hh{seed}-{i:04d}", rng)
        result.append((profile, usage_matrix(profile, start, intervals, interval_s, rng)))
    return result


def timeline_usage(
    profile: HouseholdProfile, seed: int, start: datetime, intervals: int, interval_s: int
) -> np.ndarray:
    """Any window of one fixed, endless timeline of the household, like `usage_matrix`.

    For sources that poll a little at a time: consecutive windows join up exactly and the same
    window always gives the same data, however the calls are cut. Separate `usage_matrix` calls
    would each draw a fresh day (a dinner in one poll, none in the next). The timeline is made of
    calendar weeks (UTC, from the epoch), each from its own generator, so a run in progress at a
    week boundary is cut and a holiday ends there. `start` must lie on the interval grid.
    """
    t0 = _check_window(start, intervals, interval_s)
    if t0 % interval_s:
        raise ValueError("start must be a multiple of interval_s since the epoch")
    week_s = 7 * _DAY_S
    first = int(t0 // week_s)
    last = int((t0 + intervals * interval_s - 1) // week_s) if intervals else first
    weeks = [
        usage_matrix(
            profile,
            datetime.fromtimestamp(week * week_s, tz=timezone.utc),
            week_s // interval_s,
            interval_s,
            np.random.default_rng([seed, week]),
        )
        for week in range(first, last + 1)
    ]
    skip = int((t0 - first * week_s) // interval_s)
    return np.concatenate(weeks)[skip : skip + intervals]


# --- internals -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DayPlan:
    """What each local day looks like; index 0 is the day before the window starts."""

    day: np.ndarray  # epoch day number (local)
    dow: np.ndarray  # 0 = Monday
    weekend: np.ndarray
    away: np.ndarray  # on holiday
    guests: np.ndarray
    people: np.ndarray  # occupants plus guests
    works_away: np.ndarray  # out between leave and back
    home_midday: np.ndarray
    wake: np.ndarray
    sleep: np.ndarray
    leave: np.ndarray
    back: np.ndarray


@dataclass(frozen=True)
class _Events:
    kind: np.ndarray
    day: np.ndarray  # index into the plan
    start_h: np.ndarray  # local hours from that day's midnight
    dur_h: np.ndarray
    power_w: np.ndarray


def _check_window(start: datetime, intervals: int, interval_s: int) -> float:
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("start must be timezone-aware")
    if interval_s <= 0 or _H_S % interval_s:
        raise ValueError(f"interval_s must divide 3600, got {interval_s}")
    if intervals < 0:
        raise ValueError("intervals must be non-negative")
    return start.timestamp()


def _plan_days(profile: HouseholdProfile, day: np.ndarray, rng: np.random.Generator) -> _DayPlan:
    d = day.size
    idx = np.arange(d)
    dow = (day + 3) % 7  # 1 January 1970 was a Thursday
    weekend = dow >= 5

    spells = rng.poisson(profile.away_spells_per_year * d / 365.0)
    spell_start = rng.integers(0, d, spells)
    spell_len = rng.integers(2, 11, spells)
    away = np.asarray(((idx[:, None] >= spell_start) & (idx[:, None] < spell_start + spell_len)).any(axis=1))

    guest_p = profile.guest_days_per_year / 365.0 * np.where(weekend, 2.0, 0.6)
    guests = (rng.random(d) < guest_p) & ~away
    people = profile.occupants + guests * rng.uniform(1.0, 4.0, d)

    wfh = np.isin(dow, profile.wfh_days)
    sick = rng.random(d) < 0.03
    works_away = profile.commuter & ~weekend & ~wfh & ~sick & ~away
    return _DayPlan(
        day=day,
        dow=dow,
        weekend=weekend,
        away=away,
        guests=guests,
        people=people,
        works_away=works_away,
        home_midday=~works_away & ~away,
        wake=profile.wake_h + weekend * profile.weekend_shift_h + rng.normal(0.0, 0.25, d),
        sleep=profile.sleep_h + np.isin(dow, (4, 5)) * 0.7 + rng.normal(0.0, 0.3, d),
        leave=profile.leave_h + rng.normal(0.0, 0.15, d),
        back=profile.return_h + rng.normal(0.0, 0.4, d),
    )


def _events(profile: HouseholdProfile, plan: _DayPlan, rng: np.random.Generator) -> _Events:
    """Appliance runs as (day, start, duration, power). Draws happen whether or not a device exists,
    so adding a device to a profile does not reshuffle the rest of its household's data."""
    d = plan.day.size
    days = np.arange(d)
    home = ~plan.away
    r = profile.rated_w
    parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(kind: int, mask: np.ndarray, start_h: np.ndarray, dur_h: np.ndarray, power_w: np.ndarray) -> None:
        if r[kind] > 0:
            parts.append((kind, days[mask], start_h[mask], dur_h[mask], power_w[mask]))

    def u(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, d)

    # cooking: breakfast, lunch on days at home, dinner, weekend baking, the odd oven left on
    cook_power = r[_COOK] * u(0.35, 0.7) * np.minimum(1.0 + 0.15 * (plan.people - 1), 1.4)
    add(_COOK, home & (u(0, 1) < 0.3), plan.wake + u(0.2, 0.6), u(0.1, 0.25), cook_power)
    lunch_p = np.where(plan.weekend, 0.6, 0.35)
    add(_COOK, plan.home_midday & (u(0, 1) < lunch_p), 12.0 + rng.normal(0, 0.3, d), u(0.2, 0.5), cook_power)
    dinner_dur = u(0.3, 0.9) * profile.cooking_scale * (1.0 + 0.5 * plan.guests)
    dinner_mask = home & (u(0, 1) < np.where(plan.guests, 1.0, profile.cook_prob))
    dinner_start = profile.dinner_h + 0.3 * plan.weekend + rng.normal(0.0, 0.35, d) - dinner_dur
    add(_COOK, dinner_mask, dinner_start, dinner_dur, cook_power)
    bake = home & plan.weekend & (u(0, 1) < profile.bake_prob)
    add(_COOK, bake, u(11.0, 16.0), u(0.8, 1.6), np.minimum(r[_COOK], 2000.0) * u(0.6, 0.9))
    add(_COOK, home & (u(0, 1) < 0.004), plan.back + 1.0, u(2.0, 4.0), r[_COOK] * u(0.3, 0.5))

    # kettle: on waking, then scattered through the hours someone is home and up
    add(_KETTLE, home & (u(0, 1) < 0.8), plan.wake + u(0.1, 0.3), u(0.04, 0.07), r[_KETTLE] * u(0.95, 1.0))
    boils = rng.poisson(profile.kettle_per_day * np.sqrt(plan.people / profile.occupants) * home)
    b_day = np.repeat(days, boils)
    b_start = rng.uniform(plan.wake[b_day] + 0.5, np.minimum(plan.sleep[b_day], 24.0) - 0.2)
    b_out = plan.works_away[b_day] & (b_start >= plan.leave[b_day]) & (b_start < plan.back[b_day])
    b_dur, b_power = rng.uniform(0.04, 0.07, b_day.size), r[_KETTLE] * rng.uniform(0.95, 1.0, b_day.size)
    if r[_KETTLE] > 0:
        keep = ~b_out
        parts.append((_KETTLE, b_day[keep], b_start[keep], b_dur[keep], b_power[keep]))

    # dishwasher: after dinner or on a night timer; heat, wash, heat-dry
    dish = home & (u(0, 1) < np.where(plan.guests, 1.0, profile.dishwasher_prob))
    timer = profile.dishwasher_timer_h
    dish_start = np.full(d, timer) if timer is not None else profile.dinner_h + u(0.7, 2.0)
    heat_min = u(15, 25) / 60
    add(_DISH, dish, dish_start, heat_min, r[_DISH] * u(0.9, 1.0))
    add(_DISH, dish, dish_start + heat_min, np.full(d, 0.8), np.full(d, 80.0))
    add(_DISH, dish, dish_start + heat_min + 0.8, u(0.2, 0.3), r[_DISH] * u(0.8, 0.95))

    # laundry on the household's laundry days; weekday loads wait until someone is back
    laundry = home & np.isin(plan.dow, profile.laundry_days) & (u(0, 1) < 0.92)
    loads = np.where(laundry, 1 + rng.poisson(profile.loads_per_laundry_day - 1.0 + plan.guests, d), 0)
    first = np.where(plan.weekend, profile.laundry_weekend_h, profile.laundry_h) + rng.normal(0.0, 0.4, d)
    first = np.where(plan.works_away & (first < plan.back) & (first > plan.leave - 1.0), plan.back + u(0.3, 1.0), first)
    l_day = np.repeat(days, loads)
    l_no = np.arange(l_day.size) - np.repeat(np.cumsum(loads) - loads, loads)
    l_start = first[l_day] + l_no * rng.uniform(1.6, 2.2, l_day.size)
    m = l_day.size
    heat_h, heat_w = rng.uniform(0.2, 0.33, m), r[_WASH] * rng.uniform(0.9, 1.0, m)
    spin_w = rng.uniform(350, 550, m)
    dry = profile.has_dryer & (rng.random(m) < 0.7)
    dry_h, dry_w = rng.uniform(0.8, 1.4, m), rng.uniform(1600, 2400, m)
    if r[_WASH] > 0:
        parts.append((_WASH, l_day, l_start, heat_h, heat_w))
        parts.append((_WASH, l_day, l_start, np.full(m, 1.3), np.full(m, 150.0)))
        parts.append((_WASH, l_day, l_start + 1.3, np.full(m, 0.17), spin_w))
        parts.append((_WASH, l_day[dry], l_start[dry] + 1.5, dry_h[dry], dry_w[dry]))

    # media: evening TV, weekend afternoons, home office on work-from-home weekdays
    tv = home & (u(0, 1) < np.where(plan.guests, 1.0, profile.tv_prob))
    tv_start = profile.dinner_h + u(0.3, 0.9)
    tv_dur = np.maximum(plan.sleep - u(0.1, 0.6) - tv_start, 0.25)
    add(_MEDIA, tv, tv_start, tv_dur, r[_MEDIA] * u(0.7, 1.0))
    add(_MEDIA, home & plan.weekend & (u(0, 1) < 0.4), u(13.0, 17.0), u(1.0, 3.0), r[_MEDIA] * u(0.6, 1.0))
    office = profile.commuter & plan.home_midday & ~plan.weekend
    office_w = np.full(d, min(profile.office_w, r[_MEDIA]))  # shares the media plug's strip
    office_start = plan.wake + u(0.7, 1.3)
    add(_MEDIA, office, office_start, np.maximum(12.3 - office_start, 0.5), office_w)
    add(_MEDIA, office, 13.0 + u(0.0, 0.3), u(4.0, 5.0), office_w)

    # EV: a top-up on arrival or on an off-peak timer
    ev = home & (u(0, 1) < profile.ev_charge_prob * np.where(plan.works_away, 1.3, 0.7))
    ev_dur = np.minimum(profile.ev_kwh * u(0.3, 1.0) * 1000.0 / max(r[_EV], 1.0), 12.0)
    ev_start = np.where(plan.works_away, plan.back + u(0.0, 0.3), u(10.0, 19.0))
    if profile.ev_timer_h is not None:
        ev_start = np.full(d, profile.ev_timer_h)
    add(_EV, ev, ev_start, ev_dur, np.full(d, r[_EV]))

    # hot water: the day's use reheated overnight on an off-peak timer, or after showers and dishes
    heat_h = (
        plan.people * profile.hot_water_kwh * 1000.0 * rng.lognormal(0.0, 0.2, d) / max(profile.water_heater_w, 1.0)
    )
    water_w = np.full(d, profile.water_heater_w)
    timer_start, morning, evening = u(0.0, 0.3), plan.wake + u(0.2, 0.5), profile.dinner_h + u(0.5, 2.0)
    if profile.water_heater_w > 0 and profile.water_heater_timer_h is not None:
        add(_CLIMATE, home, profile.water_heater_timer_h + timer_start, heat_h, water_w)
    elif profile.water_heater_w > 0:
        add(_CLIMATE, home, morning, 0.6 * heat_h, water_w)
        add(_CLIMATE, home, evening, 0.4 * heat_h, water_w)

    if not parts:
        empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0)
        return _Events(empty_i, empty_i, empty_f, empty_f, empty_f)
    return _Events(
        kind=np.concatenate([np.full(p[1].size, p[0], dtype=np.int64) for p in parts]),
        day=np.concatenate([p[1] for p in parts]),
        start_h=np.concatenate([p[2] for p in parts]),
        dur_h=np.concatenate([p[3] for p in parts]),
        power_w=np.concatenate([p[4] for p in parts]),
    )


def _rasterise(ev: _Events, first_day: int, offset_s: int, t0: float, n: int, base_s: int) -> np.ndarray:
    """Power per kind and grid step, shape (kinds, n), from events via a difference array."""
    k = len(DEVICE_KINDS)
    start_s = (first_day + ev.day) * _DAY_S + ev.start_h * _H_S - offset_s
    s = np.rint((start_s - t0) / base_s).astype(np.int64)
    e = s + np.maximum(np.rint(ev.dur_h * _H_S / base_s).astype(np.int64), 1)
    s, e = np.clip(s, 0, n), np.clip(e, 0, n)
    idx = np.concatenate([ev.kind * (n + 1) + s, ev.kind * (n + 1) + e])
    weights = np.concatenate([ev.power_w, -ev.power_w])
    diff = np.bincount(idx, weights=weights, minlength=(n + 1) * k).astype(np.float64).reshape(k, n + 1)
    return np.cumsum(diff[:, :n], axis=1)
