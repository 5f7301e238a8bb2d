"""Scenario tables for planning replays over days: the job-scheduled cluster, the planner, events.

:class:`hil.scenario.Scenario` carries these as ``[cluster]``, ``[planner]``
and ``[[demand_response]]``. A scenario without ``[cluster]`` has no job
stream, and ``bessgw plan replay`` rejects it. Powers are in kW, times in
the unit their name carries.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Cluster(_Strict):
    """A job-scheduled GPU cluster on the scenario's racks (see :mod:`hil.cluster`).

    The cluster has ``racks.count * nodes_per_rack`` nodes of
    ``racks.peak_kw / nodes_per_rack`` each. Jobs are drawn with the run's seed.
    """

    nodes_per_rack: int = Field(default=4, ge=1, le=64)
    #: Mean job submissions per hour in working hours.
    arrivals_per_hour: float = Field(default=2.5, gt=0, le=1000)
    #: Share of jobs that are wall-time chunks of long training runs.
    chunked_fraction: float = Field(default=0.5, ge=0, le=1)
    #: Jobs of at least this many nodes are booked ahead as reservations.
    reserved_min_nodes: int = Field(default=16, ge=1)
    #: Share of smaller jobs submitted ahead with a begin time.
    scheduled_fraction: float = Field(default=0.2, ge=0, le=1)
    #: Share of jobs the scheduler sends hints for.
    hint_fraction: float = Field(default=0.9, ge=0, le=1)


class Planner(_Strict):
    """Planner settings and the replay's time step."""

    #: Ride-through reserve the planner never plans to use, and the top of the usable band.
    reserve_soc_pct: float = Field(default=20.0, ge=0, lt=100)
    soc_max_pct: float = Field(default=95.0, gt=0, le=100)
    #: Net-load history the history optimum looks back over.
    history_days: float = Field(default=7.0, gt=0, le=60)
    #: Days simulated before the run so that the forecasts and the history optimum are warm.
    warmup_days: float = Field(default=7.0, ge=0, le=60)
    cap_margin_kw: float = Field(default=0.0, ge=0)
    self_consumption: bool = True
    #: Grid import the fast loop adds to recharge below the SoC band.
    recharge_kw: float = Field(default=100.0, ge=0)
    #: Time over which energy above the cap's need is discharged into the load.
    drain_min: float = Field(default=60.0, gt=0)
    #: Step of the replay's plant and fast loop; the planner runs every minute.
    step_s: float = Field(default=1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _check_band(self) -> Planner:
        if not self.reserve_soc_pct < self.soc_max_pct - 5.0:
            raise ValueError(
                f"reserve_soc_pct ({self.reserve_soc_pct}) must be at least 5 points below "
                f"soc_max_pct ({self.soc_max_pct})"
            )
        if 60.0 % self.step_s:
            raise ValueError(f"step_s={self.step_s} must divide a minute evenly")
        return self


class DemandResponse(_Strict):
    """Import ``reduce_kw`` less than the baseline from ``start_s`` to ``end_s`` (run time)."""

    start_s: float = Field(ge=0)
    end_s: float = Field(gt=0)
    reduce_kw: float = Field(gt=0)

    @model_validator(mode="after")
    def _check_times(self) -> DemandResponse:
        if not self.end_s > self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")
        return self
