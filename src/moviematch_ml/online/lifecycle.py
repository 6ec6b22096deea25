"""A worker process's state of service: draining after SIGTERM, and what SIGHUP reloads.

Signals are delivered to a process, so this state is the process's own (``PROCESS``); the server supervisor sets it
from the signal handlers and the app reads it (readiness, ``Connection: close`` while draining) and registers what a
SIGHUP reloads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

log = logging.getLogger(__name__)

# The request-state key the server sets on a request that arrived past MAX_CONCURRENCY unfinished requests
# (supervisor.DeadlineProtocol); the request middleware answers it 503 without running the app.
OVERLOADED: Final[str] = "overloaded"
# The health probes: never refused for overload (server and middleware), never asked for a key (guard).
LIVE_PROBE: Final[str] = "/health/live"
HEALTH_PROBES: Final[frozenset[str]] = frozenset({"/health", LIVE_PROBE, "/health/ready"})


def route_path(scope: Mapping[str, Any]) -> str:
    """The path the router matches: without the root path when served under a prefix (as Starlette does)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


class Lifecycle:
    """Whether the process is draining (it stops being ready, finishes its requests, then exits), and the
    callbacks a SIGHUP runs."""

    def __init__(self) -> None:
        self.draining = False
        self._reloads: list[Callable[[], None]] = []

    def drain(self) -> None:
        self.draining = True

    def on_reload(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on SIGHUP."""
        self._reloads.append(callback)

    def off_reload(self, callback: Callable[[], None]) -> None:
        """Stop running ``callback`` on SIGHUP (an app that stops)."""
        if callback in self._reloads:
            self._reloads.remove(callback)

    def reload(self) -> bool:
        """Run the reload callbacks (a SIGHUP); False when there is none."""
        if not self._reloads:
            log.info("SIGHUP received: nothing to reload, ignored")
            return False
        for callback in list(self._reloads):
            try:
                callback()
            except Exception:  # a failed reload keeps what serves; it must not kill the process
                log.exception("reload failed; the models in service are kept")
        return True


PROCESS = Lifecycle()
