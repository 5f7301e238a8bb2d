"""Site power traces of a scenario: per-rack GPU load, facility baseline and wind.

Both the real-time HIL rig and the SIL replay take their load and renewable
signals from :func:`build_traces`, so the two runs see the same plant input
for the same scenario and seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hil import traces
from hil.loadgen import TrainingLoadGenerator, TrainingLoadParams
from hil.scenario import Scenario


@dataclass(frozen=True)
class SiteTraces:
    """Plant inputs sampled every ``dt_s``; powers in kW, load positive = consumption."""

    dt_s: float
    t_s: np.ndarray
    #: Shape (racks, samples).
    racks_kw: np.ndarray
    facility_kw: np.ndarray
    wind_kw: np.ndarray

    @property
    def load_kw(self) -> np.ndarray:
        """Site consumption: every rack plus the facility baseline."""
        return self.racks_kw.sum(axis=0) + self.facility_kw

    @property
    def samples(self) -> int:
        return int(self.t_s.size)


def training_params(scenario: Scenario) -> TrainingLoadParams:
    racks = scenario.racks
    return TrainingLoadParams(
        iteration_period_s=racks.iteration_period_s,
        swing_low_fraction=racks.swing_low_fraction,
        desync=racks.desync,
        checkpoint_every_s=racks.checkpoint_every_s,
        checkpoint_length_s=racks.checkpoint_length_s,
    )


def build_traces(scenario: Scenario, dt_s: float | None = None) -> SiteTraces:
    """Sample the scenario's rack, facility and wind power on a grid of ``dt_s``.

    ``dt_s`` defaults to the scenario's plant step. Racks either follow the
    measured GPU trace (scaled, offset in time per rack) with the generator's
    iteration swings added, or the generator's own job model.
    """
    dt_s = scenario.run.dt_ms / 1000.0 if dt_s is None else dt_s
    count = round(scenario.run.duration_s / dt_s)
    t_s = np.arange(count) * dt_s
    racks = scenario.racks
    generator = TrainingLoadGenerator(
        training_params(scenario),
        racks=racks.count,
        peak_kw=racks.peak_kw,
        duration_s=scenario.run.duration_s,
        seed=scenario.run.seed,
    )
    if racks.trace == "generator":
        racks_kw = generator.power_kw(t_s)
    else:
        envelope = traces.RackEnvelope(
            traces.load_gpu_trace(racks.trace), racks.count, racks.peak_kw, racks.rack_offset_s
        )
        envelope_kw = envelope.power_kw(t_s)
        racks_kw = generator.power_kw(t_s, envelope_kw) if racks.iteration_swings else envelope_kw

    if scenario.facility.mean_kw > 0:
        facility = traces.FacilityBaseline(
            traces.load_commercial_profile(scenario.facility.profile),
            scenario.facility.mean_kw,
            traces.profile_start_s(scenario.run.start_utc),
        )
        facility_kw = np.asarray(facility.power_kw(t_s), dtype=float)
    else:
        facility_kw = np.zeros(count)

    if scenario.wind.rated_kw > 0:
        wind = traces.WindProfile(
            traces.load_wind_plant(),
            scenario.run.start_utc,
            scenario.run.duration_s,
            scenario.wind.rated_kw,
            method=scenario.wind.interpolation,
            seed=scenario.run.seed,
        )
        wind_kw = np.asarray(wind.power_kw(t_s), dtype=float)
    else:
        wind_kw = np.zeros(count)
    return SiteTraces(dt_s, t_s, racks_kw, facility_kw, wind_kw)
