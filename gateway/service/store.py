"""Embedded store: one SQLite database in WAL mode in the state directory.

Tables::

    events        every state change, operator action and caught error
    faults        one row per fault occurrence: raised, cleared, reset
    aggregates    1-second count/mean/min/max of the main signals (long format)
    disturbances  index of the disturbance records written beside the database

Durability contract: every ``add_*``, ``raise_fault``, ``clear_fault`` and
``reset_fault`` call returns only after its transaction has committed with
``synchronous=FULL``, so a row whose id a caller has received survives a
SIGKILL of the process and a power loss. WAL mode keeps readers (``bessgw
status``, ``sqlite3`` on the command line) from blocking the writer.

Thread safety: a :class:`Store` is used from one thread at a time. The daemon
gives it a single worker thread so the asyncio loop never waits on ``fsync``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

DB_NAME = "bessgw.sqlite3"
SCHEMA_VERSION = 1
SEVERITIES = ("debug", "info", "warning", "error", "critical")

_SCHEMA = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    t_utc REAL NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    source TEXT,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX events_t_utc ON events (t_utc);
CREATE TABLE faults (
    id INTEGER PRIMARY KEY,
    code TEXT NOT NULL,
    source TEXT,
    message TEXT NOT NULL,
    latched INTEGER NOT NULL,
    raised_utc REAL NOT NULL,
    cleared_utc REAL,
    reset_utc REAL,
    reset_by TEXT
);
CREATE TABLE aggregates (
    t_s INTEGER NOT NULL,
    signal TEXT NOT NULL,
    n INTEGER NOT NULL,
    mean REAL,
    min REAL,
    max REAL,
    PRIMARY KEY (t_s, signal)
) WITHOUT ROWID;
CREATE TABLE disturbances (
    id INTEGER PRIMARY KEY,
    t_utc REAL NOT NULL,
    fault_code TEXT NOT NULL,
    cfg_path TEXT NOT NULL,
    dat_path TEXT NOT NULL,
    n_samples INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL
);
"""

#: Free pages returned to the file system per retention pass (80 MB at 4 KiB pages).
_VACUUM_PAGES = 20_000

#: A fault is active until its cause has cleared and, when latched, an operator has reset it.
_ACTIVE_FAULT = "(cleared_utc IS NULL OR (latched = 1 AND reset_utc IS NULL))"


