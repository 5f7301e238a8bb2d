"""Periodic feed-forward: predict the site load a short lead ahead from its last period.

Why: a meter that averages over 100 ms and updates every 100 ms, plus the
PCS's dead time and time constant, delays the battery's response by 100-300
ms. A law that only reacts to the measured load cancels little of a swing
whose period is 1-2 s. GPU training swings repeat at the iteration period,
so the load one period ago, shifted by the lead, predicts the load that
the battery must meet when its command takes effect::

    predicted(t) = measured(t + lead_s - period_s)      (needs lead_s < period_s)

Checkpoints, job starts and stops are not periodic, so the prediction is
blended with the measured load by a gain in [0, 1]:

- ``periodicity``: how well the newest period of the measured load repeats
  the one before it, at the period that the autocorrelation of the last
  ``window_s`` names; re-estimated every ``estimate_every_s``. The gain
  rises from 0 at ``gate_low`` to 1 at ``gate_high``. Until the window is
  full (the first ``window_s`` after a start or a reset) the estimate uses
  the history there is, searching periods up to half its length, and runs
  every ``warmup_estimate_every_s``: a 1.5 s period is found about 3 s after
  the start instead of 8 s.
- ``agreement``: how well the last period matched the current one over
  the last ``error_window_s``; a checkpoint dip or a job stop breaks it
  within a fraction of a second, long before the autocorrelation notices.

The output ``load_kw = measured + gain * (predicted - measured)`` is what
the daemon's input cycle writes as the fast loop's load input. The fast
loop's low-pass target and its limits are unchanged, and the C kernel and
the numpy reference see the same input, so they stay equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: A shorter lag wins over the best one when its correlation is at most this much lower.
PEAK_TOLERANCE = 0.05


@dataclass(frozen=True)
class PredictorParams:
    """Timing of the predictor; all times in seconds."""

    #: Spacing of the history samples; the daemon's input cycle.
    sample_period_s: float = 0.01
    #: How far ahead to predict: meter delay (window/2 + update/2) plus PCS dead time and time
    #: constant plus the command path.
    lead_s: float = 0.15
    #: Length of the history that the period is estimated on.
    window_s: float = 8.0
    min_period_s: float = 0.4
    max_period_s: float = 4.0
    estimate_every_s: float = 1.0
    #: Estimate spacing while the window is still filling.
    warmup_estimate_every_s: float = 0.25
    gate_low: float = 0.6
    gate_high: float = 0.85
    #: Span over which the last period must match the current one.
    error_window_s: float = 0.5
    #: Relative mismatch (mean abs difference / mean abs deviation) at which agreement is 0.
    max_relative_error: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not self.sample_period_s > 0:
            problems.append(f"sample_period_s={self.sample_period_s} must be > 0")
        if not 0 <= self.lead_s < self.min_period_s:
            problems.append(
                f"lead_s={self.lead_s} must be >= 0 and below min_period_s={self.min_period_s}"
            )
        if not 0 < self.min_period_s < self.max_period_s:
            problems.append("min_period_s must be > 0 and below max_period_s")
        if not self.window_s >= 2 * self.max_period_s:
            problems.append(
                f"window_s={self.window_s} must be at least twice max_period_s={self.max_period_s}"
            )
        if not 0 <= self.gate_low < self.gate_high <= 1:
            problems.append("need 0 <= gate_low < gate_high <= 1")
        if not 0 < self.warmup_estimate_every_s <= self.estimate_every_s:
            problems.append(
                f"warmup_estimate_every_s={self.warmup_estimate_every_s} must be > 0 and at most"
                f" estimate_every_s={self.estimate_every_s}"
            )
        if not (self.error_window_s > 0 and self.max_relative_error > 0):
            problems.append("error_window_s and max_relative_error must be > 0")
        if problems:
            raise ValueError("invalid predictor parameters: " + "; ".join(problems))


class PeriodicPredictor:
    """Feed-forward of the site load for one fast loop; call :meth:`update` every sample period.

    Not thread-safe: the daemon's input cycle owns it. Memory is a fixed ring
    of ``window_s / sample_period_s`` floats.
    """

    def __init__(self, params: PredictorParams | None = None) -> None:
        self.params = params or PredictorParams()
        p = self.params
        self._size = math.ceil(p.window_s / p.sample_period_s)
        self._ring = np.zeros(self._size)
        self._count = 0
        self._since_estimate = 0
        self._estimate_every = max(round(p.estimate_every_s / p.sample_period_s), 1)
        self._warmup_estimate_every = max(round(p.warmup_estimate_every_s / p.sample_period_s), 1)
        self._min_lag = max(round(p.min_period_s / p.sample_period_s), 2)
        self._error_samples = max(round(p.error_window_s / p.sample_period_s), 1)
        #: Estimated iteration period in seconds; None until the history is long enough.
        self.period_s: float | None = None
        #: How well the newest period repeats the one before it, in [-1, 1].
        self.periodicity = 0.0
        #: Last blend gain in [0, 1] and its two factors.
        self.gain = 0.0
        self.agreement = 0.0

    def reset(self) -> None:
        """Forget the history, for example after the load measurement went stale."""
        self._count = 0
        self._since_estimate = 0
        self.period_s = None
        self.periodicity = 0.0
        self.gain = 0.0
        self.agreement = 0.0

    def _history(self, samples: int) -> np.ndarray:
        """Return the last ``samples`` values, oldest first."""
        end = self._count % self._size
        index = (np.arange(end - samples, end)) % self._size
        return self._ring[index]

    def _at(self, samples_ago: float) -> float:
        """Return the history ``samples_ago`` samples back, interpolated linearly."""
        back = min(max(samples_ago, 0.0), min(self._count, self._size) - 1.0)
        lower = math.floor(back)
        frac = back - lower
        newest = self._count - 1
        a = self._ring[(newest - lower) % self._size]
        b = self._ring[(newest - lower - 1) % self._size] if frac > 0 else a
        return float(a + frac * (b - a))

    @staticmethod
    def _period_match(x: np.ndarray, lag: int) -> float:
        """Return how well the newest period of ``x`` repeats the one before it, in [-1, 1].

        1 - |a - b|^2 / (|a - m|^2 + |b - m|^2) for the newest ``lag`` samples a, the
        ``lag`` samples before them b, and m the mean of both: 1 only when they are equal,
        lower for a different shape or amplitude. Only the last two periods count, so a
        flat stretch further back (a start, a checkpoint) does not hold the gain shut.
        """
        a = x[-lag:]
        b = x[-2 * lag : -lag]
        mean = 0.5 * (a.mean() + b.mean())
        spread = float(np.sum((a - mean) ** 2) + np.sum((b - mean) ** 2))
        if spread <= 0:
            return 0.0
        return 1.0 - float(np.sum((a - b) ** 2)) / spread

    def _estimate_period(self) -> None:
        p = self.params
        x = self._history(min(self._count, self._size))
        x = x - x.mean()
        n = x.size
        spectrum = np.fft.rfft(x, 2 * n)
        corr = np.fft.irfft(spectrum * np.conj(spectrum))[:n]
        # Unbiased: each lag has n - lag overlapping samples.
        corr = corr / np.arange(n, 0, -1)
        if corr[0] <= 0:
            self.period_s, self.periodicity = None, 0.0
            return
        lo = self._min_lag
        # At least one whole period of overlap behind every lag searched.
        hi = min(round(p.max_period_s / p.sample_period_s), n // 2)
        if hi <= lo:
            self.period_s, self.periodicity = None, 0.0
            return
        searched = corr[lo : hi + 1] / corr[0]
        # Every multiple of the period correlates about as well as the period itself, so
        # take the shortest lag whose peak comes within PEAK_TOLERANCE of the best one.
        best = float(searched.max())
        peaks = np.flatnonzero(
            (searched[1:-1] >= searched[:-2])
            & (searched[1:-1] >= searched[2:])
            & (searched[1:-1] >= best - PEAK_TOLERANCE)
        )
        if peaks.size == 0:
            # The best lag is at an end of the range, so no period lies inside it yet.
            self.period_s, self.periodicity = None, 0.0
            return
        lag = lo + int(peaks[0]) + 1
        self.periodicity = self._period_match(x, lag)
        # Refine on the longest multiple of the period in the window. The peak is located to a
        # fraction of a sample there too, and dividing by the multiple shrinks that error.
        multiple = max((hi - 1) // lag, 1)
        around = multiple * lag
        if multiple > 1:
            around += int(np.argmax(corr[around - 2 : around + 3])) - 2
        left, centre, right = corr[around - 1], corr[around], corr[around + 1]
        curvature = left - 2 * centre + right
        shift = 0.5 * (left - right) / curvature if curvature < 0 else 0.0
        shift = min(max(shift, -0.5), 0.5)
        self.period_s = (around + shift) / multiple * p.sample_period_s

    def update(self, measured_kw: float) -> float:
        """Add the latest measured load and return the load input for the fast loop, in kW.

        A non-finite ``measured_kw`` resets the predictor and is returned as
        it is, so the fast loop's validity check rejects it.
        """
        if not math.isfinite(measured_kw):
            self.reset()
            return measured_kw
        p = self.params
        self._ring[self._count % self._size] = measured_kw
        self._count += 1
        self._since_estimate += 1
        if self._count < 2 * self._min_lag + 2:
            self.gain = 0.0
            return measured_kw
        every = self._estimate_every if self._count >= self._size else self._warmup_estimate_every
        if self._since_estimate >= every:
            self._since_estimate = 0
            self._estimate_period()
        if self.period_s is None:
            self.gain = 0.0
            return measured_kw

        period_samples = self.period_s / p.sample_period_s
        if self._count < self._error_samples + period_samples + 2:
            # Not yet a whole period behind the agreement window.
            self.gain = 0.0
            return measured_kw
        recent = self._history(self._error_samples + round(period_samples) + 1)
        now_part = recent[-self._error_samples :]
        lagged = np.array(
            [self._at(k + period_samples) for k in range(self._error_samples - 1, -1, -1)]
        )
        deviation = float(np.mean(np.abs(now_part - np.mean(recent))))
        mismatch = float(np.mean(np.abs(now_part - lagged)))
        relative = mismatch / deviation if deviation > 0 else math.inf
        self.agreement = float(np.clip(1.0 - relative / p.max_relative_error, 0.0, 1.0))
        periodic = float(
            np.clip((self.periodicity - p.gate_low) / (p.gate_high - p.gate_low), 0.0, 1.0)
        )
        self.gain = periodic * self.agreement
        lead_samples = p.lead_s / p.sample_period_s
        predicted = self._at(period_samples - lead_samples)
        return measured_kw + self.gain * (predicted - measured_kw)
