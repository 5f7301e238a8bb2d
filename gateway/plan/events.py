"""Demand-response events: reduce grid import by ``reduce_kw`` from ``start_utc`` to ``end_utc``.

An event reaches the planner through the local API (:func:`add_event`) with
the same fields the API's ``add_dr_event`` method takes. Times are UNIX
seconds, UTC. The reduction is measured against a baseline that the planner
fixes when the event starts: the mean net load of the hour before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

#: Maximum event length accepted; utility programmes call events of a few hours.
MAX_EVENT_S = 24 * 3600.0


class EventError(ValueError):
    """A demand-response event is malformed; the message names the field and the fix."""


@dataclass(frozen=True)
class DemandResponseEvent:
    """A request to import ``reduce_kw`` less than the baseline during [start_utc, end_utc)."""

    event_id: str
    start_utc: float
    end_utc: float
    reduce_kw: float

    def active_at(self, t_utc: float) -> bool:
        return self.start_utc <= t_utc < self.end_utc

    @property
    def duration_s(self) -> float:
        return self.end_utc - self.start_utc


def parse_event(data: Mapping[str, object]) -> DemandResponseEvent:
    """Validate one event given as a mapping; raise :class:`EventError` if invalid."""
    if not isinstance(data, Mapping):
        raise EventError(f"a demand-response event must be an object; got {type(data).__name__}")
    fields = ("event_id", "start_utc", "end_utc", "reduce_kw")
    unknown = sorted(set(data) - set(fields))
    missing = [name for name in fields if data.get(name) is None]
    if unknown or missing:
        raise EventError(
            f"demand-response event has unknown field(s) {unknown} or is missing {missing}; "
            f"give exactly {', '.join(fields)}"
        )

    event_id = data["event_id"]
    if not isinstance(event_id, str) or not 0 < len(event_id) <= 128:
        raise EventError(f"event_id={event_id!r} must be a string of 1 to 128 characters")
    numbers = {}
    for name in ("start_utc", "end_utc", "reduce_kw"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EventError(f"event {event_id}: {name}={value!r} must be a number")
        if not math.isfinite(value):
            raise EventError(f"event {event_id}: {name}={value!r} must be finite")
        numbers[name] = float(value)

    if numbers["reduce_kw"] <= 0:
        raise EventError(f"event {event_id}: reduce_kw={numbers['reduce_kw']} must be > 0")
    duration = numbers["end_utc"] - numbers["start_utc"]
    if not 0 < duration <= MAX_EVENT_S:
        raise EventError(
            f"event {event_id}: end_utc - start_utc = {duration} s must be in (0, {MAX_EVENT_S:g}]"
        )
    return DemandResponseEvent(
        event_id, numbers["start_utc"], numbers["end_utc"], numbers["reduce_kw"]
    )


class EventBook:
    """Known demand-response events by id; a new event with a known id replaces the old one."""

    def __init__(self) -> None:
        self._events: dict[str, DemandResponseEvent] = {}

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: DemandResponseEvent) -> None:
        self._events[event.event_id] = event

    def events(self) -> list[DemandResponseEvent]:
        return sorted(self._events.values(), key=lambda e: e.start_utc)

    def relevant(self, now_utc: float, lookahead_s: float) -> list[DemandResponseEvent]:
        """Return the events running now or starting within ``lookahead_s``, earliest first."""
        horizon = now_utc + lookahead_s
        return [e for e in self.events() if e.end_utc > now_utc and e.start_utc < horizon]

    def prune(self, now_utc: float) -> int:
        """Drop events that have ended; return how many."""
        ended = [k for k, e in self._events.items() if e.end_utc <= now_utc]
        for key in ended:
            del self._events[key]
        return len(ended)


def add_event(book: EventBook, data: Mapping[str, object]) -> DemandResponseEvent:
    """Validate an event from the local API, store it in ``book`` and return it."""
    event = parse_event(data)
    book.add(event)
    log.info(
        "demand_response_event_added",
        event_id=event.event_id,
        start_utc=event.start_utc,
        end_utc=event.end_utc,
        reduce_kw=event.reduce_kw,
    )
    return event
