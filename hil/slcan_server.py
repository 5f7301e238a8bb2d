"""An slcan adapter on a TCP socket, for a simulated BMS that a gateway opens as ``socket://``.

python-can's ``slcan`` interface opens its channel with pyserial's
``serial_for_url``, so ``socket://127.0.0.1:PORT`` reaches this server as if
it were a USB-serial CAN adapter. On opening, python-can 4.6 sends ``C``,
``S6`` (500 kbit/s), an empty command (the CAN FD data bit rate, unset) and
``O``, each ended by ``\\r``. The server replies to every command the way a
Lawicel-style adapter does, ``\\r`` for success and ``\\a`` (BEL) for an
unknown command, and sends frames as ``tIIILDD..\\r`` lines only to clients
whose channel is open::

    C / O / L    close / open / open listen-only     -> \\r
    Sn / sXXYY   bit rate                            -> \\r
    V / v / N    versions, serial number             -> V1013\\r, vSIM\\r, NSIM1\\r
    F            status flags                        -> F00\\r
    t.. / T..    transmit a frame (dropped)          -> z\\r / Z\\r
    other                                            -> \\a

Every connection gets the same frames. The server listens on 127.0.0.1 by
default and stops with :meth:`SlcanTcpServer.stop`, which also closes every
client.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

log = structlog.get_logger(__name__)

#: Maximum length of a command line; a longer run without ``\r`` is dropped as garbage.
_MAX_COMMAND_BYTES = 64
_FIXED_REPLIES = {
    b"V": b"V1013\r",
    b"v": b"vSIM\r",
    b"N": b"NSIM1\r",
    b"F": b"F00\r",
}


def slcan_line(frame_id: int, data: bytes, is_extended: bool = False) -> bytes:
    """Encode one CAN data frame as an slcan line, such as ``t3518140274...\\r``."""
    if len(data) > 8:
        raise ValueError(f"CAN frame 0x{frame_id:X} has {len(data)} data bytes; the maximum is 8")
    limit = 0x1FFFFFFF if is_extended else 0x7FF
    if not 0 <= frame_id <= limit:
        raise ValueError(f"CAN id 0x{frame_id:X} does not fit a {29 if is_extended else 11}-bit id")
    head = f"T{frame_id:08X}" if is_extended else f"t{frame_id:03X}"
    return f"{head}{len(data)}{data.hex().upper()}\r".encode("ascii")


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.open = False


class SlcanTcpServer:
    """An slcan adapter that serves CAN frames to every TCP client that opened the channel."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port: int | None = None
        #: Commands received, oldest first (for tests and logs).
        self.commands: list[bytes] = []
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """The pyserial URL a client opens, ``socket://127.0.0.1:PORT``."""
        if self.port is None:
            raise RuntimeError(f"slcan server {self.name} is not started")
        return f"socket://127.0.0.1:{self.port}"

    @property
    def open_clients(self) -> int:
        return sum(1 for client in self._clients if client.open)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host``:``port`` (0 picks a free port); return the port."""
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("slcan simulator listening", device=self.name, host=host, port=self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every client connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for client in list(self._clients):
            client.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
            log.info("slcan simulator stopped", device=self.name, port=self.port)

    def broadcast(self, lines: bytes) -> int:
        """Write ``lines`` to every client whose channel is open; return how many got them."""
        sent = 0
        for client in self._clients:
            if client.open and not client.writer.is_closing():
                client.writer.write(lines)
                sent += 1
        return sent

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = _Client(writer)
        self._clients.add(client)
        peer = writer.get_extra_info("peername")
        log.info("slcan client connected", device=self.name, peer=str(peer))
        buffer = bytearray()
        try:
            while True:
                chunk = await reader.read(256)
                if not chunk:
                    break
                buffer += chunk
                *commands, rest = bytes(buffer).split(b"\r")
                buffer = bytearray(rest if len(rest) <= _MAX_COMMAND_BYTES else b"")
                for command in commands:
                    writer.write(self._answer(client, command))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(client)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            log.info("slcan client disconnected", device=self.name, peer=str(peer))

    def _answer(self, client: _Client, command: bytes) -> bytes:
        self.commands.append(command)
        head = command[:1]
        if command in (b"O", b"L"):
            client.open = True
            return b"\r"
        if command == b"C":
            client.open = False
            return b"\r"
        if command == b"" or head in (b"S", b"s", b"Y", b"Z", b"M", b"m"):
            return b"\r"
        if command in _FIXED_REPLIES:
            return _FIXED_REPLIES[command]
        if head in (b"t", b"r"):
            return b"z\r"
        if head in (b"T", b"R"):
            return b"Z\r"
        return b"\a"
