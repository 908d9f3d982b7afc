"""How stages report what they are doing: stage lines and one progress bar per long phase.

Stages call ``progress.stage("...")`` and ``with progress.bar("scoring", total=16) as bar:
bar.update()``; the CLI passes a terminal implementation (tqdm on the real terminal, even while
third-party output is redirected to the run's log), tests and library callers get :data:`SILENT`.
Light on purpose: no torch.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import IO, Iterator, Protocol


class Bar(Protocol):
    def update(self, n: int = 1) -> None: ...


class Progress(Protocol):
    def stage(self, message: str) -> None: ...

    def bar(self, label: str, total: int | None = None) -> contextlib.AbstractContextManager[Bar]: ...


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


class Silent:
    """Reports nothing (library calls and tests)."""

    def stage(self, message: str) -> None:
        pass

    @contextlib.contextmanager
    def bar(self, label: str, total: int | None = None) -> Iterator[Bar]:
        yield _NoBar()


SILENT = Silent()


class Lines:
    """Timestamped stage lines and a one-line summary per phase on ``stream`` (no bars): logs, CI."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stdout
        print(f"[vlq {time.strftime('%H:%M:%S')}] {text}", file=stream, flush=True)

    def stage(self, message: str) -> None:
        self._write(message)

    @contextlib.contextmanager
    def bar(self, label: str, total: int | None = None) -> Iterator[Bar]:
        start = time.perf_counter()
        yield _NoBar()
        self._write(f"{label}: done in {time.perf_counter() - start:.1f}s")


class TerminalBars(Lines):
    """Stage lines plus a tqdm bar per phase, written to ``stream`` (the terminal)."""

    @contextlib.contextmanager
    def bar(self, label: str, total: int | None = None) -> Iterator[Bar]:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"[vlq] {label}", file=self.stream, leave=True, dynamic_ncols=True,
                   unit="step" if total else "it", bar_format=None if total else "{desc}: {elapsed}")
        try:
            yield bar
            if total and bar.n < total:  # phases that end early (restored scores) close full
                bar.update(total - bar.n)
        finally:
            bar.close()
