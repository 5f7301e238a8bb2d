"""Turn the fast loop's tick records into 1-second aggregates and disturbance captures.

Both classes are fed with whatever the ring-buffer drain returned (a few
hundred ticks at a time) and do their work with numpy over the batch, never
per tick in Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.service.store import Aggregate


class SecondAggregator:
    """Accumulate per-tick signal values into count/mean/min/max per UTC second.

    A NaN marks a tick where the signal was not good: it is left out of the
    statistics, so a second with no good value has ``n = 0`` and NaN stats.
    A second is emitted once a tick from a later second has arrived, or by
    :meth:`flush` at shutdown.
    """

    def __init__(self, signals: Sequence[str]) -> None:
        if not signals:
            raise ValueError("SecondAggregator needs at least one signal name")
        self.signals = tuple(signals)
        self._t = np.empty(0)
        self._values = {name: np.empty(0) for name in self.signals}

    def add(self, t_utc: np.ndarray, values: Mapping[str, np.ndarray]) -> list[Aggregate]:
        """Add ticks (UTC seconds, non-decreasing) and return every second now complete."""
        missing = [name for name in self.signals if name not in values]
        if missing:
            raise KeyError(f"tick batch lacks signals {missing}; expected {list(self.signals)}")
        t = np.concatenate([self._t, np.asarray(t_utc, dtype=np.float64)])
        merged = {
            name: np.concatenate([self._values[name], np.asarray(values[name], dtype=np.float64)])
            for name in self.signals
        }
        if t.size == 0:
            return []
        seconds = np.floor(t).astype(np.int64)
        # Everything before the first tick of the newest second is complete.
        cut = int(np.searchsorted(seconds, seconds[-1], side="left"))
        self._t = t[cut:]
        self._values = {name: merged[name][cut:] for name in self.signals}
        return self._summarise(seconds[:cut], {name: merged[name][:cut] for name in self.signals})

    def flush(self) -> list[Aggregate]:
        """Emit the second still open, if any, and start empty."""
        seconds = np.floor(self._t).astype(np.int64)
        out = self._summarise(seconds, self._values)
        self._t = np.empty(0)
        self._values = {name: np.empty(0) for name in self.signals}
        return out

    def _summarise(self, seconds: np.ndarray, values: Mapping[str, np.ndarray]) -> list[Aggregate]:
        if seconds.size == 0:
            return []
        starts = np.flatnonzero(np.r_[True, seconds[1:] != seconds[:-1]])
        ends = np.r_[starts[1:], seconds.size]
        out = []
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            t_s = int(seconds[start])
            for name in self.signals:
                chunk = values[name][start:end]
                good = chunk[np.isfinite(chunk)]
                if good.size:
                    out.append(
                        Aggregate(
                            t_s,
                            name,
                            int(good.size),
                            float(good.mean()),
                            float(good.min()),
                            float(good.max()),
                        )
                    )
                else:
                    out.append(Aggregate(t_s, name, 0, float("nan"), float("nan"), float("nan")))
        return out


@dataclass(frozen=True, slots=True)
class Capture:
    """Ticks around one fault; ``ticks[trigger_index]`` is the tick at which it was detected."""

    fault_code: str
    ticks: np.ndarray
    trigger_index: int


@dataclass(slots=True)
class _Pending:
    fault_code: str
    pre: np.ndarray
    #: Index of the trigger tick in the first batch fed after the trigger.
    offset: int
    chunks: list[np.ndarray] = field(default_factory=list)
    collected: int = 0


class DisturbanceRecorder:
    """Keep the last ``pre_ticks`` tick records; on a trigger, capture them plus ``post_ticks``.

    The capture runs from ``pre_ticks`` before the batch that contains the
    trigger tick to ``post_ticks`` after the trigger tick. A trigger that
    arrives while a capture is still collecting is folded into that capture
    (its code is appended), because both faults are visible in one record.
    """

    def __init__(self, dtype: np.dtype, pre_ticks: int, post_ticks: int) -> None:
        if pre_ticks < 1 or post_ticks < 0:
            raise ValueError(
                f"pre_ticks must be >= 1 and post_ticks >= 0, got {pre_ticks}, {post_ticks}"
            )
        self.dtype = np.dtype(dtype)
        self.pre_ticks = pre_ticks
        self.post_ticks = post_ticks
        self._ring = np.zeros(pre_ticks, dtype=self.dtype)
        self._filled = 0
        self._head = 0
        self._pending: _Pending | None = None

    @property
    def collecting(self) -> bool:
        return self._pending is not None

    def trigger(self, fault_code: str, offset: int = 0) -> None:
        """Start a capture whose trigger is tick ``offset`` of the next batch fed in."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if self._pending is not None:
            self._pending.fault_code += f"+{fault_code}"
            return
        self._pending = _Pending(fault_code, self._history(), offset)

    def feed(self, ticks: np.ndarray) -> list[Capture]:
        """Add drained ticks; return the captures that are complete."""
        done: list[Capture] = []
        pending = self._pending
        if pending is not None:
            needed = pending.offset + self.post_ticks + 1
            take = ticks[: needed - pending.collected]
            pending.chunks.append(take.copy())
            pending.collected += len(take)
            if pending.collected >= needed:
                done.append(self._capture(pending))
                self._pending = None
        self._remember(ticks)
        return done

    def flush(self) -> list[Capture]:
        """Return a capture still collecting, shortened to what has arrived."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        ticks = np.concatenate([pending.pre, *pending.chunks])
        if len(ticks) == 0:
            return []
        trigger_index = min(len(pending.pre) + pending.offset, len(ticks) - 1)
        return [Capture(pending.fault_code, ticks, trigger_index)]

    def _capture(self, pending: _Pending) -> Capture:
        ticks = np.concatenate([pending.pre, *pending.chunks])
        return Capture(pending.fault_code, ticks, len(pending.pre) + pending.offset)

    def _remember(self, ticks: np.ndarray) -> None:
        if len(ticks) >= self.pre_ticks:
            self._ring[:] = ticks[-self.pre_ticks :]
            self._head = 0
            self._filled = self.pre_ticks
            return
        n = len(ticks)
        first = min(n, self.pre_ticks - self._head)
        self._ring[self._head : self._head + first] = ticks[:first]
        self._ring[: n - first] = ticks[first:]
        self._head = (self._head + n) % self.pre_ticks
        self._filled = min(self._filled + n, self.pre_ticks)

    def _history(self) -> np.ndarray:
        if self._filled < self.pre_ticks:
            return self._ring[: self._filled].copy()
        return np.concatenate([self._ring[self._head :], self._ring[: self._head]])
