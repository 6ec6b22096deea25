"""Running the service under uvicorn: several worker processes, each with its own listening socket.

uvicorn's workers share one listening socket, and whichever worker wakes first accepts every connection waiting
on it. A client that opens a few keep-alive connections at once (a load balancer's pool, a benchmark's 8
connections) can so land them all on one worker while the others idle, at half the throughput
(docs/performance-history.md). Here every worker binds its own socket to the same port with SO_REUSEPORT, and the
kernel spreads new connections over the workers' sockets. Everything else (health checks of the workers,
restarts, graceful SIGTERM) is uvicorn's own supervisor, unchanged.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Final

import uvicorn
from uvicorn.supervisors import Multiprocess, multiprocess

from moviematch_ml.errors import ConfigError

PARENT_CHECK_SECONDS: Final[float] = 1.0


def reuse_port_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, listening unless ``listen`` is False."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _OwnSocketServer(uvicorn.Server):
    """A uvicorn server that, given no socket, opens its own SO_REUSEPORT one on the configured host and port,
    and shuts down gracefully if its supervisor dies."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if not sockets:
            sockets = [reuse_port_socket(self.config.host, self.config.port)]
        # A worker's own socket keeps the port open after its supervisor is gone (killed by SIGKILL, or by the
        # OOM killer): without a watch it would go on serving, unsupervised, until the machine restarts.
        threading.Thread(target=self._watch_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
        await super().startup(sockets=sockets)

    def _watch_parent(self, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        self.should_exit = True  # uvicorn's main loop drains the requests in flight and stops


class _OwnSocketProcess(multiprocess.Process):
    """uvicorn's worker process, running ``_OwnSocketServer`` (pickled by reference to this module)."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = _OwnSocketServer(config=self.config)
        return self._server


def run(*, app: str, host: str, port: int, workers: int, factory: bool = True, **options: Any) -> None:
    """Serve the app from the environment (``app_from_env``) on host:port with ``workers`` processes.

    ``app`` and ``factory`` name another ASGI app to serve the same way (the benchmark's ceiling app).
    """
    if workers == 1 or not hasattr(socket, "SO_REUSEPORT"):
        uvicorn.run(app, factory=factory, host=host, port=port, workers=workers, **options)
        return
    # Bound but not listening, it receives no connection; it holds the port for the workers' sockets (which
    # only other SO_REUSEPORT sockets of this user can share) and turns a port in use into a clear error.
    try:
        guard = reuse_port_socket(host, port, listen=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    port = guard.getsockname()[1]  # port 0: the one the system picked, for every worker
    config = uvicorn.Config(app, factory=factory, host=host, port=port, workers=workers, **options)
    # uvicorn's supervisor builds its workers from the module's Process class; this process is only the
    # supervisor, so swapping the class here changes nothing else.
    multiprocess.Process = _OwnSocketProcess  # type: ignore[misc]
    try:
        Multiprocess(config, sockets=[]).run()
    finally:
        guard.close()
