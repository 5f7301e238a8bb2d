"""The battery model shared by the planner and the optimum: energy, power, efficiency, SoC band."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatterySpec:
    """Usable battery for planning, with the PCS ratings already applied.

    ``discharge_kw`` and ``charge_kw`` are AC-side limits (the lower of the
    PCS rating and the BMS limit). Efficiencies apply between the AC side and
    the stored energy: charging ``x`` kWh from the grid stores
    ``charge_efficiency * x`` kWh, and delivering ``x`` kWh takes
    ``x / discharge_efficiency`` kWh out of storage. The SoC band
    [``soc_min_pct``, ``soc_max_pct``] is the part the planner may use; the
    reserve below ``soc_min_pct`` is left for ride-through.
    """

    energy_kwh: float
    discharge_kw: float
    charge_kw: float
    charge_efficiency: float = 1.0
    discharge_efficiency: float = 1.0
    soc_min_pct: float = 0.0
    soc_max_pct: float = 100.0

    def __post_init__(self) -> None:
        problems = []
        if not self.energy_kwh > 0:
            problems.append(f"energy_kwh={self.energy_kwh} must be > 0")
        if not self.discharge_kw >= 0 or not self.charge_kw >= 0:
            problems.append(
                f"discharge_kw={self.discharge_kw} and charge_kw={self.charge_kw} must be >= 0"
            )
        for name in ("charge_efficiency", "discharge_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                problems.append(f"{name}={value} must be in (0, 1]")
        if not 0 <= self.soc_min_pct < self.soc_max_pct <= 100:
            problems.append(
                f"SoC band {self.soc_min_pct}-{self.soc_max_pct} % must satisfy "
                "0 <= soc_min_pct < soc_max_pct <= 100"
            )
        if problems:
            raise ValueError("invalid battery: " + "; ".join(problems))

    @property
    def e_min_kwh(self) -> float:
        return self.energy_kwh * self.soc_min_pct / 100.0

    @property
    def e_max_kwh(self) -> float:
        return self.energy_kwh * self.soc_max_pct / 100.0

    def energy_at_kwh(self, soc_pct: float) -> float:
        """Return the stored energy at ``soc_pct``, after checking that it is in [0, 100]."""
        if not 0 <= soc_pct <= 100:
            raise ValueError(f"invalid SoC {soc_pct} %; it must be in [0, 100]")
        return self.energy_kwh * soc_pct / 100.0
