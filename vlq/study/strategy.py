"""What a strategy is handed and what it gives back, typed.

A :class:`ScoredStrategy` returns :class:`GroupScores` (a score per decision group and candidate format, lower is
less sensitive, ``none`` scores 0): the study solves them with the one solver for every target.  A
:class:`BaselineStrategy` returns :class:`Allocation` objects directly.  Both get a :class:`StudyContext`: the
searched model whose calibrated quantizers every allocation is switched to, its decision groups, the scoring
split and the ModelOpt searches (run on demand, their state saved for reruns).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..formats.registry import NO_QUANT
from ..runtime.errors import SchemeError
from ..runtime.progress import SILENT, Progress


@dataclass(frozen=True)
class GroupScores:
    """A score per (group, format) from one strategy, and what producing them cost."""

    strategy: str
    scores: Mapping[str, Mapping[str, float]]  # full-VLM group name -> format -> score
    seconds: float
    peak_bytes: int | None  # peak GPU memory on CUDA, peak process RSS on CPU
    memory: str  # "gpu" or "rss"
    detail: str = ""

    def score(self, group: str, fmt: str) -> float:
        return 0.0 if fmt == NO_QUANT else float(self.scores[group][fmt])

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "seconds": self.seconds, "peak_bytes": self.peak_bytes, "memory": self.memory,
                "detail": self.detail, "scores": {g: dict(f) for g, f in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GroupScores":
        return cls(str(data["strategy"]), {g: {f: float(s) for f, s in fs.items()} for g, fs in data["scores"].items()},
                   float(data["seconds"]), data["peak_bytes"], str(data["memory"]), str(data.get("detail", "")))


@dataclass(frozen=True)
class Allocation:
    """One format per decision group, as a strategy allocated it for a target (None: the allocation's own bits)."""

    strategy: str
    target_bits: float | None
    choices: tuple[tuple[str, str], ...]  # (full-VLM group name, format), in the searched model's group order
    seed: int | None = None

    @property
    def chosen(self) -> dict[str, str]:
        return dict(self.choices)


def with_choices(groups: Sequence, chosen: Mapping[str, str]) -> tuple:
    """``groups`` (GroupDecision) with each one's ``chosen`` replaced from ``chosen``."""
    return tuple(dataclasses.replace(g, chosen=chosen[g.name]) for g in groups)


def candidate_formats(group) -> tuple[str, ...]:
    """A group's candidates, cheapest first (ModelOpt lists them so; ``none`` last)."""
    return tuple(c.format for c in sorted(group.candidates, key=lambda c: c.cost))


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def decoder_layer_index(group_name: str) -> int:
    """The decoder layer a group lies in (``...layers.3.mlp.down_proj`` -> 3)."""
    match = _LAYER.search(group_name + ".")
    if match is None:
        raise SchemeError(f"Decision group {group_name} is not inside a decoder layer; the study places groups by layer.")
    return int(match.group(1))


@dataclass(frozen=True)
class ModelOptSearch:
    """A ModelOpt search of the study's format set with one method: its state and what scoring cost."""

    method: str
    state: dict = field(repr=False)
    name_prefix: str
    seconds: float
    peak_bytes: int | None
    memory: str
    restored: bool


@dataclass
class StudyContext:
    """Everything a strategy may use.  ``model`` carries the base (gradient) search's calibrated quantizers;
    ``groups`` are its language-model decision groups.  ``modelopt_search`` runs (or restores) a ModelOpt search
    with a method; ``scores_of`` another strategy's scores (computed once)."""

    model: Any  # LoadedVLM, searched in place
    search_result: Any  # SearchResult of the base search (apply_decisions switches it)
    groups: tuple
    formats: tuple[str, ...]
    scoring: tuple  # the scoring split's batches (dicts), rows grouped into forwards
    modelopt_search: Callable[[str], ModelOptSearch]
    scores_of: Callable[[str], GroupScores]
    progress: Progress = SILENT
    extra: dict = field(default_factory=dict)


class ScoredStrategy:
    """A strategy that scores each (group, format); solved by the study's LP at every target.  What it is, in one
    line, lives in :data:`vlq.study.registry.STRATEGY_MODULES` (the CLI reads it without importing strategies)."""

    name = ""
    scored = True
    saved = True  # False: derived from another strategy's scores (cheap; never saved, so never stale)

    def scores(self, context: StudyContext) -> GroupScores:
        raise NotImplementedError


class BaselineStrategy:
    """A strategy that allocates directly."""

    name = ""
    scored = False

    def allocations(self, context: StudyContext, targets: Sequence[float], *, argument: str = "",
                    seeds: int = 0) -> tuple[Allocation, ...]:
        raise NotImplementedError


class MemoryMeter:
    """Peak memory of a block: GPU memory allocated (peak counter reset on entry) on CUDA, process RSS on CPU."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.kind = "gpu" if self.cuda else "rss"
        self.peak: int | None = None
        self._rss = None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            from ..search.accounting import PeakRss

            self._rss = PeakRss().__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            self._rss.__exit__(*exc)
            self.peak = int(self._rss.peak)
        return False
