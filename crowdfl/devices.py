"""The device kinds a home's smart plugs are mapped onto, and what one plug reports.

Shared by the agent (which reads real plugs), the task (one feature channel per kind), the data
set loaders and the household generator; kept apart from the generator so the device imports
these few names without the simulator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

DEVICE_KINDS: tuple[str, ...] = (
    "fridge",
    "washing_machine",  # includes the tumble dryer where the household has one
    "dishwasher",
    "cooking",  # electric oven, hob and microwave
    "kettle",
    "media",  # TV, games console, home-office computer
    "heating_or_ac",  # heat pump or resistive heating, air conditioning, electric water heater
    "lighting",
    "ev_charger",
    "other",  # standby (router, chargers) plus small appliances while someone is up
)
KIND_INDEX: Mapping[str, int] = MappingProxyType({kind: i for i, kind in enumerate(DEVICE_KINDS)})

# Plugs report "on" when the average power over the interval exceeds this (standby is below it).
ON_THRESHOLD_W = 5.0


@dataclass(frozen=True)
class PlugReport:
    """One telemetry message of a smart plug (Tasmota/Shelly style ENERGY fields)."""

    device_id: str
    kind: str
    ts: float  # unix seconds, end of the interval
    power_w: float  # average over the interval
    energy_total_kwh: float  # cumulative meter reading since the simulation start
    on: bool  # the device drew more than ON_THRESHOLD_W on average (not the relay state)
