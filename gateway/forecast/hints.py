"""Job hints from the cluster's scheduler: planned starts and ends that the load forecast uses.

A hint states that job ``job_id`` on ``nodes`` nodes is expected to draw
``expected_kw`` from ``start_utc`` until ``end_utc`` (UNIX seconds, UTC).
Hints arrive two ways, with the same fields:

* through the local API, one at a time (:func:`add_hint`): a prolog sends
  the hint when the job is planned or starts, an epilog sends it again with
  the real end time;
* in a JSON file that the scheduler rewrites (:class:`HintFileWatcher`),
  either a list of hints or ``{"jobs": [...]}``. The file is the scheduler's
  whole current plan, so each reload replaces the hints that came from the
  file and keeps those that came through the API. The scheduler should
  write a temporary file and rename it over the old one, so that a reload
  never reads half a file.

A hint for a known ``job_id`` replaces the earlier one. Times may be UNIX
seconds or ISO 8601 strings with ``Z`` or an offset.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

log = structlog.get_logger(__name__)

#: A hint is dropped this long after its end time, so late epilogs can still update it.
KEEP_AFTER_END_S = 3600.0
_FIELDS = ("job_id", "start_utc", "end_utc", "nodes", "expected_kw")


class HintError(ValueError):
    """A job hint is malformed; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class JobHint:
    """One planned or running job as the scheduler announced it. Times are UNIX seconds, UTC."""

    job_id: str
    start_utc: float
    #: ``math.inf`` until the scheduler sends the end time.
    end_utc: float
    nodes: int
    #: Power the job is expected to draw in total, idle draw of its nodes included.
    expected_kw: float

    def active_at(self, t_utc: np.ndarray) -> np.ndarray:
        """Return, for each time, whether the job is expected to be running then."""
        return (self.start_utc <= t_utc) & (t_utc < self.end_utc)


