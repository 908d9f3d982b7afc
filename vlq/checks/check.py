"""The one result type of every guarantee vlq checks: guards, manifest verification, the checkpoint
on disk, serving.

A :class:`Check` is plain data (name, problems, how many things were checked, a detail line);
``ok`` is "no problems", and :meth:`Check.require` raises the error class of the stage that made
it, listing the problems.  Tables of checks are rendered in :mod:`vlq.report.tables`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..runtime.errors import VlqError

#: How many problems an error message lists before "... and N more".
SHOWN_PROBLEMS = 20


@dataclass(frozen=True)
class Check:
    """One guarantee: what was checked, and every problem found (none when it holds)."""

    name: str
    problems: tuple[str, ...] = ()
    checked: int = 0  # how many layers / groups / files the check looked at
    detail: str = ""  # one line for tables when the check passes
    error: type[VlqError] = field(default=VlqError, compare=False, repr=False)
    key: str = field(default="", compare=False, repr=False)  # its entry in vlq.checks.registry ("" when not registered)

    def __post_init__(self):
        object.__setattr__(self, "problems", tuple(self.problems))

    @property
    def ok(self) -> bool:
        return not self.problems

    def require(self) -> "Check":
        """Return ``self`` when the check holds, else raise the stage's error listing the problems."""
        if self.problems:
            raise self.error(self.verdict())
        return self

    def verdict(self) -> str:
        """``NAME failed (N problems):`` and the problems one per line (the first SHOWN_PROBLEMS)."""
        if not self.problems:
            return f"{self.name}: holds ({self.detail})"
        shown = "\n  ".join(self.problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(self.problems) - SHOWN_PROBLEMS} more" if len(self.problems) > SHOWN_PROBLEMS else ""
        return f"{self.name} failed ({len(self.problems)} problems):\n  {shown}{more}"

    def summary(self) -> str:
        """The detail line when the check holds, else its first problems."""
        if self.ok:
            return self.detail
        first = "; ".join(self.problems[:3])
        return first + (f" (+{len(self.problems) - 3} more)" if len(self.problems) > 3 else "")


def checks_table(checks: Sequence[Check], fmt: str = "github") -> str:
    """One row per check: name, PASS/FAIL, the detail line or the first problems."""
    from tabulate import tabulate

    rows = [[c.name, "PASS" if c.ok else "FAIL", c.summary()] for c in checks]
    return tabulate(rows, headers=["check", "result", "detail"], tablefmt=fmt)
