"""A job-scheduled GPU training cluster over days: jobs, scheduler hints and the cluster's power.

The rack traces in :mod:`hil.traces` cover minutes; planning needs days in
which jobs start and stop. This module draws a seeded job stream, schedules
it on the cluster's nodes first come first served with backfill, and renders
the cluster's power from the measured 8-GPU training trace.

Per node, power is the idle draw plus, while a job runs, the job's share of
the measured trace above idle: the trace's ``init`` readings first, then its
``train``/``eval`` readings repeated. The trace is scaled so that its largest
reading is the node's peak times the job's power factor. Each job starts the
loop at its own random phase, so checkpoint dips do not line up across jobs.

Model numbers and where they come from:

* Idle draw 0.33 of peak: the measured node draws 2.37 to 2.78 kW after the
  run against a 7,355 W maximum in training (hil/data/gpu/README.md).
* Job sizes, durations, arrival rate and its day/week pattern, the power
  factor range and the hint errors are assumptions. They are chosen to look
  like a shared training cluster: many small jobs, a few large ones, and more
  submissions in working hours than at night or at weekends. Two kinds of
  job: long training runs split into fixed wall-time chunks that checkpoint
  and stop a few minutes before their limit, and other jobs with log-normal
  run times whose users ask for 1.2 to 3 times the time they use. Large
  jobs (16 nodes and more by default) are booked ahead as reservations, and
  some smaller ones are submitted ahead with a begin time.

What the scheduler's hints know (:func:`hint_events`): every pending job is
announced when it is submitted, with the node count, its estimated start
and its wall-time end. The estimated start comes from the scheduler's plan,
which assumes that running jobs use their whole wall time, so it is late by
up to 30 % of the wait, plus a few minutes of noise. The prolog sends the
real start with the wall-time end, and the epilog sends the real end. A
job that starts at once gives no warning before its prolog.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from hil.traces import GpuTrace, load_h100_training

#: Idle node power as a fraction of its peak (measured node: about 2.4 kW idle, 7.355 kW peak).
IDLE_FRACTION = 0.33


@dataclass(frozen=True)
class ClusterSpec:
    """Cluster size and the statistics of its job stream. Times in seconds, powers in kW."""

    nodes: int
    node_peak_kw: float
    #: Mean job arrivals per hour, before the day and week pattern.
    arrivals_per_hour: float = 3.5
    #: Arrival rate at night (00-06 h UTC) and at weekends, relative to working hours.
    night_factor: float = 0.5
    weekend_factor: float = 0.6
    #: Job sizes in nodes and their relative weights.
    sizes_nodes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    size_weights: tuple[float, ...] = (0.25, 0.2, 0.2, 0.17, 0.12, 0.06)
    #: Log-normal run time: median and sigma of the natural log, clipped to [min, max].
    median_run_s: float = 2 * 3600.0
    run_sigma: float = 1.0
    min_run_s: float = 600.0
    max_run_s: float = 48 * 3600.0
    #: Requested wall time = run time times a factor drawn from this range, rounded up to 30 min.
    walltime_factor: tuple[float, float] = (1.2, 3.0)
    #: Share of jobs that are wall-time chunks of a long training run, and the chunk lengths.
    chunked_fraction: float = 0.5
    chunk_hours: tuple[float, ...] = (2.0, 4.0, 8.0, 12.0)
    #: A chunk stops this long (at most) before its wall time, after its last checkpoint.
    chunk_stop_early_max_s: float = 600.0
    #: Jobs of at least this many nodes are booked ahead, as a reservation.
    reserved_min_nodes: int = 16
    #: Share of smaller jobs submitted ahead with a begin time, and how far ahead (seconds).
    scheduled_fraction: float = 0.2
    scheduled_lead_s: tuple[float, float] = (1800.0, 6 * 3600.0)
    #: Job plateau power as a fraction of node peak, drawn per job from this range.
    power_factor: tuple[float, float] = (0.75, 1.0)
    #: Share of jobs that the scheduler announces as a hint.
    hint_fraction: float = 0.9
    #: The estimated start is late by up to this fraction of the job's wait.
    hint_late_fraction: float = 0.3
    #: Standard deviation of the noise on the estimated start.
    hint_start_error_s: float = 180.0
    #: Node power the scheduler assumes for its hint, as a fraction of node peak.
    hint_node_fraction: float = 0.95

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.node_peak_kw <= 0 or self.arrivals_per_hour <= 0:
            raise ValueError(
                f"invalid cluster: nodes={self.nodes}, node_peak_kw={self.node_peak_kw}, "
                f"arrivals_per_hour={self.arrivals_per_hour}; all must be > 0"
            )
        if len(self.sizes_nodes) != len(self.size_weights) or not self.sizes_nodes:
            raise ValueError(
                f"sizes_nodes {self.sizes_nodes} and size_weights {self.size_weights} "
                "must be non-empty and of the same length"
            )
        if max(self.sizes_nodes) > self.nodes or min(self.sizes_nodes) < 1:
            raise ValueError(
                f"job sizes {self.sizes_nodes} must be between 1 and the cluster's "
                f"{self.nodes} nodes"
            )
        if not 0 <= self.hint_fraction <= 1:
            raise ValueError(f"hint_fraction={self.hint_fraction} must be in [0, 1]")


@dataclass(frozen=True)
class Job:
    """One job as it ran, and the hint the scheduler handed over for it (if any)."""

    job_id: str
    submit_s: float
    start_s: float
    end_s: float
    nodes: int
    #: Plateau power as a fraction of node peak.
    power_factor: float
    #: Offset into the repeated training segment at which the job starts, in seconds.
    phase_s: float
    #: Requested wall time.
    walltime_s: float
    #: When the scheduler first announced the job; NaN when the job has no hints.
    hint_at_s: float
    #: The scheduler's estimated start at that time.
    hint_start_s: float
    hint_kw: float

    @property
    def hinted(self) -> bool:
        return not math.isnan(self.hint_at_s)


def _arrival_rate_per_s(spec: ClusterSpec, t_utc_s: float) -> float:
    hour = (t_utc_s % 86400.0) / 3600.0
    weekday = int((t_utc_s // 86400.0 + 3) % 7)  # 1970-01-01 was a Thursday (weekday 3)
    factor = spec.night_factor if hour < 6 else 1.0
    if weekday >= 5:
        factor *= spec.weekend_factor
    return spec.arrivals_per_hour * factor / 3600.0


def _draw_arrivals(
    spec: ClusterSpec, rng: np.random.Generator, t0_utc_s: float, duration_s: float
) -> list[float]:
    """Draw arrival times (run seconds) by thinning a Poisson process at the peak rate."""
    peak = spec.arrivals_per_hour / 3600.0
    times = []
    t = 0.0
    while True:
        t += rng.exponential(1.0 / peak)
        if t >= duration_s:
            return times
        if rng.random() < _arrival_rate_per_s(spec, t0_utc_s + t) / peak:
            times.append(t)


def generate_jobs(
    spec: ClusterSpec, seed: int, t0_utc_s: float, duration_s: float, training_period_s: float
) -> list[Job]:
    """Draw and schedule the jobs submitted in [0, ``duration_s``) run seconds.

    ``t0_utc_s`` is the UTC epoch time of run second 0, for the day and week
    pattern. Jobs still running at the end keep their true end time. The
    scheduler starts eligible jobs in submission order, and a job that does
    not fit may be overtaken by a smaller one that does (backfill).
    """
    # Separate streams for arrivals and job attributes, so that a shorter run draws the same
    # first jobs as a longer one with the same seed.
    arrivals = _draw_arrivals(spec, np.random.default_rng([seed, 0]), t0_utc_s, duration_s)
    rng = np.random.default_rng([seed, 1])
    weights = np.asarray(spec.size_weights, dtype=float)
    weights /= weights.sum()
    drawn = []
    for index, submit_s in enumerate(arrivals):
        nodes = int(rng.choice(spec.sizes_nodes, p=weights))
        if rng.random() < spec.chunked_fraction:
            walltime_s = float(rng.choice(spec.chunk_hours)) * 3600.0
            run_s = walltime_s - float(rng.uniform(0, spec.chunk_stop_early_max_s))
        else:
            run_s = float(
                np.clip(
                    spec.median_run_s * math.exp(spec.run_sigma * rng.standard_normal()),
                    spec.min_run_s,
                    spec.max_run_s,
                )
            )
            walltime_s = math.ceil(run_s * rng.uniform(*spec.walltime_factor) / 1800.0) * 1800.0
        begin_s = submit_s
        ahead = rng.random() < spec.scheduled_fraction
        if ahead or nodes >= spec.reserved_min_nodes:
            begin_s = submit_s + float(rng.uniform(*spec.scheduled_lead_s))
        drawn.append(
            {
                "job_id": f"job-{index:05d}",
                "submit_s": submit_s,
                "begin_s": begin_s,
                "nodes": nodes,
                "run_s": run_s,
                "walltime_s": walltime_s,
                "power_factor": float(rng.uniform(*spec.power_factor)),
                "phase_s": float(rng.uniform(0, training_period_s)),
                "hinted": bool(rng.random() < spec.hint_fraction),
                "late": float(rng.uniform(0, spec.hint_late_fraction)),
                "noise_s": float(rng.normal(0, spec.hint_start_error_s)),
            }
        )
    return [_to_job(spec, item, start) for item, start in _schedule(spec, drawn)]


def _schedule(spec: ClusterSpec, drawn: list[dict]) -> list[tuple[dict, float]]:
    """Start each job when it is eligible and its nodes are free; return (job, start) pairs."""
    free = spec.nodes
    queue: list[dict] = []
    # Events: (time, order, kind, payload); kind 0 = job end frees nodes, 1 = job becomes eligible.
    events: list[tuple[float, int, int, object]] = []
    for order, item in enumerate(drawn):
        heapq.heappush(events, (item["begin_s"], order, 1, item))
    order = len(drawn)
    started = []
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == 0:
            free += payload
        else:
            queue.append(payload)
        waiting = []
        for item in queue:
            if item["nodes"] <= free:
                free -= item["nodes"]
                heapq.heappush(events, (now + item["run_s"], order, 0, item["nodes"]))
                order += 1
                started.append((item, now))
            else:
                waiting.append(item)
        queue = waiting
    return started


def _to_job(spec: ClusterSpec, item: dict, start_s: float) -> Job:
    nan = math.nan
    hint_at = hint_start = hint_kw = nan
    if item["hinted"]:
        hint_at = item["submit_s"]
        wait_s = start_s - item["begin_s"]
        hint_start = max(start_s + item["late"] * wait_s + item["noise_s"], item["begin_s"])
        hint_kw = item["nodes"] * spec.node_peak_kw * spec.hint_node_fraction
    return Job(
        job_id=item["job_id"],
        submit_s=item["submit_s"],
        start_s=start_s,
        end_s=start_s + item["run_s"],
        nodes=item["nodes"],
        power_factor=item["power_factor"],
        phase_s=item["phase_s"],
        walltime_s=item["walltime_s"],
        hint_at_s=hint_at,
        hint_start_s=hint_start,
        hint_kw=hint_kw,
    )


def hint_events(jobs: list[Job], t0_utc_s: float) -> list[tuple[float, dict]]:
    """Return the scheduler's hints as (run second, hint) pairs in time order.

    Each hint is a mapping in the form :func:`gateway.forecast.hints.parse_hint`
    takes, with UTC times (``t0_utc_s`` is run second 0). A hinted job gives
    three: at submission with the estimated start, at its start (prolog) and
    at its end (epilog).
    """
    events = []
    for job in jobs:
        if not job.hinted:
            continue
        base = {"job_id": job.job_id, "nodes": job.nodes, "expected_kw": job.hint_kw}
        planned = {
            "start_utc": t0_utc_s + job.hint_start_s,
            "end_utc": t0_utc_s + job.hint_start_s + job.walltime_s,
        }
        started = {
            "start_utc": t0_utc_s + job.start_s,
            "end_utc": t0_utc_s + job.start_s + job.walltime_s,
        }
        ended = {"start_utc": t0_utc_s + job.start_s, "end_utc": t0_utc_s + job.end_s}
        if job.hint_at_s < job.start_s:
            events.append((job.hint_at_s, base | planned))
        events.append((job.start_s, base | started))
        events.append((job.end_s, base | ended))
    events.sort(key=lambda event: event[0])
    return events


class NodeShape:
    """Per-node power of a job over time, from the measured training trace, per unit of peak.

    ``above_idle(age_s, phase_s)`` returns the node's power above idle at
    ``age_s`` seconds into the job, as a fraction of the trace's maximum: the
    ``init`` readings first, then the ``train``/``eval`` readings repeated,
    entered at ``phase_s``.
    """

    def __init__(self, trace: GpuTrace) -> None:
        peak_w = float(np.max(trace.p_w))
        init = trace.segment(("init",))
        loop = trace.segment(("train", "eval"))
        spacing = float(np.median(np.diff(loop.t_s)))
        self.init_s = float(init.t_s[-1]) + spacing
        self.period_s = float(loop.t_s[-1]) + spacing
        self._init_t = np.append(init.t_s, self.init_s)
        self._init_u = np.append(init.p_w, loop.p_w[0]) / peak_w
        self._loop_t = np.append(loop.t_s, self.period_s)
        self._loop_u = np.append(loop.p_w, loop.p_w[0]) / peak_w

    def above_idle(self, age_s: np.ndarray, phase_s: float) -> np.ndarray:
        age = np.asarray(age_s, dtype=float)
        in_loop = np.mod(age - self.init_s + phase_s, self.period_s)
        u = np.where(
            age < self.init_s,
            np.interp(age, self._init_t, self._init_u),
            np.interp(in_loop, self._loop_t, self._loop_u),
        )
        return np.maximum(u - IDLE_FRACTION, 0.0)


def cluster_power_kw(
    spec: ClusterSpec, jobs: list[Job], t_s: np.ndarray, shape: NodeShape | None = None
) -> np.ndarray:
    """Return the cluster's power in kW at the evenly spaced run times ``t_s``."""
    t = np.asarray(t_s, dtype=float)
    if t.ndim != 1 or t.size < 2:
        raise ValueError("t_s must be a 1-D array of at least two evenly spaced times")
    shape = shape or NodeShape(load_h100_training())
    step = float(t[1] - t[0])
    power = np.full(t.size, spec.nodes * spec.node_peak_kw * IDLE_FRACTION)
    for job in jobs:
        first = max(math.ceil((job.start_s - t[0]) / step), 0)
        last = min(math.ceil((job.end_s - t[0]) / step), t.size)
        if first >= last:
            continue
        age = t[first:last] - job.start_s
        # At the trace's maximum the node draws power_factor of its peak; idle stays idle.
        gain = (job.power_factor - IDLE_FRACTION) / (1.0 - IDLE_FRACTION)
        above = shape.above_idle(age, job.phase_s)
        power[first:last] += job.nodes * spec.node_peak_kw * gain * above
    return power
