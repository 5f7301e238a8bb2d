"""Measurement store: the newest reading of every point of every device, with device health.

Pollers and the CAN reader call :meth:`MeasurementStore.update` after each
successful read and :meth:`MeasurementStore.mark_error` after each failed
one. Readers ask for a reading at a given monotonic time and get it aged:
a value older than its device's stale time comes back STALE, never as the
last good number. All methods run on the event loop's thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from drivers.quality import Quality, Reading

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class DeviceHealth:
    """Poll health of one device: ``up`` from its first good read until a read fails."""

    name: str
    role: str
    stale_s: float
    up: bool = False
    ever_up: bool = False
    last_ok_mono_s: float | None = None
    errors: int = 0
    errors_in_row: int = 0
    last_error: str | None = None

    def as_dict(self, now_mono_s: float) -> dict[str, object]:
        age = None if self.last_ok_mono_s is None else round(now_mono_s - self.last_ok_mono_s, 3)
        return {
            "role": self.role,
            "up": self.up,
            "age_s": age,
            "errors": self.errors,
            "errors_in_row": self.errors_in_row,
            "last_error": self.last_error,
        }


@dataclass(slots=True)
class _Device:
    health: DeviceHealth
    readings: dict[str, Reading] = field(default_factory=dict)


class MeasurementStore:
    """Newest readings per device and point; see the module docstring."""

    def __init__(self) -> None:
        self._devices: dict[str, _Device] = {}

    def add_device(self, name: str, role: str, stale_s: float) -> None:
        if name in self._devices:
            raise ValueError(f"device {name!r} is already in the measurement store")
        if stale_s <= 0:
            raise ValueError(f"device {name!r}: stale time must be positive, got {stale_s} s")
        self._devices[name] = _Device(DeviceHealth(name, role, stale_s))

    @property
    def devices(self) -> list[str]:
        return list(self._devices)

    def health(self, name: str) -> DeviceHealth:
        return self._device(name).health

    def update(self, name: str, readings: Mapping[str, Reading], now_mono_s: float) -> None:
        """Store the readings of one poll, whatever their quality."""
        self._device(name).readings.update(readings)

    def mark_ok(self, name: str, now_mono_s: float) -> None:
        """Record a successful poll; the first success after a failure logs one line."""
        health = self._device(name).health
        health.last_ok_mono_s = now_mono_s
        health.errors_in_row = 0
        if not health.up:
            health.up = True
            log.info(
                "device_up" if not health.ever_up else "device_recovered",
                device=name,
                role=health.role,
                errors=health.errors,
            )
            health.ever_up = True

    def mark_error(self, name: str, error: str, now_mono_s: float) -> None:
        """Count a failed poll; the first failure, and the first after a success, log one line."""
        device = self._device(name)
        health = device.health
        health.errors += 1
        health.errors_in_row += 1
        health.last_error = error
        if health.up:
            log.error("device_down", device=name, role=health.role, error=error)
        elif health.errors == 1 and not health.ever_up:
            # At start every link is still connecting. The daemon's
            # waiting_for_devices line lists the devices with no good read yet.
            log.info("device_not_answered_yet", device=name, role=health.role, error=error)
        health.up = False

    def reading(self, name: str, point: str, now_mono_s: float) -> Reading:
        """Return the point's newest reading aged at ``now_mono_s``.

        A point the device has never delivered is STALE with ``t_mono_s`` 0.
        """
        device = self._device(name)
        reading = device.readings.get(point)
        if reading is None:
            return Reading.bad(Quality.STALE, 0.0)
        return reading.aged(now_mono_s, device.health.stale_s)

    def readings(self, name: str, now_mono_s: float) -> dict[str, Reading]:
        device = self._device(name)
        return {
            point: reading.aged(now_mono_s, device.health.stale_s)
            for point, reading in device.readings.items()
        }

    def check_stale(self, now_mono_s: float) -> None:
        """Mark a device down once its newest good read is older than its stale time."""
        for name, device in self._devices.items():
            health = device.health
            last = health.last_ok_mono_s
            if health.up and last is not None and now_mono_s - last > health.stale_s:
                self.mark_error(name, f"no good read for {now_mono_s - last:.3f} s", now_mono_s)

    def all_answered(self) -> bool:
        return all(d.health.ever_up for d in self._devices.values())

    def waiting_for(self) -> list[str]:
        return [name for name, d in self._devices.items() if not d.health.ever_up]

    def snapshot(self, now_mono_s: float) -> dict[str, dict[str, object]]:
        """Return every device's health and good values for the API, JSON-ready."""
        out: dict[str, dict[str, object]] = {}
        for name, device in self._devices.items():
            values: dict[str, object] = {}
            for point, reading in device.readings.items():
                aged = reading.aged(now_mono_s, device.health.stale_s)
                values[point] = {
                    "value": aged.value,
                    "unit": aged.unit,
                    "quality": aged.quality.name.lower(),
                    "age_s": round(now_mono_s - aged.t_mono_s, 3),
                }
            out[name] = {**device.health.as_dict(now_mono_s), "values": values}
        return out

    def _device(self, name: str) -> _Device:
        try:
            return self._devices[name]
        except KeyError:
            known = ", ".join(self._devices) or "none"
            raise KeyError(f"no device {name!r} in the measurement store; known: {known}") from None
