"""Device poller: read one Modbus device's profile at a fixed rate and keep its readings.

A :class:`ModbusDevice` plans its reads once, from the profile, and then
polls block by block over a shared :class:`~drivers.modbus.link.ModbusLink`.
What each failure does to the readings and to the polling:

* Exception 01, 02 or 03 (the request is wrong for this device): the block's
  points become COMM_ERROR, and the block is skipped for
  ``rejected_block_retry_s`` while the other blocks go on.
* Exception 05 or 06 (acknowledge, busy): the block's points become
  COMM_ERROR and the block is repeated up to ``busy_retries`` times in the
  same poll.
* Exception 04, or an invalid frame: the block's points become COMM_ERROR.
* Exception 0A or 0B (a gateway reports the unit unreachable), or a timeout:
  this block and every later one become COMM_ERROR and the poll ends;
  :meth:`ModbusDevice.run` backs off while the link stays up.
* Link down: this block and every later one become COMM_ERROR and the poll
  ends. The next poll runs on time and fails fast until the link is back.

A failed read never keeps the last value. A GOOD reading older than
``stale_s`` reads as STALE from :meth:`ModbusDevice.readings`. The device
logs one line when it goes offline (with the reason), one when it is back,
and one when a block is rejected or readable again. Repeats log nothing.
"""

from __future__ import annotations

import asyncio
import enum
import math
import random
import time
from collections.abc import Callable

import structlog

from drivers.modbus import codec
from drivers.modbus.block_decoder import BlockDecoder
from drivers.modbus.errors import (
    ModbusConnectError,
    ModbusError,
    ModbusExceptionResponse,
    ModbusFrameError,
    ModbusTimeout,
    ModbusWriteVerifyError,
)
from drivers.modbus.link import Backoff, ModbusLink
from drivers.modbus.planner import ReadBlock, plan_reads
from drivers.modbus.profile import SCALE_FACTOR_RANGE, Point, Profile
from drivers.quality import Quality, Reading

log = structlog.get_logger(__name__)

#: Exception codes meaning that the request itself is wrong for this device.
_REJECTED_CODES = (0x01, 0x02, 0x03)
#: Exception codes meaning "not now": acknowledge and busy.
_RETRY_CODES = (0x05, 0x06)

#: ``store_callback(device_name, readings)`` receives every poll's readings.
StoreCallback = Callable[[str, dict[str, Reading]], None]


class DeviceState(str, enum.Enum):
    #: Not polled yet.
    UNKNOWN = "unknown"
    ONLINE = "online"
    #: Requests time out.
    NOT_RESPONDING = "not_responding"
    #: A gateway reports the unit behind it unreachable (exception 0A or 0B).
    UNREACHABLE = "unreachable"
    #: The link to the device (or to its gateway) is down.
    LINK_DOWN = "link_down"


class _BlockStatus:
    __slots__ = ("rejected", "retry_at_mono_s")

    def __init__(self) -> None:
        self.rejected = False
        self.retry_at_mono_s = 0.0