class StoreError(OSError):
    """The database cannot be opened, written or checked."""


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Statistics of one signal over one UTC second (``t_s`` is the second's start)."""

    t_s: int
    signal: str
    n: int
    mean: float
    min: float
    max: float


@dataclass(frozen=True, slots=True)
class Fault:
    id: int
    code: str
    source: str | None
    message: str
    latched: bool
    raised_utc: float
    cleared_utc: float | None
    reset_utc: float | None
    reset_by: str | None

    @property
    def active(self) -> bool:
        return self.cleared_utc is None or (self.latched and self.reset_utc is None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "code": self.code,
            "source": self.source,
            "message": self.message,
            "latched": self.latched,
            "raised_utc": self.raised_utc,
            "cleared_utc": self.cleared_utc,
            "reset_utc": self.reset_utc,
            "reset_by": self.reset_by,
            "active": self.active,
        }


@dataclass(frozen=True, slots=True)
class RetentionResult:
    events: int = 0
    faults: int = 0
    aggregates: int = 0
    disturbances: int = 0

    @property
    def total(self) -> int:
        return self.events + self.faults + self.aggregates + self.disturbances


class Store:
    """The gateway's database; see the module docstring for the durability contract.

    ``max_bytes`` bounds the database plus the disturbance files it indexes;
    ``max_age_s`` bounds how long any row or record is kept. Neither limit
    removes a fault that is still active.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        max_bytes: int = 1 << 30,
        max_age_s: float = 365 * 86400.0,
        max_disturbances: int = 100,
    ) -> None:
        if max_bytes <= 0 or max_age_s <= 0 or max_disturbances < 1:
            raise ValueError(
                f"store limits must be positive: max_bytes={max_bytes}, "
                f"max_age_s={max_age_s}, max_disturbances={max_disturbances}"
            )
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.disturbance_dir = self.state_dir / "disturbances"
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_disturbances = max_disturbances
        self._db: sqlite3.Connection | None = None

    # -- life cycle -------------------------------------------------------

    def open(self) -> Store:
        """Create the state directory and database if needed, and check the schema version."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.disturbance_dir.mkdir(exist_ok=True)
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except (OSError, sqlite3.Error) as err:
            raise StoreError(
                f"cannot open the store {self.path}: {err}; check that the state directory "
                "exists and the service user may write to it"
            ) from err
        try:
            _prepare(db, self.path)
        except sqlite3.DatabaseError as err:
            db.close()
            raise StoreError(
                f"{self.path} is not a usable SQLite database: {err}; move it away to start "
                "a new store"
            ) from err
        except StoreError:
            db.close()
            raise
        self._db = db
        return self

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close."""
        if self._db is None:
            return
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.close()
            self._db = None

    def __enter__(self) -> Store:
        return self.open() if self._db is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the store {self.path} is not open; call open() first")
        return self._db

    # -- writes -----------------------------------------------------------

    def add_event(
        self,
        kind: str,
        message: str,
        *,
        severity: str = "info",
        source: str | None = None,
        data: dict[str, Any] | None = None,
        t_utc: float | None = None,
    ) -> int:
        """Insert one event, commit, and return its id."""
        if severity not in SEVERITIES:
            raise ValueError(f"event severity {severity!r} is not one of {', '.join(SEVERITIES)}")
        payload = None if data is None else json.dumps(data, separators=(",", ":"), default=str)
        with _Transaction(self.db):
            cursor = self.db.execute(
                "INSERT INTO events (t_utc, kind, severity, source, message, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (_now(t_utc), kind, severity, source, message, payload),
            )
        return int(cursor.lastrowid)

    def raise_fault(
        self,
        code: str,
        message: str,
        *,
        source: str | None = None,
        latched: bool = True,
        t_utc: float | None = None,
    ) -> int:
        """Record a new fault occurrence and its event in one transaction; return the fault id."""
        t = _now(t_utc)
        with _Transaction(self.db):
            cursor = self.db.execute(
                "INSERT INTO faults (code, source, message, latched, raised_utc) "
                "VALUES (?, ?, ?, ?, ?)",
                (code, source, message, int(latched), t),
            )
            self.db.execute(
                "INSERT INTO events (t_utc, kind, severity, source, message, data) "
                "VALUES (?, 'fault_raised', 'error', ?, ?, ?)",
                (t, source, message, json.dumps({"code": code, "latched": latched})),
            )
        return int(cursor.lastrowid)

    def clear_fault(self, fault_id: int, *, t_utc: float | None = None) -> bool:
        """Mark that the fault's cause has gone; False when it was already cleared or unknown."""
        t = _now(t_utc)
        with _Transaction(self.db):
            return self._clear(fault_id, t)

    def reset_fault(self, fault_id: int, operator: str, *, t_utc: float | None = None) -> bool:
        """Record an operator's reset of a latched fault; False when there was nothing to reset."""
        t = _now(t_utc)
        with _Transaction(self.db):
            return self._reset(fault_id, operator, t)

    def close_previous_run_faults(self, *, t_utc: float | None = None) -> list[int]:
        """Clear and reset every fault still active from an earlier process; return their ids.

        A new daemon starts with fresh interlocks and resets them once every
        input is good, so a fault that the previous process left open no
        longer describes the plant. Each closed fault gets its events, with
        ``restart`` as the operator of the reset.
        """
        t = _now(t_utc)
        with _Transaction(self.db):
            ids = [
                row[0]
                for row in self.db.execute(
                    f"SELECT id FROM faults WHERE {_ACTIVE_FAULT} ORDER BY id"  # noqa: S608
                ).fetchall()
            ]
            for fault_id in ids:
                self._clear(fault_id, t)
                self._reset(fault_id, "restart", t)
        return ids

    def _clear(self, fault_id: int, t: float) -> bool:
        """Set the fault's cleared time and add its event, inside the caller's transaction."""
        changed = self.db.execute(
            "UPDATE faults SET cleared_utc = ? WHERE id = ? AND cleared_utc IS NULL",
            (t, fault_id),
        ).rowcount
        if changed:
            self._fault_event(fault_id, "fault_cleared", "info", t, None)
        return bool(changed)

    def _reset(self, fault_id: int, operator: str, t: float) -> bool:
        """Record the reset of a latched fault and its event, inside the caller's transaction."""
        changed = self.db.execute(
            "UPDATE faults SET reset_utc = ?, reset_by = ? "
            "WHERE id = ? AND latched = 1 AND reset_utc IS NULL",
            (t, operator, fault_id),
        ).rowcount
        if changed:
            self._fault_event(fault_id, "fault_reset", "info", t, operator)
        return bool(changed)

    def _fault_event(
        self, fault_id: int, kind: str, severity: str, t: float, operator: str | None
    ) -> None:
        code, source = self.db.execute(
            "SELECT code, source FROM faults WHERE id = ?", (fault_id,)
        ).fetchone()
        data: dict[str, Any] = {"code": code, "fault_id": fault_id}
        if operator is not None:
            data["operator"] = operator
        self.db.execute(
            "INSERT INTO events (t_utc, kind, severity, source, message, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (t, kind, severity, source, f"{code} {kind.removeprefix('fault_')}", json.dumps(data)),
        )

    def add_aggregates(self, rows: Iterable[Aggregate]) -> int:
        """Insert (or replace) 1-second aggregates in one transaction; return the row count.

        Non-finite statistics are stored as NULL, so a second without a good
        value of a signal has ``n = 0`` and no mean.
        """
        values = [
            (r.t_s, r.signal, r.n, _finite(r.mean), _finite(r.min), _finite(r.max)) for r in rows
        ]
        if not values:
            return 0
        with _Transaction(self.db):
            self.db.executemany(
                "INSERT OR REPLACE INTO aggregates (t_s, signal, n, mean, min, max) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                values,
            )
        return len(values)

    def add_disturbance(
        self,
        fault_code: str,
        cfg_path: Path,
        dat_path: Path,
        n_samples: int,
        *,
        t_utc: float | None = None,
    ) -> int:
        """Index a disturbance record whose files are already written and synced."""
        size = cfg_path.stat().st_size + dat_path.stat().st_size
        with _Transaction(self.db):
            cursor = self.db.execute(
                "INSERT INTO disturbances (t_utc, fault_code, cfg_path, dat_path, n_samples, "
                "size_bytes) VALUES (?, ?, ?, ?, ?, ?)",
                (_now(t_utc), fault_code, str(cfg_path), str(dat_path), n_samples, size),
            )
        return int(cursor.lastrowid)

    # -- reads ------------------------------------------------------------

    def events(self, *, after_id: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Return up to ``limit`` events with an id above ``after_id``, oldest first."""
        rows = self.db.execute(
            "SELECT id, t_utc, kind, severity, source, message, data FROM events "
            "WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [
            {
                "id": r[0],
                "t_utc": r[1],
                "kind": r[2],
                "severity": r[3],
                "source": r[4],
                "message": r[5],
                "data": None if r[6] is None else json.loads(r[6]),
            }
            for r in rows
        ]

    def faults(self, *, active_only: bool = False, limit: int = 100) -> list[Fault]:
        """Return faults, newest first."""
        where = f"WHERE {_ACTIVE_FAULT}" if active_only else ""
        # Only constant text is formatted into the query; values are bound.
        query = (
            "SELECT id, code, source, message, latched, raised_utc, cleared_utc, reset_utc, "  # noqa: S608
            f"reset_by FROM faults {where} ORDER BY id DESC LIMIT ?"
        )
        rows = self.db.execute(query, (limit,)).fetchall()
        return [Fault(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7], r[8]) for r in rows]

    def aggregates(self, signal: str, t_from_s: int, t_to_s: int) -> list[Aggregate]:
        """Return the aggregates of ``signal`` with ``t_from_s <= t_s < t_to_s``."""
        rows = self.db.execute(
            "SELECT t_s, signal, n, mean, min, max FROM aggregates "
            "WHERE signal = ? AND t_s >= ? AND t_s < ? ORDER BY t_s",
            (signal, t_from_s, t_to_s),
        ).fetchall()
        return [Aggregate(*r) for r in rows]

    def disturbances(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, t_utc, fault_code, cfg_path, dat_path, n_samples, size_bytes "
            "FROM disturbances ORDER BY id"
        ).fetchall()
        keys = ("id", "t_utc", "fault_code", "cfg_path", "dat_path", "n_samples", "size_bytes")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def used_bytes(self) -> int:
        """Bytes in use: database pages that hold data, plus the indexed disturbance files."""
        page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        files = self.db.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM disturbances").fetchone()
        return (pages - free) * page_size + int(files[0])

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check``; returns ``"ok"`` for a sound database."""
        rows = self.db.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)

    # -- retention --------------------------------------------------------

    def enforce_retention(self, *, now_utc: float | None = None) -> RetentionResult:
        """Delete what is older than ``max_age_s``, then the oldest data until under ``max_bytes``.

        Size pressure removes aggregates first (an hour of the oldest at a
        time), then disturbance records beyond ``max_disturbances`` or oldest
        first, then the oldest events. Active faults are never removed.
        """
        cutoff = _now(now_utc) - self.max_age_s
        with _Transaction(self.db):
            aggregates = self.db.execute(
                "DELETE FROM aggregates WHERE t_s < ?", (math.floor(cutoff),)
            ).rowcount
            events = self.db.execute("DELETE FROM events WHERE t_utc < ?", (cutoff,)).rowcount
            faults = self.db.execute(
                f"DELETE FROM faults WHERE raised_utc < ? AND NOT {_ACTIVE_FAULT}",  # noqa: S608 constant
                (cutoff,),
            ).rowcount
        disturbances = self._drop_disturbances(
            "SELECT id, cfg_path, dat_path FROM disturbances WHERE t_utc < ?", (cutoff,)
        )
        excess = self.db.execute("SELECT COUNT(*) FROM disturbances").fetchone()[0]
        excess -= self.max_disturbances
        if excess > 0:
            disturbances += self._drop_disturbances(
                "SELECT id, cfg_path, dat_path FROM disturbances ORDER BY id LIMIT ?", (excess,)
            )
        self._vacuum()

        while self.used_bytes() > self.max_bytes:
            removed = self._shed_oldest()
            if removed == (0, 0, 0):
                log.warning(
                    "store_over_size",
                    path=str(self.path),
                    used_bytes=self.used_bytes(),
                    max_bytes=self.max_bytes,
                    hint="only active faults are left; raise service.store_max_mb",
                )
                break
            aggregates += removed[0]
            disturbances += removed[1]
            events += removed[2]
            self._vacuum()
        return RetentionResult(events, faults, aggregates, disturbances)

    def _shed_oldest(self) -> tuple[int, int, int]:
        oldest = self.db.execute("SELECT MIN(t_s) FROM aggregates").fetchone()[0]
        if oldest is not None:
            with _Transaction(self.db):
                count = self.db.execute(
                    "DELETE FROM aggregates WHERE t_s < ?", (oldest + 3600,)
                ).rowcount
            return (count, 0, 0)
        dropped = self._drop_disturbances(
            "SELECT id, cfg_path, dat_path FROM disturbances ORDER BY id LIMIT 1", ()
        )
        if dropped:
            return (0, dropped, 0)
        with _Transaction(self.db):
            count = self.db.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT 1000)"
            ).rowcount
        return (0, 0, count)

    def _drop_disturbances(self, query: str, params: Sequence[Any]) -> int:
        rows = self.db.execute(query, tuple(params)).fetchall()
        for record_id, cfg, dat in rows:
            with _Transaction(self.db):
                self.db.execute("DELETE FROM disturbances WHERE id = ?", (record_id,))
            # Files go after the row is gone: a crash in between leaves an
            # orphan file, never an index row pointing at nothing.
            for name in (cfg, dat):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
        return len(rows)

    def _vacuum(self) -> None:
        """Give free pages back to the file system, at most ``_VACUUM_PAGES`` per call."""
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        # Python's sqlite3 (3.11, SQLite 3.40) steps this pragma once per
        # execute(), and each step frees one page, so it runs once per page.
        with _Transaction(self.db):
            for _ in range(min(free, _VACUUM_PAGES)):
                self.db.execute("PRAGMA incremental_vacuum(1)")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    """Set the pragmas, create the schema on a new database, and check its version."""
    # auto_vacuum must be chosen before the first table exists; on an
    # existing database the pragma is a no-op.
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise StoreError(
            f"{path}: SQLite could not switch to WAL mode (journal_mode is {mode!r}); "
            "the file system must support shared memory (no NFS)"
        )
    db.execute("PRAGMA synchronous = FULL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        # executescript() commits first, so the transaction is in the script.
        db.executescript(
            f"BEGIN IMMEDIATE;\n{_SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
        )
    elif version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {version}, this bessgw reads version "
            f"{SCHEMA_VERSION}; move the file away to start a new store"
        )


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


def _now(t_utc: float | None) -> float:
    return time.time() if t_utc is None else t_utc


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
