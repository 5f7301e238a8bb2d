"""Prometheus metrics of the daemon, served by prometheus_client's HTTP server.

The daemon updates these from its supervision cycle (a few times per
second) with values it has already computed, so nothing here runs per 1 kHz
tick. Every metric lives in the :class:`Metrics` object's own registry, so
two daemons in one test process do not collide.
"""

from __future__ import annotations

import contextlib
import threading
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, start_http_server

log = structlog.get_logger(__name__)

STATES = ("init", "standby", "running", "degraded", "fault", "stopping")


class Metrics:
    """The daemon's metrics; each attribute is a prometheus_client metric."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.state = Enum(
            "bessgw_state", "Safety state of the gateway", states=list(STATES), registry=r
        )
        self.mode = Enum(
            "bessgw_mode",
            "Operating mode set by the operator",
            states=["auto", "manual", "standby"],
            registry=r,
        )

        self.loop_ticks = Gauge("bessgw_loop_ticks", "Fast loop ticks since start", registry=r)
        self.loop_missed = Gauge(
            "bessgw_loop_missed_deadlines",
            "Fast loop ticks that woke after their deadline period had passed, since start",
            registry=r,
        )
        self.loop_lateness_p99 = Gauge(
            "bessgw_loop_lateness_p99_seconds",
            "99th percentile of wake lateness over the last drained batch of ticks",
            registry=r,
        )
        self.loop_lateness_max = Gauge(
            "bessgw_loop_lateness_max_seconds", "Largest wake lateness since start", registry=r
        )
        self.loop_compute_p99 = Gauge(
            "bessgw_loop_compute_p99_seconds",
            "99th percentile of tick compute time over the last drained batch",
            registry=r,
        )
        self.loop_ring_overflows = Gauge(
            "bessgw_loop_ring_overflows", "Tick records lost because the ring was full", registry=r
        )
        self.loop_healthy = Gauge(
            "bessgw_loop_healthy", "1 while the fast loop ticks on time, else 0", registry=r
        )

        self.device_up = Gauge(
            "bessgw_device_up",
            "1 while the device answers polls, else 0",
            ["device", "role"],
            registry=r,
        )
        self.device_age = Gauge(
            "bessgw_device_value_age_seconds",
            "Age of the device's newest good value",
            ["device", "role"],
            registry=r,
        )
        self.device_errors = Counter(
            "bessgw_device_poll_errors",
            "Failed polls or receive timeouts",
            ["device", "role"],
            registry=r,
        )

        self.grid_kw = Gauge("bessgw_grid_power_kw", "Grid power, +import", registry=r)
        self.load_kw = Gauge(
            "bessgw_load_power_kw", "Rack and facility load, +consumption", registry=r
        )
        self.renewable_kw = Gauge(
            "bessgw_renewable_power_kw", "On-site renewable generation, +generation", registry=r
        )
        self.pcs_kw = Gauge(
            "bessgw_pcs_power_kw", "PCS measured active power, +discharge", ["device"], registry=r
        )
        self.pcs_setpoint_kw = Gauge(
            "bessgw_pcs_setpoint_kw",
            "PCS commanded active power, +discharge",
            ["device"],
            registry=r,
        )
        self.soc_pct = Gauge(
            "bessgw_soc_percent", "Battery string state of charge", ["device"], registry=r
        )
        self.cap_kw = Gauge("bessgw_grid_cap_kw", "Grid import cap in force", registry=r)
        self.headroom_kw = Gauge(
            "bessgw_headroom_kw",
            "Load the site can add for the next hour without breaking the planned billing cap; "
            "NaN without a plan",
            registry=r,
        )
        self.uncovered_kw = Gauge(
            "bessgw_uncovered_demand_kw",
            "Power above the cap that the battery could not cover",
            registry=r,
        )

        self.faults_active = Gauge(
            "bessgw_faults_active", "Faults raised and not yet cleared or reset", registry=r
        )
        self.faults = Counter("bessgw_faults", "Faults raised since start", ["code"], registry=r)

        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP listener on ``host:port`` and return the bound port.

        ``port`` 0 binds a free port, which tests use; the daemon treats a
        configured port of 0 as "metrics disabled" and does not call this.
        """
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise OSError(
                err.errno,
                f"cannot listen for metrics on {host}:{port}: {err.strerror}; set "
                "service.metrics_port to a free port, or 0 to disable metrics",
            ) from err
        bound = int(self._server.server_port)
        log.info("metrics_listening", host=host, port=bound)
        return bound

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._thread.join(timeout=5.0)
        self._server = None
        self._thread = None
