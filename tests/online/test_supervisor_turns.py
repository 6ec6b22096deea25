"""The server's event-loop budget (supervisor): admitted requests and refusals started a bounded number per turn of
the loop, in order; /health/live run through the app in the callback that parsed it, without a task, and the rest
of an app that waits on something finished by a task as its own would."""

from __future__ import annotations

import asyncio
import contextvars
from types import SimpleNamespace
from typing import Any

import pytest

from moviematch_ml.online import supervisor

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="outside")


class Turns:
    """Counts the turns of the running loop: a callback that schedules itself runs once a turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = 0
        self.loop = loop
        self.running = True
        loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.now += 1
        if self.running:
            self.loop.call_soon(self._tick)


def fake_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """What uvicorn's ``_start_asgi_task`` and ``_run_now`` use of a protocol."""
    return SimpleNamespace(loop=loop, tasks=set(), config=SimpleNamespace(reset_contextvars=False))


class Cycle:
    """A request's cycle: ``run_asgi`` runs the app, as uvicorn's does."""

    async def run_asgi(self, app: Any) -> None:
        await app()


def test_requests_past_the_budget_start_in_the_next_turns_in_order() -> None:
    """Twenty requests parsed in one turn (a burst): three start in it, the others three a turn after, in the order
    they came, and every one runs."""

    async def main() -> list[tuple[int, int]]:
        loop = asyncio.get_running_loop()
        turns = Turns(loop)
        budget = supervisor._Turns(3)
        protocol = fake_protocol(loop)
        ran: list[tuple[int, int]] = []

        def app_for(n: int) -> Any:
            async def app() -> None:
                ran.append((n, turns.now))

            return app

        def burst() -> None:
            for n in range(20):
                budget.start(protocol, Cycle(), app_for(n))

        loop.call_soon(burst)
        while len(ran) < 20:
            await asyncio.sleep(0)
        turns.running = False
        assert not budget.waiting
        return ran

    ran = asyncio.run(main())
    assert [n for n, _ in ran] == list(range(20))  # in order
    per_turn: dict[int, int] = {}
    for _, turn in ran:
        per_turn[turn] = per_turn.get(turn, 0) + 1
    assert max(per_turn.values()) == 3
    assert len(per_turn) == 7  # 20 requests, 3 a turn: 7 turns, one after the other
    assert sorted(per_turn) == list(range(min(per_turn), min(per_turn) + 7))


def test_an_app_that_answers_at_once_runs_in_the_callback_without_a_task() -> None:
    """/health/live's way: the whole app runs in the protocol's callback (no task, no turn waited for), in a context
    of its own, as a task's would be."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        protocol = fake_protocol(loop)
        ran: list[str] = []

        async def app() -> None:
            SEEN.set("inside")
            ran.append(SEEN.get())

        supervisor.DeadlineProtocol._run_now(protocol, Cycle(), app)
        assert ran == ["inside"]  # before this coroutine gave the loop a turn
        assert not protocol.tasks
        assert SEEN.get() == "outside"

    asyncio.run(main())


def test_an_app_that_waits_is_finished_by_a_task() -> None:
    """An app that waits on a future and yields to the loop: started in the callback, finished by a task of the
    protocol's (which the server waits for at shutdown), with the future's result and its own context."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        protocol = fake_protocol(loop)
        future: asyncio.Future[str] = loop.create_future()
        steps: list[str] = []

        async def app() -> None:
            SEEN.set("inside")
            steps.append("started")
            await asyncio.sleep(0)
            steps.append(await future)
            steps.append(SEEN.get())
            failing: asyncio.Future[str] = loop.create_future()
            loop.call_soon(failing.set_exception, ValueError("refused"))
            with pytest.raises(ValueError, match="refused"):
                await failing

        supervisor.DeadlineProtocol._run_now(protocol, Cycle(), app)
        assert steps == ["started"]
        (task,) = protocol.tasks
        loop.call_later(0.01, future.set_result, "result")
        await task
        assert steps == ["started", "result", "inside"]
        assert not protocol.tasks
        assert SEEN.get() == "outside"

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_app() -> None:
    """At shutdown uvicorn cancels the tasks left: the app sees its cancellation where it waits."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        protocol = fake_protocol(loop)
        seen: list[str] = []

        async def app() -> None:
            try:
                await loop.create_future()  # never done
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        supervisor.DeadlineProtocol._run_now(protocol, Cycle(), app)
        (task,) = protocol.tasks
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled"]

    asyncio.run(main())
