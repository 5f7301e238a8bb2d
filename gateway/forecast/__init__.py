"""Load and renewable forecasts 15 minutes to 1 hour ahead, with job hints from the scheduler.

The daemon keeps one :class:`Forecaster` per signal, feeds it one mean value
per minute, and passes the :class:`Forecast` to the planner. Job hints reach
the load forecaster through a :class:`HintBook`, filled by :func:`add_hint`
(local API) and :class:`HintFileWatcher` (a JSON file the scheduler writes).
"""

from gateway.forecast.hints import (
    HintBook,
    HintError,
    HintFileWatcher,
    JobHint,
    add_hint,
    load_hint_file,
    parse_hint,
)
from gateway.forecast.model import (
    Forecast,
    ForecastConfig,
    Forecaster,
    fit_quantile,
    forecast_skill,
)

__all__ = [
    "Forecast",
    "ForecastConfig",
    "Forecaster",
    "HintBook",
    "HintError",
    "HintFileWatcher",
    "JobHint",
    "add_hint",
    "fit_quantile",
    "forecast_skill",
    "load_hint_file",
    "parse_hint",
]
