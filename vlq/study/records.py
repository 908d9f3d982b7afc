"""What a study writes: ``study.json`` (every point, cost, score and conclusion) and ``study.md`` (the tables).

Typed records, read back by :func:`load_study` (``vlq report --studies``).  No torch here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..fidelity.metrics import FidelityMetrics

STUDY_VERSION = 1
STUDY_JSON = "study.json"
STUDY_MD = "study.md"


@dataclass(frozen=True)
class StudyPoint:
    """One measured allocation: a strategy at a target (None: the allocation's own bits, as uniform)."""

    strategy: str
    target_bits: float | None
    achieved_bits: float
    choices: tuple[tuple[str, str], ...]  # (group, format)
    fidelity: tuple[FidelityMetrics, ...]  # point a on the evaluation split, one per data kind
    measure_s: float
    seed: int | None = None

    @property
    def chosen(self) -> dict[str, str]:
        return dict(self.choices)

    def metrics(self, kind: str = "text") -> FidelityMetrics | None:
        return next((m for m in self.fidelity if m.data_kind == kind), None)

    def kld(self, kind: str = "text") -> float:
        found = self.metrics(kind)
        return found.kld_mean if found is not None else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "target_bits": self.target_bits, "achieved_bits": self.achieved_bits,
                "seed": self.seed, "measure_s": self.measure_s, "choices": dict(self.choices),
                "fidelity": [m.to_dict() for m in self.fidelity]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudyPoint":
        return cls(data["strategy"], data["target_bits"], float(data["achieved_bits"]), tuple(data["choices"].items()),
                   tuple(FidelityMetrics.from_dict(m) for m in data["fidelity"]), float(data["measure_s"]), data["seed"])


@dataclass(frozen=True)
class StrategyCost:
    strategy: str
    seconds: float
    peak_bytes: int | None
    memory: str  # "gpu" (allocated) or "rss" (process)
    detail: str = ""


@dataclass(frozen=True)
class Correlation:
    """A scorer's rank correlation with the oracle over (group, quantized format) pairs, and the shuffled control."""

    scorer: str
    pairs: int
    spearman: float
    shuffled: float  # one seeded shuffle of the scorer's scores
    shuffled_p95: float  # 95th percentile over 200 shuffles: a correlation above it is more than chance


@dataclass(frozen=True)
class Additivity:
    """Sum of the chosen groups' oracle KLDs (scoring split) against the allocation's measured KLD (evaluation)."""

    strategy: str
    target_bits: float
    predicted: float
    measured: float

    @property
    def ratio(self) -> float | None:
        return self.measured / self.predicted if self.predicted > 0 else None


@dataclass(frozen=True)
class FormatSetStudy:
    """Every strategy's frontier for one candidate format set, on the same axes, and what they show."""

    formats: tuple[str, ...]
    points: tuple[StudyPoint, ...]
    costs: tuple[StrategyCost, ...]
    scores: Mapping[str, Mapping[str, Mapping[str, float]]]  # strategy -> group -> format -> score
    correlations: tuple[Correlation, ...]
    regrets: Mapping[float, Mapping[str, float | None]]  # target -> strategy -> KLD / best KLD
    areas: Mapping[str, float]  # strategy -> frontier_area of its text KLD
    additivity: tuple[Additivity, ...]

    @property
    def label(self) -> str:
        return "+".join(self.formats)

    def series(self, strategy: str, kind: str = "text") -> dict[float, float]:
        """Target -> KLD for a strategy solved per target (random: the median over seeds)."""
        from .analysis import quartiles

        by_target: dict[float, list[float]] = {}
        for p in self.points:
            if p.strategy == strategy and p.target_bits is not None:
                by_target.setdefault(p.target_bits, []).append(p.kld(kind))
        return {t: (quartiles(v)[1] if len(v) > 1 else v[0]) for t, v in by_target.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "formats": list(self.formats),
            "points": [p.to_dict() for p in self.points],
            "costs": [vars(c) for c in self.costs],
            "scores": {s: {g: dict(f) for g, f in gs.items()} for s, gs in self.scores.items()},
            "correlations": [vars(c) for c in self.correlations],
            "regrets": {f"{t:g}": dict(r) for t, r in self.regrets.items()},
            "areas": dict(self.areas),
            "additivity": [{**vars(a), "ratio": a.ratio} for a in self.additivity],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FormatSetStudy":
        return cls(tuple(data["formats"]), tuple(StudyPoint.from_dict(p) for p in data["points"]),
                   tuple(StrategyCost(**c) for c in data["costs"]), data["scores"],
                   tuple(Correlation(**c) for c in data["correlations"]),
                   {float(t): r for t, r in data["regrets"].items()}, data["areas"],
                   tuple(Additivity(**{k: v for k, v in a.items() if k != "ratio"}) for a in data["additivity"]))


@dataclass(frozen=True)
class StudyResult:
    model_source: str
    targets: tuple[float, ...]
    strategies: tuple[str, ...]
    random_seeds: int
    evaluation_rows: int  # held-out rows per data kind every point is measured on
    scoring_rows: int  # held-out text rows the oracle scores on (disjoint from evaluation and calibration)
    sets: tuple[FormatSetStudy, ...]
    total_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"vlq_study_version": STUDY_VERSION, "model_source": self.model_source, "targets": list(self.targets),
                "strategies": list(self.strategies), "random_seeds": self.random_seeds,
                "evaluation_rows": self.evaluation_rows, "scoring_rows": self.scoring_rows, "total_s": self.total_s,
                "sets": [s.to_dict() for s in self.sets]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudyResult":
        if data.get("vlq_study_version") != STUDY_VERSION:
            raise ValueError(f"not a vlq study (version {data.get('vlq_study_version')!r}; this vlq reads {STUDY_VERSION})")
        return cls(data["model_source"], tuple(data["targets"]), tuple(data["strategies"]), int(data["random_seeds"]),
                   int(data["evaluation_rows"]), int(data["scoring_rows"]),
                   tuple(FormatSetStudy.from_dict(s) for s in data["sets"]), float(data["total_s"]))


def load_study(path: str | os.PathLike) -> StudyResult:
    """A saved ``study.json`` (or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / STUDY_JSON
    return StudyResult.from_dict(json.loads(path.read_text()))
