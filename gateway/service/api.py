"""Local operator API: newline-delimited JSON over a Unix stream socket.

One request per line, one response line per request, in order::

    -> {"id": 7, "method": "set_cap", "params": {"cap_kw": 900, "expires_in_s": 3600}}
    <- {"id": 7, "ok": true, "result": {"cap_kw": 900.0, "expires_utc": 1796400000.0}}
    <- {"id": 8, "ok": false, "error": {"code": "invalid_params", "message": "..."}}

``id`` is optional and echoed back unchanged. Error codes: ``parse_error``
(not JSON), ``invalid_request`` (not an object, or no ``method``),
``unknown_method``, ``invalid_params``, ``rejected`` (the daemon refused the
action in its current state, for example a manual setpoint while faulted),
``internal_error``. Parameters are validated here, with pydantic models that
forbid unknown keys, before a handler receives them.

Access control is the socket file itself: mode 0660, group ``bessgw`` when
that group exists. There is no network listener. Each operator action is
logged with the peer's uid from ``SO_PEERCRED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = structlog.get_logger(__name__)

SOCKET_MODE = 0o660
SOCKET_GROUP = "bessgw"
#: Maximum request line length in bytes; a longer line closes the connection.
MAX_LINE_BYTES = 64 * 1024
MAX_CLIENTS = 16
#: A connection that sends nothing for this long is closed.
IDLE_TIMEOUT_S = 60.0
MAX_CAP_OVERRIDE_S = 7 * 86400.0


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NoParams(_Params):
    pass


class FaultsParams(_Params):
    active_only: bool = False
    limit: int = Field(default=100, ge=1, le=10_000)


class EventsParams(_Params):
    after_id: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1, le=10_000)


class SetModeParams(_Params):
    """``auto`` runs the control law; ``manual`` holds ``manual_kw`` (total PCS power,
    +discharge) within every limit and interlock; ``standby`` commands 0 kW."""

    mode: Literal["auto", "manual", "standby"]
    manual_kw: float | None = None
    operator: str = Field(default="unknown", min_length=1, max_length=64)


class SetCapParams(_Params):
    """Grid import cap override that replaces the planner's cap until it expires."""

    cap_kw: float = Field(gt=0)
    expires_in_s: float = Field(gt=0, le=MAX_CAP_OVERRIDE_S)
    operator: str = Field(default="unknown", min_length=1, max_length=64)


class OperatorParams(_Params):
    operator: str = Field(default="unknown", min_length=1, max_length=64)


class JobHintParams(_Params):
    """A job scheduler's notice of a planned job, for the load forecast.

    Times are UNIX seconds or ISO 8601 strings with a zone. The forecast's
    hint parser checks the values, so this model fixes only keys and types.
    """

    job_id: str = Field(min_length=1, max_length=128)
    start_utc: float | str
    end_utc: float | str | None = None
    nodes: int = Field(default=1, ge=1)
    expected_kw: float = Field(ge=0)


class DemandResponseParams(_Params):
    """Reduce grid import by ``reduce_kw`` from ``start_utc`` to ``end_utc``."""

    event_id: str = Field(min_length=1, max_length=128)
    start_utc: float
    end_utc: float
    reduce_kw: float = Field(gt=0)


class StallParams(_Params):
    """Test hook: make the fast loop's next tick busy-wait this long."""

    duration_ms: float = Field(gt=0, le=60_000)


class PlannerInputParams(_Params):
    """Test hook: replace one of the planner's measured inputs for its next ``runs`` runs."""

    field: Literal["grid_kw", "net_load_kw", "battery_kw", "renewable_kw", "soc_pct"]
    value: float
    runs: int = Field(default=1, ge=1, le=10_000)


