"""Write disturbance records in COMTRADE (IEEE Std C37.111-1999), ASCII data file.

A record is two files with one stem: ``NAME.cfg`` describes the channels and
timing, ``NAME.dat`` has one line per sample::

    n,timestamp_us,A1,...,Ak,D1,...,Dm

Each analog value is stored as an integer ``x`` in [-99999, 99999] and means
``a * x + b`` in the channel's unit. The writer chooses ``a`` per channel from
the largest magnitude in the record, which keeps five significant digits.
A NaN (a value that was not good) is written as ``99999``, the missing-value
code of the 1999 revision. The writer chooses ``a`` so that valid values stay
below it.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_X_MAX = 99998
_MISSING = 99999


@dataclass(frozen=True, slots=True)
class AnalogChannel:
    name: str
    unit: str
    values: np.ndarray


@dataclass(frozen=True, slots=True)
class DigitalChannel:
    name: str
    values: np.ndarray


def write_comtrade(
    stem: Path,
    *,
    station: str,
    device: str,
    start_utc: dt.datetime,
    rate_hz: float,
    trigger_index: int,
    analog: Sequence[AnalogChannel],
    digital: Sequence[DigitalChannel] = (),
    line_frequency_hz: float = 50.0,
) -> tuple[Path, Path]:
    """Write ``stem.cfg`` and ``stem.dat``, fsync both, and return their paths.

    All channels must have the same number of samples, taken at ``rate_hz``
    from ``start_utc``; ``trigger_index`` is the sample at which the fault was
    detected. Names may not contain commas (COMTRADE's field separator).
    """
    n = _check_lengths(analog, digital)
    if not 0 <= trigger_index < n:
        raise ValueError(f"trigger_index {trigger_index} is outside the record's 0..{n - 1}")
    if rate_hz <= 0:
        raise ValueError(f"rate_hz must be positive, got {rate_hz}")
    for text in (station, device, *(c.name for c in analog), *(c.name for c in digital)):
        if "," in text or "\n" in text:
            raise ValueError(f"COMTRADE names may not contain commas or newlines: {text!r}")

    scales = [_scale(c.values) for c in analog]
    cfg_path = stem.with_suffix(".cfg")
    dat_path = stem.with_suffix(".dat")
    trigger_utc = start_utc + dt.timedelta(seconds=trigger_index / rate_hz)

    lines = [
        f"{station},{device},1999",
        f"{len(analog) + len(digital)},{len(analog)}A,{len(digital)}D",
    ]
    for i, (channel, a) in enumerate(zip(analog, scales, strict=True), start=1):
        lines.append(f"{i},{channel.name},,,{channel.unit},{a:.9g},0,0,-{_X_MAX},{_X_MAX},1,1,P")
    for i, channel in enumerate(digital, start=1):
        lines.append(f"{i},{channel.name},,,0")
    lines += [
        f"{line_frequency_hz:g}",
        "1",
        f"{rate_hz:g},{n}",
        _timestamp(start_utc),
        _timestamp(trigger_utc),
        "ASCII",
        "1",
    ]
    _write_synced(cfg_path, "\r\n".join(lines) + "\r\n")

    columns = [np.arange(1, n + 1), np.round(np.arange(n) * 1e6 / rate_hz).astype(np.int64)]
    for channel, a in zip(analog, scales, strict=True):
        values = np.asarray(channel.values, dtype=np.float64)
        x = np.full(n, _MISSING, dtype=np.int64)
        finite = np.isfinite(values)
        x[finite] = np.round(values[finite] / a).astype(np.int64)
        columns.append(x)
    columns.extend(np.asarray(c.values).astype(bool).astype(np.int64) for c in digital)
    table = np.column_stack(columns)
    body = "\r\n".join(",".join(map(str, row)) for row in table.tolist()) + "\r\n"
    _write_synced(dat_path, body)
    return cfg_path, dat_path


def _check_lengths(analog: Sequence[AnalogChannel], digital: Sequence[DigitalChannel]) -> int:
    lengths = {len(c.values) for c in (*analog, *digital)}
    if not analog and not digital:
        raise ValueError("a COMTRADE record needs at least one channel")
    if len(lengths) != 1:
        raise ValueError(
            f"all channels must have the same number of samples, got {sorted(lengths)}"
        )
    n = lengths.pop()
    if n == 0:
        raise ValueError("a COMTRADE record needs at least one sample")
    return n


def _scale(values: np.ndarray) -> float:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    if peak == 0.0:
        return 1.0
    # Round the step up to 3 significant digits so the .cfg shows a short
    # number; valid values then stay within +-99998 by construction.
    step = peak / _X_MAX
    digits = 2 - math.floor(math.log10(step))
    return math.ceil(step * 10**digits) / 10**digits


def _timestamp(t: dt.datetime) -> str:
    t = t.astimezone(dt.timezone.utc)
    return t.strftime("%d/%m/%Y,%H:%M:%S.%f")


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
