"""Several API processes, each with a listening socket of its own (``SO_REUSEPORT``).

uvicorn's workers all accept from the one socket their supervisor bound. Whichever
process is awake first takes a new connection, so a burst of keep-alive connections (a
load balancer's pool, a benchmark's clients) lands mostly on one process: measured on
2 cores with 2 processes, the catalog page was served by one process at one core while
the other idled. With ``SO_REUSEPORT`` each worker listens on a socket of its own bound
to the same address, and the kernel spreads new connections across them by a hash of
the connection's addresses.

The supervisor still binds its socket first (so a port in use stops the start, and port
0 picks the port every worker then binds), but never listens on it: only listening
sockets take part in the kernel's choice. Each worker binds its twin and closes its copy
of the supervisor's. Everything else is uvicorn's ``Multiprocess``: health checks,
replacing a dead worker, draining on SIGTERM.
"""

from __future__ import annotations

import logging
import socket
import sys

from uvicorn import Config
from uvicorn.supervisors import multiprocess

logger = logging.getLogger("uvicorn.error")


def socket_per_worker_supported() -> bool:
    """Whether this system spreads connections across sockets sharing a port (Linux
    since 3.9; other systems with ``SO_REUSEPORT`` only let them share it)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _reuse_port_socket(family: socket.AddressFamily, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(family=family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class ReusePortConfig(Config):
    """uvicorn's configuration, binding its TCP socket with ``SO_REUSEPORT``."""

    def bind_socket(self) -> socket.socket:
        if self.uds or self.fd is not None:
            return super().bind_socket()
        family = socket.AF_INET6 if self.host and ":" in self.host else socket.AF_INET
        try:
            sock = _reuse_port_socket(family, (self.host, self.port))
        except OSError as exc:
            logger.error(exc)
            sys.exit(3)  # uvicorn's STARTUP_FAILURE
        bound = sock.getsockname()
        logger.info(
            "Uvicorn running on http://%s:%d with a socket per worker (Press CTRL+C to quit)",
            bound[0],
            bound[1],
        )
        sock.set_inheritable(True)
        return sock


class ReusePortProcess(multiprocess.Process):
    """A uvicorn worker that serves on a twin of the supervisor's socket."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        # Runs in the worker process (covered by the serve tests, through a subprocess).
        own = []
        for inherited in sockets or []:
            if inherited.family in (socket.AF_INET, socket.AF_INET6):
                own.append(_reuse_port_socket(inherited.family, inherited.getsockname()[:2]))
                inherited.close()
            else:
                own.append(inherited)
        super().target(own)


def run_workers(config: ReusePortConfig) -> None:
    """Serve ``config.workers`` processes, each listening on its own socket."""
    # uvicorn's supervisor makes (and remakes) each worker from this module attribute.
    multiprocess.Process = ReusePortProcess  # type: ignore[misc]
    sock = config.bind_socket()
    try:
        multiprocess.Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