class ModbusDevice:
    """One Modbus device polled at its own period over a shared link.

    ``poll_period_s``, ``timeout_s`` (per request) and ``stale_s`` are
    seconds, and ``stale_s`` defaults to three poll periods. ``backoff``
    spaces the polls of a device that times out or that a gateway reports
    unreachable. It defaults to the poll period, doubling up to 30 s. Raises
    ``ValueError`` for settings out of range or a profile the planner cannot
    split into reads.
    """

    def __init__(  # noqa: PLR0917 - the first seven are what every device needs, in this order
        self,
        name: str,
        profile: Profile,
        link: ModbusLink,
        unit_id: int,
        poll_period_s: float,
        timeout_s: float,
        stale_s: float | None = None,
        *,
        backoff: Backoff | None = None,
        busy_retries: int = 2,
        busy_retry_s: float | None = None,
        rejected_block_retry_s: float = 60.0,
    ) -> None:
        if poll_period_s <= 0 or timeout_s <= 0:
            raise ValueError(
                f"device {name!r}: poll_period_s and timeout_s must be positive, got "
                f"{poll_period_s} and {timeout_s}"
            )
        if stale_s is not None and stale_s <= 0:
            raise ValueError(f"device {name!r}: stale_s must be positive, got {stale_s}")
        if busy_retries < 0:
            raise ValueError(f"device {name!r}: busy_retries must be 0 or more, got {busy_retries}")
        try:
            link.check_unit(unit_id)
        except ValueError as err:
            raise ValueError(f"device {name!r}: {err}") from err

        self.name = name
        self.profile = profile
        self.link = link
        self.unit_id = unit_id
        self.poll_period_s = poll_period_s
        self.timeout_s = timeout_s
        self.stale_s = 3 * poll_period_s if stale_s is None else stale_s
        self.backoff = backoff or Backoff(initial_s=poll_period_s, max_s=max(30.0, poll_period_s))
        self.busy_retries = busy_retries
        self.busy_retry_s = min(0.1, poll_period_s / 4) if busy_retry_s is None else busy_retry_s
        self.rejected_block_retry_s = rejected_block_retry_s

        #: The reads of one poll, planned once from the profile.
        self.blocks: tuple[ReadBlock, ...] = tuple(
            plan_reads(profile.points, profile.max_gap_regs, profile.max_block_regs)
        )
        self._decoders = tuple(BlockDecoder(block) for block in self.blocks)

        self.state = DeviceState.UNKNOWN
        #: Why the device last went offline.
        self.last_error: ModbusError | None = None
        #: ``time.monotonic()`` before which :meth:`run` does not poll (backoff).
        self.retry_at_mono_s = 0.0
        self.polls = 0
        #: Deadlines :meth:`run` missed because a poll took longer than the period.
        self.overruns = 0
        #: Duration of the last poll in :meth:`run`, including the store callback.
        self.cycle_time_s = 0.0

        self._offline_polls = 0
        self._rng = random.Random()
        self._blocks_status = [_BlockStatus() for _ in self.blocks]
        self._log = log.bind(device=name, unit=unit_id, link=link.name)
        started_mono_s = time.monotonic()
        self._readings = {
            point.name: Reading.bad(Quality.STALE, started_mono_s, point.unit)
            for point in profile.points
        }

    # ------------------------------------------------------------------ polling

    async def poll_once(self) -> dict[str, Reading]:
        """Read every block once and return the readings, aged at the end of the poll.

        A timeout, an exception response, an invalid frame or a link that is
        down raises nothing. Each becomes the qualities that the module
        docstring lists, and a :attr:`state`.
        """
        self.polls += 1
        started_mono_s = time.monotonic()
        answered = False
        for index, block in enumerate(self.blocks):
            status = self._blocks_status[index]
            if status.retry_at_mono_s > time.monotonic():
                continue
            try:
                data = await self._read_block(block)
            except ModbusExceptionResponse as err:
                answered = True
                self._mark(self.blocks[index : index + 1], Quality.COMM_ERROR)
                if err.device_unreachable:
                    self._mark(self.blocks[index:], Quality.COMM_ERROR)
                    self._go_offline(DeviceState.UNREACHABLE, err)
                    return self.readings()
                if err.code in _REJECTED_CODES:
                    self._reject_block(index, err)
                continue
            except ModbusFrameError:
                self._mark(self.blocks[index : index + 1], Quality.COMM_ERROR)
                continue
            except ModbusTimeout as err:
                self._mark(self.blocks[index:], Quality.COMM_ERROR)
                self._go_offline(DeviceState.NOT_RESPONDING, err)
                return self.readings()
            except ModbusConnectError as err:
                self._mark(self.blocks[index:], Quality.COMM_ERROR)
                self._go_offline(DeviceState.LINK_DOWN, err)
                return self.readings()
            answered = True
            self._readings.update(self._decoders[index].decode_bytes(data, time.monotonic()))
            if status.rejected:
                status.rejected = False
                self._log.info("modbus block readable again", **_block_fields(block))
        if answered:
            self._go_online()
        if time.monotonic() - started_mono_s < self.stale_s:
            # Every block was read in this poll or holds COMM_ERROR: nothing can be stale.
            return dict(self._readings)
        return self.readings()

    async def run(self, store_callback: StoreCallback) -> None:
        """Poll forever on absolute monotonic deadlines and hand each poll's readings to the store.

        A deadline that falls inside a backoff passes the readings on without
        polling, so the store still receives them as they age. Deadlines missed by a slow
        poll are skipped and counted in :attr:`overruns`. Cancel the task to stop.
        """
        next_mono_s = time.monotonic()
        while True:
            started_mono_s = time.monotonic()
            if started_mono_s >= self.retry_at_mono_s:
                await self.poll_once()
            store_callback(self.name, self.readings())
            finished_mono_s = time.monotonic()
            self.cycle_time_s = finished_mono_s - started_mono_s
            next_mono_s += self.poll_period_s
            if finished_mono_s > next_mono_s:
                missed = math.floor((finished_mono_s - next_mono_s) / self.poll_period_s) + 1
                self.overruns += missed
                next_mono_s += missed * self.poll_period_s
            await asyncio.sleep(next_mono_s - time.monotonic())

    def readings(self, now_mono_s: float | None = None) -> dict[str, Reading]:
        """Return the latest reading of every point, GOOD ones older than ``stale_s`` as STALE."""
        now_mono_s = time.monotonic() if now_mono_s is None else now_mono_s
        stale_s = self.stale_s
        return {name: reading.aged(now_mono_s, stale_s) for name, reading in self._readings.items()}

    async def _read_block(self, block: ReadBlock) -> bytes:
        """Read one block's data bytes, repeating the read after acknowledge or busy responses."""
        retries_left = self.busy_retries
        while True:
            try:
                return await self.link.read_register_bytes(
                    self.unit_id, block.function_code, block.address, block.count, self.timeout_s
                )
            except ModbusExceptionResponse as err:
                if err.code not in _RETRY_CODES or retries_left == 0:
                    raise
                retries_left -= 1
                self._mark((block,), Quality.COMM_ERROR)
                await asyncio.sleep(self.busy_retry_s)

    def _mark(self, blocks: tuple[ReadBlock, ...], quality: Quality) -> None:
        now_mono_s = time.monotonic()
        for block in blocks:
            for point in block.points:
                self._readings[point.name] = Reading.bad(quality, now_mono_s, point.unit)

    def _reject_block(self, index: int, err: ModbusExceptionResponse) -> None:
        status = self._blocks_status[index]
        status.retry_at_mono_s = time.monotonic() + self.rejected_block_retry_s
        if not status.rejected:
            status.rejected = True
            self._log.warning(
                "modbus block rejected",
                **_block_fields(self.blocks[index]),
                code=err.code,
                error=str(err),
                retry_in_s=self.rejected_block_retry_s,
            )

    def _go_offline(self, state: DeviceState, err: ModbusError) -> None:
        self.last_error = err
        if state is not DeviceState.LINK_DOWN:
            # The link fails fast while down, so only a device that costs the
            # shared link a timeout or a gateway round trip is polled less often.
            delay_s = self.backoff.delay_s(self._offline_polls, self._rng)
            self._offline_polls += 1
            self.retry_at_mono_s = time.monotonic() + delay_s
        if state is not self.state:
            self.state = state
            self._log.warning("modbus device offline", reason=state.value, error=str(err))

    def _go_online(self) -> None:
        self._offline_polls = 0
        self.retry_at_mono_s = 0.0
        if self.state is not DeviceState.ONLINE:
            previous, self.state = self.state, DeviceState.ONLINE
            self._log.info("modbus device online", previous=previous.value)

    # ------------------------------------------------------------------ writing

    async def write_point(self, name: str, value: codec.Value) -> None:
        """Write a point's engineering value, then read the registers back and compare.

        The value is checked against the point's range and scaled the way the
        profile defines (a scale factor is read fresh from the device first).
        One register is written with function 6, more with function 16.
        Raises ``ValueError`` for a point that is not writable or a value it
        cannot hold, :class:`ModbusWriteVerifyError` when the read-back
        differs, and the link's errors for a failed request.
        """
        point = self.profile.point(name)
        if not point.writable or point.function != "holding":
            raise ValueError(
                f"device {self.name!r}: point {name!r} is not writable; only holding points "
                "marked writable = true in the profile can be written"
            )
        words = codec.encode(
            await self._raw_value(point, value), point.type, point.order, point.length
        )
        if len(words) == 1:
            await self.link.write_register(self.unit_id, point.address, words[0], self.timeout_s)
        else:
            await self.link.write_registers(self.unit_id, point.address, words, self.timeout_s)
        read_back = await self.link.read(
            self.unit_id, 3, point.address, len(words), self.timeout_s
        )
        if read_back != words:
            raise ModbusWriteVerifyError(
                f"device {self.name!r} ({self.link.name} unit {self.unit_id}): wrote "
                f"{_hex(words)} to {name!r} at address {point.address}, read back "
                f"{_hex(read_back)}; the device may clamp or ignore the value, or another "
                "client wrote the register at the same time"
            )
        self._log.info("modbus point written", point=name, value=value, registers=_hex(words))

    async def _raw_value(self, point: Point, value: codec.Value) -> codec.Value:
        """Turn an engineering value into the raw value the point's registers hold."""
        if point.type == "str":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # ValueError, not TypeError: callers handle every bad value in one place.
            raise ValueError(f"point {point.name!r} takes a number, got {value!r}")  # noqa: TRY004
        if not math.isfinite(value):
            raise ValueError(f"point {point.name!r} takes a finite number, got {value!r}")
        if (point.min is not None and value < point.min) or (
            point.max is not None and value > point.max
        ):
            raise ValueError(
                f"value {value} for point {point.name!r} is outside its range "
                f"{point.min}..{point.max}"
            )
        multiplier: float = point.scale if point.scale is not None else 1
        if point.scale_factor is not None:
            multiplier = 10.0 ** await self._read_scale_factor(point)
        raw = (value - point.offset) / multiplier
        if point.type in ("f32", "f64"):
            return raw
        return round(raw)

    async def _read_scale_factor(self, point: Point) -> int:
        factor = self.profile.point(point.scale_factor or "")
        function = 3 if factor.function == "holding" else 4
        registers = await self.link.read(
            self.unit_id, function, factor.address, factor.count, self.timeout_s
        )
        sf = codec.decode(registers, factor.type, factor.order)
        if codec.is_sentinel_value(sf, factor.type) or not (
            SCALE_FACTOR_RANGE[0] <= sf <= SCALE_FACTOR_RANGE[1]
        ):
            raise ValueError(
                f"device {self.name!r}: scale factor {factor.name!r} of {point.name!r} reads "
                f"{sf}, not a factor in {SCALE_FACTOR_RANGE[0]}..{SCALE_FACTOR_RANGE[1]}; "
                "the point cannot be written until the device reports a valid factor"
            )
        return int(sf)


def _block_fields(block: ReadBlock) -> dict[str, object]:
    return {"function": block.function_code, "address": block.address, "count": block.count}


def _hex(words: list[int]) -> str:
    return " ".join(f"{word:04X}" for word in words)
