"""The planner's outlook: net-load scenarios for the next day, one per past day of history.

The forecasts reach one hour ahead, but a billing peak can sit inside a
spell of high load and calm wind that lasts a day, and the cap has to ration
the battery over the whole spell. So the outlook reaches ``outlook_s``
ahead (a day by default) as a set of scenarios, all in 15-minute means:

* The first hour is the same in every scenario: the upper quantile of the
  load forecast minus the lower quantile of the renewable forecast.
* After the hour, scenario ``d`` is the load of ``d`` days ago at the same
  time of day, plus today's *anomaly* against that day (the last interval's
  load minus the load of the same interval ``d`` days ago). The anomaly
  fades with time constant ``anomaly_tau_s``: a day that runs high tends to
  stay high for some hours, and further ahead the past day's shape wins.
* Renewable output after the hour is the lower forecast quantile at one
  hour, fading with time constant ``renewable_fade_s``. Past days' wind
  does not predict tomorrow's, so the scenarios plan for a calm spell.

Until a day of history exists there is one scenario: the forecast's hour,
then its median at one hour held for ``fallback_hold_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gateway.plan.planner import PlannerConfig, PlannerInputs, PlannerState


@dataclass(frozen=True)
class Outlook:
    """Net-load scenarios per demand interval ahead, in kW; row 0 of each starts now."""

    #: Shape (scenarios, intervals). The first hour is the forecast's upper net load.
    scenarios_kw: np.ndarray
    #: The forecast's median net load for the hour, one value per interval.
    hour_point_kw: np.ndarray
    #: The forecast's upper net load for the hour, one value per interval.
    hour_upper_kw: np.ndarray
    #: Renewable surplus (negative median net load) expected within the hour, in kWh.
    surplus_kwh: float


def history_capacity(config: PlannerConfig) -> int:
    """Return how many interval means the planner keeps.

    One interval more than ``history_s`` so that the oldest scenario still
    has the interval before "now" a whole number of days ago, for its anomaly.
    """
    return round(config.history_s / config.interval_s) + 1


def build_outlook(config: PlannerConfig, state: PlannerState, inputs: PlannerInputs) -> Outlook:
    """Turn the forecasts and the history into net-load scenarios for ``outlook_s`` ahead.

    Each forecast horizon stands for the interval that ends there. Without a
    load forecast the last measured net load is carried through the hour.
    """
    point, upper, wind_lower_kw = _forecast_hour(config, inputs)
    surplus = float(np.clip(-point, 0.0, None).sum() * config.interval_s / 3600.0)
    count = max(round(config.outlook_s / config.interval_s) - point.size, 0)
    loads = _past_day_scenarios(config, state, point.size, count)
    if loads is None:
        hold_count = min(round(config.fallback_hold_s / config.interval_s), count)
        scenarios = np.concatenate([upper, np.full(hold_count, point[-1])])[None, :]
    else:
        after_s = (np.arange(count) + 1) * config.interval_s
        renewable = wind_lower_kw * np.exp(-after_s / config.renewable_fade_s)
        later = loads - renewable[None, :]
        scenarios = np.concatenate([np.repeat(upper[None, :], loads.shape[0], axis=0), later], 1)
    return Outlook(scenarios, point, upper, surplus)


def _forecast_hour(
    config: PlannerConfig, inputs: PlannerInputs
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return the hour's median and upper net load per interval and the lower renewable at 1 h."""
    last_net = inputs.net_load_kw if inputs.net_load_kw is not None else 0.0
    load_fc, wind_fc = inputs.load_forecast, inputs.renewable_forecast
    if load_fc is None:
        point = np.full(4, last_net)
        return point, point.copy(), inputs.renewable_kw or 0.0
    horizons = np.asarray(load_fc.horizons_s)
    ends_s = np.arange(1, 5) * config.interval_s
    pick = np.clip(np.searchsorted(horizons, ends_s - 1e-6), 0, horizons.size - 1)
    point = load_fc.point_kw[pick].copy()
    upper = load_fc.upper_kw[pick].copy()
    if wind_fc is None:
        return point, upper, inputs.renewable_kw or 0.0
    wind_h = np.asarray(wind_fc.horizons_s)
    wind_pick = np.clip(np.searchsorted(wind_h, ends_s - 1e-6), 0, wind_h.size - 1)
    point -= wind_fc.point_kw[wind_pick]
    upper -= wind_fc.lower_kw[wind_pick]
    return point, upper, float(wind_fc.lower_kw[-1])


def _past_day_scenarios(
    config: PlannerConfig, state: PlannerState, skip: int, count: int
) -> np.ndarray | None:
    """Return the load of each past day for the ``count`` intervals after the first ``skip``.

    Row ``d - 1`` is the load ``d`` days ago plus the fading anomaly. None
    when the history covers less than one day.
    """
    per_day = round(86400.0 / config.interval_s)
    load = np.asarray(state.history_net_kw) + np.asarray(state.history_renewable_kw)
    # The anomaly compares the last interval with the one a whole number of days before it.
    days = min((load.size - 1) // per_day, round(config.history_s / 86400.0))
    if days < 1 or state.interval_index is None or count == 0:
        return None
    # load[-1] is interval interval_index - 1, so interval interval_index + j - d * per_day
    # sits at position load.size + j - d * per_day, which is in the past while j < per_day.
    offsets = np.arange(skip, skip + count)
    back = per_day * np.arange(1, days + 1)
    rows = load[load.size + offsets[None, :] - back[:, None]]
    anomaly_kw = load[-1] - load[load.size - 1 - back]
    fade = np.exp(-(offsets + 1) * config.interval_s / config.anomaly_tau_s)
    return rows + anomaly_kw[:, None] * fade[None, :]