#: Every method, with the model its ``params`` must match.
METHODS: dict[str, type[_Params]] = {
    "status": NoParams,
    "measurements": NoParams,
    "faults": FaultsParams,
    "events": EventsParams,
    "set_mode": SetModeParams,
    "set_cap": SetCapParams,
    "clear_cap": OperatorParams,
    "reset_faults": OperatorParams,
    "add_job_hint": JobHintParams,
    "add_dr_event": DemandResponseParams,
    # Served only when the daemon starts with BESSGW_TEST_HOOKS=1 in its environment.
    "test_stall_loop": StallParams,
    "test_planner_input": PlannerInputParams,
}

Handler = Callable[[Any, int | None], Awaitable[dict[str, Any]]]


class ApiRejectedError(Exception):
    """Raised by a handler when the daemon refuses a valid request in its current state."""


class ApiParamsError(Exception):
    """Raised by a handler whose own checks reject the parameters (``invalid_params``)."""


class ApiError(Exception):
    """An error response received by :class:`ApiClient`."""

    def __init__(self, method: str, code: str, message: str) -> None:
        super().__init__(f"{method}: {code}: {message}")
        self.method = method
        self.code = code
        self.message = message


class ApiServer:
    """Serve :data:`METHODS` on a Unix socket, each dispatched to its handler.

    ``handlers`` maps a method name to ``async handler(params, peer_uid) ->
    dict``; ``params`` is the validated model instance. A request for a method
    without a handler gets the error code ``unknown_method``.
    """

    def __init__(self, path: str | Path, handlers: Mapping[str, Handler]) -> None:
        unknown = sorted(set(handlers) - set(METHODS))
        if unknown:
            raise ValueError(f"handlers for unknown API methods: {unknown}")
        self.path = Path(path)
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self._slots = asyncio.Semaphore(MAX_CLIENTS)
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind the socket (mode 0660, group ``bessgw`` if it exists) and start serving."""
        sock = _bind_socket(self.path)
        self._server = await asyncio.start_unix_server(
            self._serve_connection, sock=sock, limit=MAX_LINE_BYTES
        )
        log.info("api_listening", socket=str(self.path), mode=oct(SOCKET_MODE))

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer_uid = _peer_uid(writer)
        try:
            if self._slots.locked():
                await _send(writer, _error(None, "rejected", f"more than {MAX_CLIENTS} clients"))
                return
            async with self._slots:
                await self._serve_lines(reader, writer, peer_uid)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_lines(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer_uid: int | None
    ) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
            except asyncio.TimeoutError:
                return
            except ValueError:
                # StreamReader raises ValueError when a line exceeds its limit.
                await _send(
                    writer,
                    _error(
                        None, "invalid_request", f"request line longer than {MAX_LINE_BYTES} bytes"
                    ),
                )
                return
            if not line:
                return
            if not line.strip():
                continue
            response = await self.handle_line(line, peer_uid)
            await _send(writer, response)

    async def handle_line(self, line: bytes, peer_uid: int | None = None) -> dict[str, Any]:
        """Parse, validate and dispatch one request line; return the response object.

        Every error response is logged once, with its code and the peer's uid.
        """
        response = await self._dispatch(line, peer_uid)
        if not response["ok"]:
            error = response["error"]
            log.warning(
                "api_request_failed",
                code=error["code"],
                error=error["message"],
                request_id=response["id"],
                peer_uid=peer_uid,
            )
        return response

    async def _dispatch(self, line: bytes, peer_uid: int | None) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return _error(None, "parse_error", f"request is not valid JSON: {err}")
        if not isinstance(request, dict):
            return _error(None, "invalid_request", "request must be a JSON object")

        request_id = request.get("id")
        method = request.get("method")
        if not isinstance(method, str):
            return _error(request_id, "invalid_request", "request needs a string 'method'")
        extra = sorted(set(request) - {"id", "method", "params"})
        if extra:
            return _error(request_id, "invalid_request", f"unknown request keys {extra}")
        handler = self.handlers.get(method)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return _error(request_id, "unknown_method", f"no method {method!r}; known: {known}")

        raw_params = request.get("params") or {}
        if not isinstance(raw_params, dict):
            return _error(request_id, "invalid_params", "'params' must be a JSON object")
        try:
            params = METHODS[method].model_validate(raw_params)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}"
                for e in err.errors(include_url=False)
            )
            return _error(request_id, "invalid_params", problems)

        try:
            result = await handler(params, peer_uid)
        except ApiRejectedError as err:
            return _error(request_id, "rejected", str(err))
        except ApiParamsError as err:
            return _error(request_id, "invalid_params", str(err))
        except Exception as err:
            log.exception("api_handler_failed", method=method, peer_uid=peer_uid)
            return _error(request_id, "internal_error", f"{type(err).__name__}: {err}")
        return {"id": request_id, "ok": True, "result": result}


class ApiClient:
    """Blocking client for the CLI: one connection, one request at a time."""

    def __init__(self, path: str | Path, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._next_id = 1

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one request and return its ``result``; raise :class:`ApiError` on an error reply.

        Connection problems raise ``ConnectionError`` (or ``TimeoutError``)
        with a message that names what to check.
        """
        request = {"id": self._next_id, "method": method, "params": params}
        self._next_id += 1
        data = (json.dumps(request) + "\n").encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(str(self.path))
            except FileNotFoundError as err:
                raise ConnectionError(
                    f"API socket {self.path} not found; is `bessgw run` running, and is "
                    "service.api_socket the same path?"
                ) from err
            except PermissionError as err:
                raise ConnectionError(
                    f"no permission to connect to {self.path}; run as root or as a member "
                    f"of group {SOCKET_GROUP!r}"
                ) from err
            except ConnectionRefusedError as err:
                raise ConnectionError(
                    f"connection to {self.path} refused; the daemon is not running "
                    "(the socket file is left over)"
                ) from err
            except TimeoutError as err:
                raise TimeoutError(
                    f"connecting to {self.path} timed out after {self.timeout_s} s"
                ) from err
            try:
                sock.sendall(data)
                line = _read_line(sock)
            except TimeoutError as err:
                raise TimeoutError(
                    f"{method}: no reply from {self.path} within {self.timeout_s} s"
                ) from err
        try:
            response = json.loads(line)
        except json.JSONDecodeError as err:
            raise ApiError(method, "parse_error", f"reply is not JSON: {line[:200]!r}") from err
        if not response.get("ok"):
            error = response.get("error") or {}
            raise ApiError(method, error.get("code", "?"), error.get("message", "no message"))
        return response.get("result") or {}


