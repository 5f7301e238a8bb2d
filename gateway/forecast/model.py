"""Quantile forecasts 15 minutes to 1 hour ahead from a measured history and optional job hints.

One :class:`Forecaster` serves one signal (the site load, or the renewable
output). The caller feeds it one mean value per step (a minute by default)
and gets a :class:`Forecast` back each time.

Method: direct linear quantile regression, one model per horizon and
quantile, on features of the recent history. The model predicts the change
from the last value, so with all weights at zero it is persistence. The
features, all divided by ``scale_kw``:

* the last value, through six hat functions over [0, ``scale_kw``], so the
  model can learn level-dependent behaviour (wind near rated power can only
  fall, a full cluster can only empty);
* the change over each of ``lags_s``;
* the gap between the mean over each of ``means_s`` and the last value
  (reversion to a longer mean);
* the time of day (sine and cosine of the UTC hour);
* for the load, the hinted job power that starts and the hinted job power
  that stops before that horizon (:meth:`HintBook.power_steps_kw`), as two
  features with weights of their own. The fit learns how much of a hint
  shows up in the load: a hint gives a job's whole power, while the load
  changes by that minus the nodes' idle draw, and estimated starts are late.

The weights are fitted by iteratively reweighted least squares on the
pinball loss, with a small ridge term. The median is the point forecast,
which is what minimises the mean absolute error. The first fit happens once
``min_fit_s`` of history has been collected, and the model is refitted every
``refit_every_s``. Until then, or when a gap in the history leaves a feature
undefined, the forecast falls back to persistence plus the hinted starts
minus stops. Its outer quantiles then lie ``cold_spread_fraction *
scale_kw * sqrt(hours ahead)`` from the median, a spread that is an
assumption, not a fit.

NOTE: for a wind farm the 1-hour median stays within about 2 % of
persistence's error (``bench/bench_forecast.py`` on two years of one plant),
whatever the features. Better wind forecasts need an input this module does
not take, such as a numerical weather prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import structlog

from gateway.forecast.hints import HintBook

log = structlog.get_logger(__name__)

_HAT_KNOTS = np.linspace(0.0, 1.0, 6)
_HAT_WIDTH = 0.2
#: A level column needs this many rows' worth of weight in the fitted history (and at
#: least this share of the rows) before the model may forecast from that level.
_MIN_LEVEL_ROWS = 30.0
_MIN_LEVEL_SHARE = 0.02


@dataclass(frozen=True)
class ForecastConfig:
    """Settings of one forecast: signal, range, step, horizons, quantiles, fit schedule."""

    #: Signal name for logs: ``load``, ``wind``.
    name: str
    #: Typical full range of the signal: the wind farm's rating, the site's maximum load.
    scale_kw: float
    step_s: float = 60.0
    horizons_s: tuple[float, ...] = (900.0, 1800.0, 2700.0, 3600.0)
    #: Must contain 0.5, the point forecast.
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    lower_kw: float = 0.0
    upper_kw: float = math.inf
    #: History kept for fitting.
    history_s: float = 8 * 86400.0
    #: History needed before the first fit.
    min_fit_s: float = 86400.0
    refit_every_s: float = 86400.0
    lags_s: tuple[float, ...] = (600.0, 1800.0, 3600.0)
    #: Windows of the mean-reversion features. Means over 6 and 24 hours made the one-hour
    #: load forecast 3 % worse on the benchmark's cluster and did not help the wind one.
    means_s: tuple[float, ...] = (3600.0,)
    #: Fit on every n-th step only; neighbouring minutes carry almost the same information.
    fit_stride_s: float = 300.0
    use_hints: bool = False
    cold_spread_fraction: float = 0.1
    #: Share of the fitted history, the most recent part, held out to check each horizon's
    #: model against persistence before it is used.
    validation_fraction: float = 0.25

    def __post_init__(self) -> None:
        problems = []
        if not self.scale_kw > 0 or not self.step_s > 0:
            problems.append(f"scale_kw={self.scale_kw} and step_s={self.step_s} must be > 0")
        for name in ("horizons_s", "lags_s", "means_s"):
            for value in getattr(self, name):
                ratio = value / self.step_s
                if value <= 0 or abs(ratio - round(ratio)) > 1e-9:
                    problems.append(f"{name} value {value} is not a positive multiple of step_s")
        quantiles = self.quantiles
        if 0.5 not in quantiles or sorted(set(quantiles)) != list(quantiles):
            problems.append(f"quantiles {quantiles} must be increasing, unique and contain 0.5")
        if any(not 0 < q < 1 for q in quantiles):
            problems.append(f"quantiles {quantiles} must lie strictly between 0 and 1")
        if not self.lower_kw < self.upper_kw:
            problems.append(f"lower_kw={self.lower_kw} must be below upper_kw={self.upper_kw}")
        if not 0.0 < self.validation_fraction < 1.0:
            problems.append(
                f"validation_fraction={self.validation_fraction} must be between 0 and 1"
            )
        if self.min_fit_s > self.history_s:
            problems.append(
                f"min_fit_s={self.min_fit_s} exceeds history_s={self.history_s}; "
                "the model could never be fitted"
            )
        if problems:
            raise ValueError(f"invalid forecast config {self.name!r}: " + "; ".join(problems))

    def steps(self, seconds: float) -> int:
        return round(seconds / self.step_s)


@dataclass(frozen=True)
class Forecast:
    """Quantile forecasts of one signal at several horizons, made at ``t_utc_s``."""

    t_utc_s: float
    horizons_s: tuple[float, ...]
    quantiles: tuple[float, ...]
    #: Shape (quantiles, horizons), in kW; rows are increasing.
    values_kw: np.ndarray
    #: The value the forecast starts from (the last one fed in), or NaN.
    last_kw: float
    #: ``regression`` when the fitted model made it, ``persistence`` for the fallback.
    method: str

    def quantile_kw(self, q: float) -> np.ndarray:
        try:
            return self.values_kw[self.quantiles.index(q)]
        except ValueError:
            raise KeyError(f"quantile {q} not forecast; available: {self.quantiles}") from None

    @property
    def point_kw(self) -> np.ndarray:
        return self.quantile_kw(0.5)

    @property
    def upper_kw(self) -> np.ndarray:
        return self.values_kw[-1]

    @property
    def lower_kw(self) -> np.ndarray:
        return self.values_kw[0]


def fit_quantile(
    x: np.ndarray, target: np.ndarray, q: float, ridge: float = 1e-4, iterations: int = 30
) -> np.ndarray:
    """Fit linear weights that minimise the pinball loss for quantile ``q`` (IRLS).

    Residuals smaller than 1e-4 (in the scaled units) are weighted as 1e-4,
    which keeps the reweighting finite where the fit is exact.
    """
    gram_ridge = ridge * np.eye(x.shape[1])
    weights = np.linalg.solve(x.T @ x + gram_ridge, x.T @ target)
    for _ in range(iterations):
        residual = target - x @ weights
        w = np.where(residual >= 0, q, 1.0 - q) / np.maximum(np.abs(residual), 1e-4)
        updated = np.linalg.solve(x.T @ (x * w[:, None]) + gram_ridge, x.T @ (w * target))
        if np.max(np.abs(updated - weights)) < 1e-7:
            return updated
        weights = updated
    return weights


class Forecaster:
    """Forecasts of one signal, updated with one value per step.

    Not thread-safe. A refit runs inside :meth:`update` and takes tens of
    milliseconds for eight days of minute values.
    """

    def __init__(self, config: ForecastConfig, hints: HintBook | None = None) -> None:
        if config.use_hints and hints is None:
            raise ValueError(f"forecast {config.name!r} uses hints but no HintBook was given")
        self.config = config
        self.hints = hints if config.use_hints else None
        self._capacity = config.steps(config.history_s)
        self._horizon_steps = np.array([config.steps(h) for h in config.horizons_s])
        # Maximum number of past steps that one forecast reads.
        self._reach = max(config.steps(s) for s in (*config.lags_s, *config.means_s)) + 1
        self._t_first: float | None = None
        # Values and hint rows live in buffers of twice the capacity. When a buffer
        # fills, its oldest half is dropped, so appending stays cheap and slices stay views.
        self._y = np.full(2 * self._capacity, np.nan)
        self._hint = np.full((2 * self._capacity, 2, len(config.horizons_s)), np.nan)
        self._count = 0
        self._weights: np.ndarray | None = None  # (horizons, features, quantiles)
        self._fit_tried_at: float | None = None
        self._fit_failing = False
        #: Horizons whose model lost to persistence at the last fit.
        self._rejected_horizons_s: tuple[float, ...] = ()
        #: Per level column, whether the fitted history visited that level often enough.
        self._level_known = np.ones(_HAT_KNOTS.size, dtype=bool)

    @property
    def fitted(self) -> bool:
        return self._weights is not None

    @property
    def last_t_utc_s(self) -> float | None:
        if self._t_first is None:
            return None
        return self._t_first + (self._count - 1) * self.config.step_s

    def update(self, t_utc_s: float, value_kw: float) -> Forecast:
        """Record the mean value of the step that ends at ``t_utc_s`` and forecast from it."""
        self.record(t_utc_s, value_kw)
        return self.predict()

    def record(self, t_utc_s: float, value_kw: float) -> None:
        """Record the mean value of the step that ends at ``t_utc_s``, refitting when due.

        ``value_kw`` is NaN (or None) when the step had no good measurement.
        Skipped steps are recorded as missing. A time that is not at least one
        step after the previous one raises ``ValueError``.
        """
        step = self.config.step_s
        value = math.nan if value_kw is None or not math.isfinite(value_kw) else float(value_kw)
        hint_row = self._hint_row(t_utc_s)
        if self._t_first is None:
            self._t_first = t_utc_s
        else:
            last = self.last_t_utc_s
            gap = round((t_utc_s - last) / step)
            if gap < 1:
                raise ValueError(
                    f"forecast {self.config.name!r}: time {t_utc_s} is not at least one step "
                    f"({step} s) after the previous one ({last}); feed one value per step"
                )
            for _ in range(min(gap - 1, self._capacity)):
                self._append(math.nan, np.full((2, len(self._horizon_steps)), math.nan))
            if gap - 1 > self._capacity:
                # The gap is longer than the kept history, which is now all missing: place
                # the next value at t_utc_s.
                self._t_first = t_utc_s - self._count * step
        self._append(value, hint_row)
        now = self.last_t_utc_s
        history_s = (self._count - 1) * step
        # After a failed fit, retry within the hour rather than at the next step.
        wait_s = min(self.config.refit_every_s, 3600.0) if self._fit_failing else (
            self.config.refit_every_s
        )
        due = self._fit_tried_at is None or now - self._fit_tried_at >= wait_s
        if history_s >= self.config.min_fit_s and due:
            self._fit_tried_at = now
            self.fit()

    def _hint_row(self, t_utc_s: float) -> np.ndarray:
        if self.hints is None:
            return np.zeros((2, len(self._horizon_steps)))
        return self.hints.power_steps_kw(t_utc_s, self.config.horizons_s)

    def _append(self, value: float, hint_row: np.ndarray) -> None:
        if self._count == self._y.size:
            keep = self._capacity
            self._y[:keep] = self._y[-keep:]
            self._hint[:keep] = self._hint[-keep:]
            self._t_first += (self._count - keep) * self.config.step_s
            self._count = keep
        self._y[self._count] = value
        self._hint[self._count] = hint_row
        self._count += 1

    def _history(self) -> tuple[np.ndarray, np.ndarray]:
        """Return views of the kept values and hint rows, at most ``history_s`` long."""
        start = max(self._count - self._capacity, 0)
        return self._y[start : self._count], self._hint[start : self._count]

    def _design(self, y: np.ndarray, rows: np.ndarray, t0_utc_s: float) -> np.ndarray:
        """Build the features of ``rows`` of ``y`` except the hint columns.

        ``y[0]`` is the value at ``t0_utc_s``. A feature is NaN where the
        history is too short or has too many gaps.
        """
        config = self.config
        scale = config.scale_kw
        level = y[rows]
        unit = np.clip(level / scale, 0.0, 1.0)
        columns = [np.maximum(1.0 - np.abs(unit - knot) / _HAT_WIDTH, 0.0) for knot in _HAT_KNOTS]
        for lag_s in config.lags_s:
            k = config.steps(lag_s)
            past = np.where(rows - k >= 0, y[np.maximum(rows - k, 0)], np.nan)
            columns.append((level - past) / scale)
        valid = np.isfinite(y)
        sums = np.concatenate(([0.0], np.cumsum(np.where(valid, y, 0.0))))
        counts = np.concatenate(([0], np.cumsum(valid)))
        for window_s in config.means_s:
            k = config.steps(window_s)
            start = np.maximum(rows + 1 - k, 0)
            count = counts[rows + 1] - counts[start]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = (sums[rows + 1] - sums[start]) / count
            # A window needs half of its steps with good values to count.
            mean = np.where(count >= max(k // 2, 1), mean, np.nan)
            columns.append((mean - level) / scale)
        t = t0_utc_s + rows * config.step_s
        angle = 2.0 * np.pi * (t % 86400.0) / 86400.0
        columns.append(np.sin(angle))
        columns.append(np.cos(angle))
        return np.stack(columns, axis=1)

    def _latest_features(self, y: np.ndarray) -> np.ndarray:
        """Build the features of the last value of ``y``, as :meth:`_design` does for one row."""
        config = self.config
        scale = config.scale_kw
        level = y[-1]
        unit = min(max(level / scale, 0.0), 1.0) if math.isfinite(level) else math.nan
        features = list(np.maximum(1.0 - np.abs(unit - _HAT_KNOTS) / _HAT_WIDTH, 0.0))
        for lag_s in config.lags_s:
            k = config.steps(lag_s)
            features.append((level - y[-1 - k]) / scale if y.size > k else math.nan)
        for window_s in config.means_s:
            k = config.steps(window_s)
            window = y[-k:]
            valid = np.isfinite(window)
            count = int(valid.sum())
            if count >= max(k // 2, 1):
                features.append((float(window[valid].mean()) - level) / scale)
            else:
                features.append(math.nan)
        angle = 2.0 * math.pi * (self.last_t_utc_s % 86400.0) / 86400.0
        features.append(math.sin(angle))
        features.append(math.cos(angle))
        return np.array(features)

    def fit(self) -> bool:
        """Fit every horizon's quantile models on the stored history; return False if too short.

        A failed fit keeps the previous weights, if any.
        """
        config = self.config
        y, hints = self._history()
        t0 = self._t_first + (self._count - y.size) * config.step_s
        stride = max(config.steps(config.fit_stride_s), 1)
        rows = np.arange(y.size - 1, -1, -stride)[::-1]
        base = self._design(y, rows, t0)
        # Levels the history barely visits leave their column's weight to chance: a week of
        # strong wind tells the model nothing about the first hour after a calm. So those
        # columns are left out of the fit, and predict() falls back to persistence there.
        hats = np.nan_to_num(base[:, : _HAT_KNOTS.size])
        support = hats.sum(axis=0)
        level_known = support >= max(_MIN_LEVEL_ROWS, _MIN_LEVEL_SHARE * rows.size)
        base[:, : _HAT_KNOTS.size] *= level_known[None, :]
        weights = []
        rejected = []
        for index, k in enumerate(self._horizon_steps):
            usable = rows[rows + k < y.size]
            x = base[: usable.size]
            if config.use_hints:
                x = np.column_stack([x, hints[usable, :, index] / config.scale_kw])
            target = (y[np.minimum(usable + k, y.size - 1)] - y[usable]) / config.scale_kw
            good = np.all(np.isfinite(x), axis=1) & np.isfinite(target)
            if good.sum() < 10 * x.shape[1]:
                if not self._fit_failing:
                    log.warning(
                        "forecast_fit_skipped",
                        forecast=config.name,
                        horizon_s=config.horizons_s[index],
                        rows=int(good.sum()),
                        needed=10 * x.shape[1],
                        reason="too few steps with complete features",
                    )
                self._fit_failing = True
                return False
            beats, horizon_weights = self._fit_horizon(x[good], target[good])
            weights.append(horizon_weights)
            if not beats:
                rejected.append(config.horizons_s[index])
        if self._weights is None or self._fit_failing:
            log.info("forecast_fitted", forecast=config.name, history_steps=int(y.size))
        if tuple(rejected) != self._rejected_horizons_s:
            if rejected:
                log.info(
                    "forecast_model_rejected",
                    forecast=config.name,
                    persistence_horizons_s=rejected,
                    reason="the fitted median did not beat persistence on the held-out history",
                )
            else:
                log.info("forecast_model_accepted", forecast=config.name)
            self._rejected_horizons_s = tuple(rejected)
        self._weights = np.stack(weights)
        self._level_known = level_known
        self._fit_failing = False
        return True

    def _fit_horizon(self, x: np.ndarray, target: np.ndarray) -> tuple[bool, np.ndarray]:
        """Fit one horizon's quantile weights; return whether the model beat persistence.

        The median is first fitted without the most recent ``validation_fraction``
        of the rows and scored on them. If its mean absolute error there is not
        below persistence's, a short or unusual history has misled it (a week
        with one big wind ramp, for example). The horizon then falls back to
        persistence: its weights only add the history's quantiles of the
        change, through the level columns, which sum to one.
        """
        quantiles = self.config.quantiles
        split = round(x.shape[0] * (1.0 - self.config.validation_fraction))
        trial = fit_quantile(x[:split], target[:split], 0.5)
        model_error = float(np.mean(np.abs(target[split:] - x[split:] @ trial)))
        persistence_error = float(np.mean(np.abs(target[split:])))
        if model_error < persistence_error:
            return True, np.stack([fit_quantile(x, target, q) for q in quantiles], axis=1)
        weights = np.zeros((x.shape[1], len(quantiles)))
        weights[: _HAT_KNOTS.size] = np.quantile(target, quantiles)[None, :]
        return False, weights

    def predict(self) -> Forecast:
        """Forecast from the last recorded value.

        The forecast is persistence (plus hinted starts minus stops) while the
        model is unfitted, across gaps, and at a level the fitted history
        barely visited.
        """
        config = self.config
        if self._count == 0:
            raise ValueError(f"forecast {config.name!r} has no history yet; call update() first")
        start = max(self._count - self._reach, 0)
        y = self._y[start : self._count]
        last = y[-1]
        hint_row = self._hint[self._count - 1]
        features = self._latest_features(y)
        method = "persistence"
        level_known = not np.any(features[: _HAT_KNOTS.size][~self._level_known] > 0)
        if self._weights is not None and np.all(np.isfinite(features)) and level_known:
            values = np.empty((len(config.quantiles), len(config.horizons_s)))
            for index in range(len(config.horizons_s)):
                x = features
                if config.use_hints:
                    x = np.append(features, hint_row[:, index] / config.scale_kw)
                values[:, index] = last + config.scale_kw * (x @ self._weights[index])
            method = "regression"
        else:
            values = self._fallback(last, hint_row)
        values = np.sort(np.clip(values, config.lower_kw, config.upper_kw), axis=0)
        return Forecast(
            self.last_t_utc_s, config.horizons_s, config.quantiles, values, float(last), method
        )

    def _fallback(self, last: float, hint_row: np.ndarray) -> np.ndarray:
        config = self.config
        if not math.isfinite(last):
            # NOTE: without a good last value the forecast is the mean of the kept history
            # (or mid-range when there is none), and its spread is the whole range.
            y, _ = self._history()
            good = y[np.isfinite(y)]
            last = float(good.mean()) if good.size else config.scale_kw / 2.0
            spread = np.full(len(config.horizons_s), config.scale_kw)
        else:
            hours = np.asarray(config.horizons_s) / 3600.0
            spread = config.cold_spread_fraction * config.scale_kw * np.sqrt(hours)
        centre = last + np.nan_to_num(hint_row[0] - hint_row[1])
        # Outer quantiles sit at +-spread, scaled by how far each is from the median.
        offsets = np.array([(q - 0.5) / 0.4 for q in config.quantiles])
        return centre[None, :] + offsets[:, None] * spread[None, :]


def forecast_skill(
    actual_kw: np.ndarray, forecast_kw: np.ndarray, persistence_kw: np.ndarray
) -> dict[str, float]:
    """Compare a forecast with persistence on the same targets by mean absolute error.

    Entries where any of the three is NaN are left out. ``ratio`` below 1 means
    the forecast beats persistence; ``skill`` is ``1 - ratio``.
    """
    actual = np.asarray(actual_kw, dtype=float)
    model = np.asarray(forecast_kw, dtype=float)
    baseline = np.asarray(persistence_kw, dtype=float)
    good = np.isfinite(actual) & np.isfinite(model) & np.isfinite(baseline)
    if not good.any():
        raise ValueError("no target where the forecast, persistence and the actual are all known")
    mae_model = float(np.mean(np.abs(model[good] - actual[good])))
    mae_persistence = float(np.mean(np.abs(baseline[good] - actual[good])))
    ratio = mae_model / mae_persistence if mae_persistence > 0 else math.inf
    return {
        "mae_model_kw": mae_model,
        "mae_persistence_kw": mae_persistence,
        "ratio": ratio,
        "skill": 1.0 - ratio,
        "count": int(good.sum()),
    }