def _parse_time(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise HintError(f"{name}={value!r} is not a time; give UNIX seconds or ISO 8601")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as err:
            raise HintError(
                f"{name}={value!r} is not an ISO 8601 time; write it like 2025-03-01T14:00:00Z"
            ) from err
        if parsed.tzinfo is None:
            raise HintError(f"{name}={value!r} has no time zone; add Z for UTC")
        seconds = parsed.timestamp()
    else:
        raise HintError(f"{name}={value!r} is not a time; give UNIX seconds or ISO 8601")
    if not math.isfinite(seconds):
        raise HintError(f"{name}={value!r} is not a finite time")
    return seconds


def parse_hint(data: Mapping[str, object]) -> JobHint:
    """Validate one hint given as a mapping and return it; raise :class:`HintError` if invalid."""
    if not isinstance(data, Mapping):
        raise HintError(f"a job hint must be a JSON object; got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise HintError(f"unknown hint field(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    missing = [name for name in ("job_id", "start_utc", "expected_kw") if data.get(name) is None]
    if missing:
        raise HintError(f"job hint is missing {', '.join(missing)}")
    job_id = data["job_id"]
    if not isinstance(job_id, str) or not 0 < len(job_id) <= 128:
        raise HintError(f"job_id={job_id!r} must be a string of 1 to 128 characters")
    start = _parse_time("start_utc", data["start_utc"])
    end = math.inf if data.get("end_utc") is None else _parse_time("end_utc", data["end_utc"])
    if end <= start:
        raise HintError(f"job {job_id}: end_utc {end} is not after start_utc {start}")
    nodes = data.get("nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise HintError(f"job {job_id}: nodes={nodes!r} must be a whole number >= 1")
    expected = data["expected_kw"]
    if isinstance(expected, bool) or not isinstance(expected, (int, float)):
        raise HintError(f"job {job_id}: expected_kw={expected!r} must be a number of kW")
    if not math.isfinite(expected) or expected < 0:
        raise HintError(f"job {job_id}: expected_kw={expected!r} must be finite and >= 0")
    return JobHint(job_id, start, end, nodes, float(expected))


class HintBook:
    """The current job hints by job id, with the source each came from (``api`` or ``file``).

    Not thread-safe: the daemon calls it from its event loop only.
    """

    def __init__(self) -> None:
        self._hints: dict[str, tuple[JobHint, str]] = {}
        # Columns start, end, expected_kw of every hint; rebuilt after a change.
        self._table: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._hints)

    def hints(self) -> list[JobHint]:
        return [hint for hint, _ in self._hints.values()]

    def add(self, hint: JobHint, source: str = "api") -> None:
        self._hints[hint.job_id] = (hint, source)
        self._table = None

    def replace_source(self, hints: Sequence[JobHint], source: str) -> None:
        """Drop every hint from ``source`` and add ``hints`` in their place."""
        self._hints = {k: v for k, v in self._hints.items() if v[1] != source}
        for hint in hints:
            self.add(hint, source)
        self._table = None

    def prune(self, now_utc: float) -> int:
        """Drop hints that ended more than an hour ago; return how many were dropped."""
        stale = [k for k, (h, _) in self._hints.items() if h.end_utc < now_utc - KEEP_AFTER_END_S]
        for key in stale:
            del self._hints[key]
        if stale:
            self._table = None
        return len(stale)

    def power_steps_kw(self, now_utc: float, horizons_s: Sequence[float]) -> np.ndarray:
        """Return the hinted power that starts and that stops between now and each horizon.

        The result has shape (2, horizons): row 0 sums ``expected_kw`` over jobs
        that start in (now, now + horizon] and row 1 over jobs that end in that
        span, both as positive kW. A job that starts and ends inside the span
        counts in neither row.
        """
        if self._table is None:
            hints = self.hints()
            self._table = np.array(
                [(h.start_utc, h.end_utc, h.expected_kw) for h in hints], dtype=float
            ).reshape(len(hints), 3)
        start, end, power = self._table.T
        ahead = now_utc + np.asarray(horizons_s, dtype=float)[None, :]
        running_now = ((start <= now_utc) & (now_utc < end))[:, None]
        running_then = (start[:, None] <= ahead) & (ahead < end[:, None])
        starts = (running_then & ~running_now) * power[:, None]
        stops = (running_now & ~running_then) * power[:, None]
        return np.stack([starts.sum(axis=0), stops.sum(axis=0)])

    def power_change_kw(self, now_utc: float, horizons_s: Sequence[float]) -> np.ndarray:
        """Return the hinted change of power from ``now_utc`` to each horizon, in kW.

        Jobs running at both times cancel out, because their power is already
        in the measured load.
        """
        starts, stops = self.power_steps_kw(now_utc, horizons_s)
        return starts - stops


def add_hint(book: HintBook, data: Mapping[str, object]) -> JobHint:
    """Validate a hint from the local API, store it in ``book`` and return it."""
    hint = parse_hint(data)
    book.add(hint, "api")
    log.info(
        "job_hint_added",
        job_id=hint.job_id,
        start_utc=hint.start_utc,
        end_utc=hint.end_utc,
        nodes=hint.nodes,
        expected_kw=hint.expected_kw,
    )
    return hint


def load_hint_file(path: Path) -> list[JobHint]:
    """Read a hint file; raise :class:`HintError` naming the file and the bad entry."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise HintError(f"{path}: hint file not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise HintError(f"{path}: hint file cannot be read: {err}") from err
    except json.JSONDecodeError as err:
        raise HintError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}") from err
    if isinstance(data, dict) and set(data) == {"jobs"}:
        data = data["jobs"]
    if not isinstance(data, list):
        raise HintError(f'{path}: expected a list of hints or {{"jobs": [...]}}')
    hints = []
    for index, item in enumerate(data):
        try:
            hints.append(parse_hint(item))
        except HintError as err:
            raise HintError(f"{path}: entry {index}: {err}") from err
    return hints


class HintFileWatcher:
    """Reload a hint file into a :class:`HintBook` when its modification time or size changes.

    :meth:`poll` is cheap (one ``stat``) and meant to run every few seconds.
    A file that is missing or invalid leaves the hints from its last good
    version in place, so a scheduler that writes a broken file does not erase
    the plan it announced. Each new version of a bad file logs one error.
    """

    def __init__(self, path: str | Path, book: HintBook) -> None:
        self.path = Path(path)
        self.book = book
        self._seen: tuple[int, int] | None = None
        self._missing_logged = False

    def poll(self) -> bool:
        """Reload the file if it changed; return True when the hints were replaced."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            if not self._missing_logged:
                log.warning("job_hint_file_missing", path=str(self.path))
                self._missing_logged = True
            return False
        self._missing_logged = False
        version = (info.st_mtime_ns, info.st_size)
        if version == self._seen:
            return False
        self._seen = version
        try:
            hints = load_hint_file(self.path)
        except HintError as err:
            # The error is handled here (the old hints stay), so no traceback is logged.
            log.error("job_hint_file_invalid", path=str(self.path), error=str(err))  # noqa: TRY400
            return False
        self.book.replace_source(hints, "file")
        log.info("job_hint_file_loaded", path=str(self.path), jobs=len(hints))
        return True
