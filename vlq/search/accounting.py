"""What a search costs: its phases' wall time, the process's peak RSS, and the progress bars driven by the
calls ModelOpt makes of vlq's forward and loss functions."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..runtime.progress import Progress
from .scheme import Scheme



def _current_rss() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Samples the process RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak = _current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _current_rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss())
        return False


class PhaseClock:
    """Splits a search's wall time into calibration, scoring and solve.

    Scoring is recognised by the loss function being called (gradient) or by inference mode
    (kl_div); calibration is everything before the first scoring step and solve everything after
    the last one.
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.first_score: float | None = None
        self.last_score: float | None = None
        self.end: float | None = None
        self.score_calls = 0

    def mark_score(self, when: float | None = None):
        self.score_calls += 1
        now = time.perf_counter() if when is None else when
        if self.first_score is None:
            self.first_score = now
        self.last_score = now

    def times(self) -> PhaseTimes:
        end = self.end or time.perf_counter()
        first = self.first_score if self.first_score is not None else end
        last = self.last_score if self.last_score is not None else end
        return PhaseTimes(max(0.0, first - self.start), max(0.0, last - first), max(0.0, end - last))


class PhaseBars:
    """One progress bar for calibration, then one for scoring, driven by ModelOpt's calls of our
    forward and loss functions (ModelOpt itself reports nothing we can hook)."""

    def __init__(self, progress: Progress, scheme: Scheme, calibration_forwards: int | None = None):
        self.progress, self.scheme = progress, scheme
        self.calibration_forwards = scheme.num_calib_steps if calibration_forwards is None else calibration_forwards
        self.phase: str | None = None
        self._cm = self._bar = None

    def _open(self, phase: str, label: str, total: int | None) -> None:
        self.close()
        self.phase = phase
        self._cm = self.progress.bar(label, total)
        self._bar = self._cm.__enter__()

    def forward(self) -> None:
        if self.phase is None:
            self._open("calibrate", "calibration", self.calibration_forwards)
        if self.phase == "calibrate":
            self._bar.update()

    def scored(self) -> None:
        if self.phase != "score":
            # gradient: one loss call per scoring step; kl_div: many forwards per step (no total)
            total = self.scheme.num_score_steps if self.scheme.method == "gradient" else None
            self._open("score", f"scoring ({self.scheme.method})", total)
        self._bar.update()

    def close(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(None, None, None)


@dataclass(frozen=True)
class PhaseTimes:
    """A search's wall time by phase.

    ``extension_build_s`` is the one-off cost of building (cold cache) or loading ModelOpt's CUDA extensions
    before calibration (:mod:`vlq.runtime.cuda_extensions`; 0 on CPU and once they are loaded in the process); it is
    not part of ``calibrate_s``.  ``total_s`` includes it, so the phases add up to the wall time a caller's
    stopwatch sees; :attr:`searching_s` leaves it out (what a second search in the same process costs).
    """

    calibrate_s: float
    score_s: float
    solve_s: float
    extension_build_s: float = 0.0

    @property
    def searching_s(self) -> float:
        return self.calibrate_s + self.score_s + self.solve_s

    @property
    def total_s(self) -> float:
        return self.extension_build_s + self.searching_s