def socket_group_id() -> int | None:
    """Return the gid of group ``bessgw``, or None where the group does not exist."""
    try:
        return grp.getgrnam(SOCKET_GROUP).gr_gid
    except KeyError:
        return None


def _bind_socket(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        _remove_stale_socket(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a umask that already gives 0660, so there is no moment at
    # which the socket is reachable with wider permissions.
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    except OSError as err:
        sock.close()
        raise OSError(
            err.errno,
            f"cannot bind the API socket {path}: {err.strerror}; check that "
            f"{path.parent} exists and the service user may write to it",
        ) from err
    finally:
        os.umask(old_umask)
    os.chmod(path, SOCKET_MODE)
    gid = socket_group_id()
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            log.warning(
                "api_socket_group_not_set",
                socket=str(path),
                group=SOCKET_GROUP,
                hint="the service user is not a member of the group; only it can use the API",
            )
    sock.listen(MAX_CLIENTS)
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: Path) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        log.info("api_stale_socket_removed", socket=str(path))
        return
    except OSError as err:
        raise OSError(
            err.errno, f"{path} exists and is not a usable socket ({err.strerror}); remove it"
        ) from err
    finally:
        probe.close()
    raise OSError(
        f"another process is serving the API at {path}; stop it before starting another daemon"
    )


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the daemon closed the API connection before replying")
        chunks.append(chunk)
        if b"\n" in chunk:
            return b"".join(chunks).split(b"\n", 1)[0]


def _error(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


async def _send(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
    writer.write((json.dumps(response, default=str) + "\n").encode("utf-8"))
    await writer.drain()
