"""Model reloads while serving: on request (``POST /admin/reload``), on SIGHUP, and when the registry file changes.

A reload loads the new lineup in a worker thread (requests go on with the old one) and swaps it in whole, or keeps
the old one and says why (``ModelSet.reload``). Every worker process polls the registry file's modification time,
so all the workers of every replica pick a change up within ``REGISTRY_POLL_SECONDS``; ``POST /admin/reload`` and
SIGHUP make the worker that gets them reload at once (SIGHUP to a server of several workers reaches each of them:
``online/supervisor.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import anyio
import anyio.to_thread

from moviematch_ml.online.models import ModelSet, ReloadOutcome

log = logging.getLogger(__name__)


class Reloader:
    """Reloads a model set off the event loop, one reload at a time, and reports each outcome to ``on_outcome``."""

    def __init__(self, models: ModelSet, *, on_outcome: Callable[[ReloadOutcome], None] | None = None) -> None:
        self.models = models
        self.on_outcome = on_outcome
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[ReloadOutcome]] = set()

    async def reload(self) -> ReloadOutcome:
        """Reload now (in a worker thread); the outcome."""
        outcome = await anyio.to_thread.run_sync(self.models.reload)
        if outcome.reloaded:
            log.info(
                "models reloaded", extra={"variants": outcome.lineup.variants(), "revision": outcome.lineup.revision}
            )
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    async def poll(self, interval: float) -> None:
        """Reload whenever the registry file changes (checked every ``interval`` seconds); runs until cancelled."""
        self._loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            if self.models.registry_changed():
                try:
                    await self.reload()
                except Exception:  # the models in service answer whatever a reload does
                    log.exception("reload failed; the models in service are kept")

    def attach(self) -> None:
        """Remember the running event loop, for ``signal`` (call from it, at start)."""
        self._loop = asyncio.get_running_loop()

    def signal(self) -> None:
        """A SIGHUP: schedule a reload on the event loop (the handler runs outside it, and must not block)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            log.warning("SIGHUP received before the service started: nothing reloaded")
            return
        log.info("SIGHUP received: reloading the models")
        loop.call_soon_threadsafe(self._spawn)

    def _spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
