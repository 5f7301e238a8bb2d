"""Scripted Modbus peers for the transaction-engine tests: a raw TCP server and a pty pair.

Both run on this machine only: the TCP server listens on 127.0.0.1 on a port
the OS picks, and the pty pair lives in this process. Each is an async
context manager that stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import tty
from collections.abc import Awaitable, Callable, Iterator

import structlog

#: ``handler(request_adu, writer)`` decides what the server sends back, if anything.
TcpHandler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


def register_response(request: bytes, words: list[int]) -> bytes:
    """Build the MBAP response to a read request ADU, carrying ``words``."""
    pdu = bytes((request[7], 2 * len(words))) + struct.pack(f">{len(words)}H", *words)
    return request[:4] + struct.pack(">HB", len(pdu) + 1, request[6]) + pdu


@contextlib.contextmanager
def captured_events() -> Iterator[list[dict]]:
    """Capture structlog events under the default configuration, then restore the previous one.

    A test that ran the CLI may leave structlog filtering below WARNING, which
    would hide INFO events from ``capture_logs``. Loggers bound before the
    block keep that configuration, so build the objects under test inside it.
    """
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        with structlog.testing.capture_logs() as events:
            yield events
    finally:
        structlog.configure(**saved)


def free_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ScriptedTcpServer:
    """A raw Modbus TCP server on 127.0.0.1 that hands each request ADU to ``handler``.

    ``requests`` records every request ADU in arrival order. Requests are
    read by the MBAP length, so the handler always receives whole ADUs.
    """

    def __init__(self, handler: TcpHandler, port: int = 0) -> None:
        self.handler = handler
        self.port = port
        self.requests: list[bytes] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop_listening(self) -> None:
        """Stop accepting connections (new connects are refused); keep existing ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def close_connections(self) -> None:
        for writer in list(self._writers):
            writer.close()

    async def stop(self) -> None:
        self.close_connections()
        await self.stop_listening()
        if self._tasks:
            # Closed connections end their tasks; cancel only what hangs in a handler.
            _, hanging = await asyncio.wait(list(self._tasks), timeout=2.0)
            for task in hanging:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def __aenter__(self) -> ScriptedTcpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                header = await reader.readexactly(6)
                (length,) = struct.unpack_from(">H", header, 4)
                request = header + await reader.readexactly(length)
                self.requests.append(request)
                await self.handler(request, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()


class PtyPeer:
    """The far end of a pseudo-terminal pair: the link opens :attr:`path`, the test is the device.

    :meth:`read_request` collects bytes from the master side until ``size``
    have arrived; :meth:`send` writes bytes as the device would.
    """

    def __init__(self) -> None:
        self.master_fd, self.slave_fd = os.openpty()
        tty.setraw(self.slave_fd)
        os.set_blocking(self.master_fd, False)
        self.path = os.ttyname(self.slave_fd)
        self._received = bytearray()
        self._arrived = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.master_fd, self._on_readable)
        self._closed = False

    def _on_readable(self) -> None:
        try:
            data = os.read(self.master_fd, 4096)
        except OSError:
            # EIO: no process has the slave side open right now.
            return
        self._received += data
        self._arrived.set()

    async def read_request(self, size: int, timeout_s: float = 5.0) -> bytes:
        await asyncio.wait_for(self._wait_for(size), timeout_s)
        request = bytes(self._received[:size])
        del self._received[:size]
        return request

    async def _wait_for(self, size: int) -> None:
        while len(self._received) < size:
            self._arrived.clear()
            await self._arrived.wait()

    def send(self, data: bytes) -> None:
        os.write(self.master_fd, data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.master_fd)
        os.close(self.master_fd)
        os.close(self.slave_fd)
