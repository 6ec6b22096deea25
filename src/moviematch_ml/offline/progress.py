"""Progress of the long commands (train, evaluate) on stderr: every stage, its time and the time so far, by tqdm."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

# What the bar shows: the stage running, stages done of those announced, the time so far, and a note (trees...).
BAR_FORMAT = "{desc} | stage {n_fmt}/{total_fmt} | {elapsed}{postfix}"


class Progress:
    """The stages of one run. ``step(name)`` is one stage: while it runs the bar names it; when it ends a line
    ``name: 1.2 s`` is written above the bar. Stages are announced (``expect``) as soon as they are known, so the
    count grows as the run learns what it has to do (folds, models).

    Disabled, it writes nothing at all: the CLI enables it only when stderr is a terminal and ``--quiet`` is not
    given, so logs, pipes and ``--json`` output never see it. It never writes to stdout.
    """

    def __init__(self, *, enabled: bool, file: TextIO | None = None) -> None:
        self.enabled = enabled
        self._started = time.perf_counter()
        self._total = 0  # stages announced
        self._done = 0
        self._bar = tqdm(
            total=0,
            file=file if file is not None else sys.stderr,
            disable=not enabled,
            bar_format=BAR_FORMAT,
            dynamic_ncols=True,
            leave=False,
            desc="starting",
        )

    def expect(self, stages: int) -> None:
        """Announce ``stages`` more stages."""
        if self.enabled:
            self._total += stages
            self._bar.total = self._total
            self._bar.refresh()

    @contextmanager
    def step(self, name: str) -> Iterator[Callable[[str], None]]:
        """One stage; the callable it gives sets a note shown after the time (e.g. ``tree 120/2000``)."""
        if not self.enabled:
            yield _ignore
            return
        if self._done >= self._total:
            self.expect(self._done + 1 - self._total)  # a stage nobody announced still counts
        self._bar.set_description_str(name, refresh=False)
        self._bar.set_postfix_str("", refresh=False)
        self._bar.refresh()
        started = time.perf_counter()
        try:
            yield self._note
        finally:
            self._bar.write(f"{name}: {time.perf_counter() - started:.1f} s", file=self._bar.fp)
            self._done += 1
            self._bar.update(1)

    def _note(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)
        self._bar.update(0)  # redraws at most every tqdm.mininterval

    def close(self, what: str) -> None:
        """Remove the bar and write ``what: done in 12.3 s``."""
        if not self.enabled:
            return
        self._bar.close()
        self._bar.write(f"{what}: done in {time.perf_counter() - self._started:.1f} s", file=self._bar.fp)


def _ignore(text: str) -> None:
    """The note of a disabled stage: nothing to show."""


QUIET = Progress(enabled=False)
