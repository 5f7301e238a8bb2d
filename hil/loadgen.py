"""Seeded generator of GPU training power per rack, at 1 kHz or any other rate.

Synchronous data-parallel training repeats one iteration after another: the
GPUs compute at full power, then wait on the all-reduce of gradients at a
fraction of it. A rack's power therefore swings between a trough and its
peak once per iteration, with edges as fast as the GPUs' power management.
On top of that, a job has start and stop ramps and stops for checkpoints.
Racks in one job follow the same iteration clock, shifted by a fixed lag
each, so they are partly out of step.

Where each default comes from (data READMEs are in ``hil/data``):

==========================  ===========  ==================================================
parameter                   default      source
==========================  ===========  ==================================================
``idle_fraction``           0.33         measured: 8-GPU H100 server after its run, 2.37-2.42 kW
                                         against a 7.2-7.35 kW training plateau (gpu trace)
``checkpoint_fraction``     0.39         measured: the training trace's long dips sit at
                                         2.80-2.92 kW against the 7.3 kW plateau
``checkpoint_length_s``     8.0          measured: the two long dips in the training trace
                                         last about 8 s and 12 s
``job_ramp_s``              3.0          measured: the training trace rises from 3.1 to
                                         7.0 kW within 4 s at its start and falls to 3.1 kW
                                         within 4 s at its end. The H200 inference trace
                                         steps from 2.7 to 5.8 kW within 2 s
``iteration_period_s``      1.5          assumption: Llama-class training steps take about
                                         a second or more; the 2-s trace cannot resolve it
``swing_low_fraction``      0.35         assumption: GPUs waiting on communication draw a
                                         third or so of their compute power; it lies in the
                                         20-40 % band that the rig must cover
``compute_fraction``        0.7          assumption: share of an iteration spent computing
``edge_s``                  0.04         assumption: GPU power management follows load
                                         within tens of ms; a raised-cosine edge of 40 ms
                                         has a 10-90 % rise time of 24 ms
``period_jitter``           0.02         assumption: iteration times vary by a few percent
``checkpoint_every_s``      300.0        assumption: the measured run has its two long dips
                                         740 s apart; 300 s puts one or two in a 10-minute
                                         run
``desync``                  0.1          assumption: racks of one job start each iteration
                                         within a tenth of a period of each other
==========================  ===========  ==================================================

All numbers marked "assumption" are plausible values for sizing tests, not
measurements. A scenario overrides any of them. The measured trace does not
say what its two long dips are. They are its only multi-second stalls, so
they stand in for checkpoints here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TrainingLoadParams:
    """Shape of GPU training load; powers are fractions of a rack's peak power."""

    iteration_period_s: float = 1.5
    #: Relative standard deviation of each iteration's length.
    period_jitter: float = 0.02
    #: Trough of an iteration swing as a fraction of the iteration's peak.
    swing_low_fraction: float = 0.35
    #: Share of each iteration at the peak (computing) rather than the trough.
    compute_fraction: float = 0.7
    #: Full duration of each raised-cosine edge; the 10-90 % rise time is 0.59 of it.
    edge_s: float = 0.04
    #: Spread of iteration phase between racks: 0 is lock-step, 1 spreads each rack's
    #: lag uniformly over a whole period. Racks of one job still share iteration lengths.
    desync: float = 0.1
    checkpoint_every_s: float = 300.0
    checkpoint_length_s: float = 8.0
    checkpoint_fraction: float = 0.39
    #: Edge duration into and out of a checkpoint dip.
    checkpoint_edge_s: float = 1.0
    idle_fraction: float = 0.33
    #: Duration of the job start and stop ramps.
    job_ramp_s: float = 3.0
    #: Job start in run time; before it the racks idle.
    job_start_s: float = 0.0
    #: Job stop in run time; None runs to the end.
    job_stop_s: float | None = None
    #: Independent jobs; racks are dealt to jobs in turn (rack r runs job r mod jobs).
    jobs: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.iteration_period_s <= 0:
            problems.append(f"iteration_period_s={self.iteration_period_s} must be > 0")
        if not 0 <= self.period_jitter < 0.5:
            problems.append(f"period_jitter={self.period_jitter} must be in [0, 0.5)")
        for name in ("swing_low_fraction", "checkpoint_fraction", "idle_fraction", "desync"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                problems.append(f"{name}={value} must be in [0, 1]")
        if not 0 < self.compute_fraction < 1:
            problems.append(f"compute_fraction={self.compute_fraction} must be in (0, 1)")
        shorter_part_s = self.iteration_period_s * min(
            self.compute_fraction, 1 - self.compute_fraction
        )
        if not 0 <= self.edge_s <= 0.5 * shorter_part_s:
            problems.append(
                f"edge_s={self.edge_s} must be >= 0 and at most half the shorter of the compute "
                f"and trough parts of an iteration ({shorter_part_s:.3f} s)"
            )
        if self.checkpoint_length_s < 0 or self.checkpoint_every_s <= (
            self.checkpoint_length_s + self.checkpoint_edge_s
        ):
            problems.append(
                f"checkpoint_every_s={self.checkpoint_every_s} must exceed checkpoint_length_s="
                f"{self.checkpoint_length_s} plus checkpoint_edge_s={self.checkpoint_edge_s}, "
                "and the length must be >= 0"
            )
        if self.checkpoint_edge_s < 0 or self.job_ramp_s < 0:
            problems.append("checkpoint_edge_s and job_ramp_s must be >= 0")
        if self.job_stop_s is not None and self.job_stop_s <= self.job_start_s:
            problems.append(
                f"job_stop_s={self.job_stop_s} must be after job_start_s={self.job_start_s}"
            )
        if self.jobs < 1:
            problems.append(f"jobs={self.jobs} must be >= 1")
        if problems:
            raise ValueError("invalid training load parameters: " + "; ".join(problems))

    @property
    def swing_mean_fraction(self) -> float:
        """Return the time-average of the iteration waveform, as a fraction of its peak.

        Raised-cosine edges are symmetric, so each edge averages to the
        midpoint of its levels and the mean is that of a square wave.
        """
        low = self.swing_low_fraction
        return self.compute_fraction + (1 - self.compute_fraction) * low


def raised_cosine_step(x: np.ndarray) -> np.ndarray:
    """Map ``x`` to a smooth 0-to-1 step: 0 below 0, 1 above 1, half a cosine between."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(x, 0.0, 1.0))


def _pulse(t: np.ndarray, start: np.ndarray, stop: np.ndarray, edge_s: float) -> np.ndarray:
    """Return a 0-1 pulse that rises over ``edge_s`` from ``start`` and falls from ``stop``."""
    if edge_s == 0:
        return ((t >= start) & (t < stop)).astype(float)
    return raised_cosine_step((t - start) / edge_s) - raised_cosine_step((t - stop) / edge_s)


@dataclass
class _Job:
    #: Start time of every iteration in run time, with one past the end.
    iteration_starts_s: np.ndarray
    checkpoint_starts_s: np.ndarray
    racks: list[int] = field(default_factory=list)


# Random stream ids of TrainingLoadGenerator, one per kind of draw.
_STREAM_JOB_SHAPE = 0
_STREAM_ITERATIONS = 1
_STREAM_RACK_LAGS = 2


class TrainingLoadGenerator:
    """Per-rack training power for one run, deterministic for a seed.

    Every random draw (iteration lengths, rack lags, checkpoint phases)
    happens in the constructor for the whole run, so :meth:`power_kw` returns
    the same values for the same times whether called once or in chunks.
    Each kind of draw has its own random stream derived from ``seed``, so a
    shorter run with the same seed is an exact prefix of a longer one.
    Before ``job_start_s`` and beyond ``duration_s`` the iteration clock is
    still defined, so asking past the run's end is safe.
    """

    def __init__(
        self,
        params: TrainingLoadParams,
        racks: int,
        peak_kw: float,
        duration_s: float,
        seed: int = 0,
    ) -> None:
        if racks < 1 or peak_kw <= 0 or duration_s <= 0:
            raise ValueError(
                f"invalid generator: racks={racks}, peak_kw={peak_kw}, duration_s={duration_s}; "
                "all must be positive"
            )
        self.params = params
        self.racks = racks
        self.peak_kw = float(peak_kw)
        self.duration_s = float(duration_s)
        # One stream per kind of draw and job: the number of iterations drawn
        # grows with duration_s, and with a shared stream that would shift every
        # later draw, so a shortened run would see different racks and checkpoints.
        def stream(kind: int, job: int = 0) -> np.random.Generator:
            return np.random.default_rng([seed, kind, job])

        period = params.iteration_period_s
        # The iteration clock covers one period before 0 and two after the run, so that
        # lagged racks and queries just past the end still find their iteration.
        span_s = duration_s + 3 * period
        self._jobs: list[_Job] = []
        for job_index in range(params.jobs):
            shape = stream(_STREAM_JOB_SHAPE, job_index)
            job_period = period if job_index == 0 else period * shape.uniform(0.85, 1.15)
            first_start_s = shape.uniform(0, job_period)
            checkpoint_phase = shape.uniform(0.2, 1.0) * params.checkpoint_every_s
            count = int(np.ceil(span_s / (job_period * (1 - 3 * params.period_jitter)))) + 2
            jitter = stream(_STREAM_ITERATIONS, job_index).standard_normal(count)
            lengths = job_period * (1 + params.period_jitter * jitter)
            lengths = np.maximum(lengths, job_period * 0.5)
            starts = -period + first_start_s + np.concatenate(([0.0], np.cumsum(lengths)))
            checkpoints = np.arange(
                checkpoint_phase, duration_s + period, params.checkpoint_every_s
            )
            self._jobs.append(_Job(starts, checkpoints))
        for rack in range(racks):
            self._jobs[rack % params.jobs].racks.append(rack)
        #: Each rack's lag behind its job's iteration clock, in seconds.
        self.rack_lag_s = (
            params.desync * stream(_STREAM_RACK_LAGS).uniform(0.0, 1.0, racks) * period
        )

    def _swing(self, job: _Job, t: np.ndarray) -> np.ndarray:
        """Return the iteration waveform in [low, 1] of one job at times ``t`` (any shape)."""
        p = self.params
        starts = job.iteration_starts_s
        k = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, starts.size - 2)
        begin = starts[k]
        compute_end = begin + p.compute_fraction * (starts[k + 1] - begin)
        high = _pulse(t, begin, compute_end, p.edge_s)
        # Both edges of an iteration's compute pulse lie inside that iteration, because
        # edge_s is checked to fit, so the pulse of the current iteration alone gives the level.
        return p.swing_low_fraction + (1.0 - p.swing_low_fraction) * high

    def _job_level(self, job: _Job, t: np.ndarray, swing: np.ndarray) -> np.ndarray:
        """Combine the swing with checkpoint dips and the job's start and stop ramps."""
        p = self.params
        # Checkpoints never overlap (checked in the parameters), so only the latest one
        # that started by ``t`` can be active.
        starts = job.checkpoint_starts_s
        if starts.size:
            latest = starts[np.clip(np.searchsorted(starts, t, side="right") - 1, 0, None)]
            in_checkpoint = _pulse(t, latest, latest + p.checkpoint_length_s, p.checkpoint_edge_s)
        else:
            in_checkpoint = np.zeros_like(t)
        running = swing * (1.0 - in_checkpoint) + p.checkpoint_fraction * in_checkpoint
        if p.job_ramp_s > 0:
            active = raised_cosine_step((t - p.job_start_s) / p.job_ramp_s)
            if p.job_stop_s is not None:
                active = active * (1.0 - raised_cosine_step((t - p.job_stop_s) / p.job_ramp_s))
        else:
            active = (t >= p.job_start_s).astype(float)
            if p.job_stop_s is not None:
                active = active * (t < p.job_stop_s)
        return p.idle_fraction + active * (running - p.idle_fraction)

    def swing_kw(self, t_s: np.ndarray | float) -> np.ndarray:
        """Return each rack's iteration waveform alone, shape (racks, len(t_s)), in [low, 1]."""
        t = np.atleast_1d(np.asarray(t_s, dtype=float))
        out = np.empty((self.racks, t.size))
        for job in self._jobs:
            for rack in job.racks:
                out[rack] = self._swing(job, t - self.rack_lag_s[rack])
        return out

    def power_kw(
        self, t_s: np.ndarray | float, envelope_kw: np.ndarray | None = None
    ) -> np.ndarray:
        """Return each rack's power in kW, shape (racks, len(t_s)), at run times ``t_s``.

        Without ``envelope_kw`` the generator's own job model applies: idle,
        start ramp, iteration swings peaking at ``peak_kw``, checkpoint dips,
        stop ramp.

        With ``envelope_kw`` (shape (racks, len(t_s)), for example from
        :class:`hil.traces.RackEnvelope`) that measured shape replaces the job
        model and the generator adds only the iteration swings. A measured
        reading averages over whole iterations, so the swing is scaled to
        keep it as the mean: the swing's peaks reach envelope /
        ``swing_mean_fraction`` and its troughs ``swing_low_fraction`` of
        that. The swing fades out as the envelope falls towards
        ``idle_fraction`` of ``peak_kw``, because an idle or checkpointing
        server does not iterate.
        """
        t = np.atleast_1d(np.asarray(t_s, dtype=float))
        swing = self.swing_kw(t)
        p = self.params
        if envelope_kw is None:
            out = np.empty_like(swing)
            for job in self._jobs:
                for rack in job.racks:
                    out[rack] = self._job_level(job, t - self.rack_lag_s[rack], swing[rack])
            return self.peak_kw * out

        envelope = np.asarray(envelope_kw, dtype=float)
        if envelope.shape != swing.shape:
            raise ValueError(
                f"envelope_kw has shape {envelope.shape}, expected {swing.shape} (racks, samples)"
            )
        relative = envelope / self.peak_kw
        activity = np.clip(
            (relative - p.idle_fraction) / max(1.0 - p.idle_fraction, 1e-9), 0.0, 1.0
        )
        modulation = swing / p.swing_mean_fraction
        return envelope * (1.0 + activity * (modulation - 1.0))
