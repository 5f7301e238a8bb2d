"""A small PCS model behind RegisterServer, for the PCS driver and CLI tests.

:class:`SimulatedPcs` makes the measured power ``W`` of the pcs-sunspec
profile follow the setpoint ``WSet`` while ``Conn`` and ``WSet_Ena`` are 1,
and drops it to 0 W when ``WSet`` is not written for ``WSet_RvrtTms``
seconds, as a PCS with a reversion timer does.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from pymodbus.constants import ExcCodes

from drivers.modbus.profile import load_profile
from drivers.modbus.server import RegisterServer, RegisterWrite

PROFILE = load_profile("pcs-sunspec")


class SimulatedPcs:
    """PCS behaviour behind the register server, updated every 20 ms by :meth:`run`."""

    def __init__(self, server: RegisterServer) -> None:
        self.server = server
        #: Every write: (monotonic time, point names, registers).
        self.writes: list[tuple[float, tuple[str, ...], tuple[int, ...]]] = []
        self.last_setpoint_write_s: float | None = None
        self.reverted = False
        #: When set, the PCS limits WSet to this many W (a derated unit).
        self.clamp_w: float | None = None
        #: Point name -> exception code the PCS returns for a write of that point.
        self.reject: dict[str, ExcCodes] = {}

    def on_write(self, write: RegisterWrite) -> ExcCodes | None:
        now_s = time.monotonic()
        for name in write.point_names:
            if name in self.reject:
                return self.reject[name]
        self.writes.append((now_s, write.point_names, write.words))
        if "WSet" in write.point_names:
            self.last_setpoint_write_s = now_s
            self.reverted = False
            value = self.server.get_point("WSet")
            if self.clamp_w is not None and value is not None and value > self.clamp_w:
                self.server.set_point("WSet", self.clamp_w)
        return None

    def words_written(self, name: str) -> list[tuple[int, ...]]:
        return [words for _, names, words in self.writes if name in names]

    def update(self) -> None:
        revert_s = self.server.get_point("WSet_RvrtTms")
        last_s = self.last_setpoint_write_s
        if revert_s and last_s is not None and time.monotonic() - last_s > revert_s:
            self.reverted = True
        enabled = self.server.get_point("Conn") == 1 and self.server.get_point("WSet_Ena") == 1
        setpoint_w = self.server.get_point("WSet") or 0
        self.server.set_point("W", setpoint_w if enabled and not self.reverted else 0)

    async def run(self) -> None:
        while True:
            self.update()
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def pcs_server(unit_id: int = 1, profile=PROFILE):
    """Serve ``profile`` on 127.0.0.1; the power model runs only for pcs-sunspec."""
    server = RegisterServer(profile, unit_id=unit_id)
    model = SimulatedPcs(server)
    server.on_write = model.on_write
    port = await server.start_tcp("127.0.0.1", 0)
    task = None
    if profile is PROFILE:
        task = asyncio.get_running_loop().create_task(model.run())
    try:
        yield server, model, port
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.stop()


class ServerThread:
    """Run :func:`pcs_server` on its own event loop in a thread.

    For tests of code that calls ``asyncio.run`` itself, such as the CLI.
    Use it as a context manager; :meth:`call` runs a function on the
    server's loop, because RegisterServer is not thread-safe.
    """

    def __init__(self, unit_id: int = 1) -> None:
        self.unit_id = unit_id
        self.port = 0
        self.server: RegisterServer | None = None
        self.model: SimulatedPcs | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="pcs-server", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10.0):
            raise TimeoutError("the PCS simulator thread did not start within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10.0)

    def call(self, function, *args):
        """Run ``function(*args)`` on the server's loop and return its result."""
        assert self._loop is not None

        async def run():
            return function(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(5.0)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with pcs_server(self.unit_id) as (server, model, port):
                self.server, self.model, self.port = server, model, port
                self._ready.set()
                await self._stop.wait()
        except Exception as err:  # reported to the test thread by __enter__
            self._error = err
            self._ready.set()
