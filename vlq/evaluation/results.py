"""What task evaluation returns: one lm-eval score, and a quantized score against its BF16 base.  Torch-free (the
manifest reads and writes them)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: Where a quantized model was evaluated: a (fake-quantized in memory), b (the export through vlq's dequantizer),
#: c (the export served by vLLM) - the fidelity stage's measurement points.
ACCURACY_POINTS = ("fake_quant", "checkpoint", "vllm")


@dataclass(frozen=True)
class TaskScore:
    """One lm-eval task's metric on one model, with lm-eval's standard error (of the mean over samples)."""

    task: str
    metric: str
    value: float
    stderr: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskScore":
        return cls(**data)


@dataclass(frozen=True)
class TaskAccuracy:
    """A task's score on the BF16 model and on a quantized one at ``measurement_point``, and their ratio.

    ``recovery_stderr`` propagates both standard errors as if independent (first order:
    r * sqrt((se_q / q)^2 + (se_b / b)^2)); the two scores share their samples, so this overstates the error of
    the ratio.  ``chance`` is the expected score of a uniform guess, where the task defines one.
    """

    task: str
    metric: str
    measurement_point: str
    base: float
    base_stderr: float
    quantized: float
    quantized_stderr: float
    samples: int
    chance: float | None = None
    model_source: str = ""

    def __post_init__(self):
        if self.measurement_point not in ACCURACY_POINTS:
            raise ValueError(f"measurement_point must be one of {ACCURACY_POINTS}, got {self.measurement_point!r}")

    @property
    def recovery(self) -> float:
        return self.quantized / self.base if self.base else math.nan

    @property
    def recovery_stderr(self) -> float:
        if not self.base or not self.quantized:
            return math.nan
        return self.recovery * math.hypot(self.quantized_stderr / self.quantized, self.base_stderr / self.base)

    @classmethod
    def of(cls, base: TaskScore, quantized: TaskScore, point: str, *, chance: float | None = None,
           model_source: str = "") -> "TaskAccuracy":
        if (base.task, base.metric) != (quantized.task, quantized.metric):
            raise ValueError(f"compare the same task and metric: {base.task}/{base.metric} vs {quantized.task}/{quantized.metric}")
        return cls(base.task, base.metric, point, base.value, base.stderr, quantized.value, quantized.stderr,
                   min(base.samples, quantized.samples), chance, model_source)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recovery": self.recovery, "recovery_stderr": self.recovery_stderr}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskAccuracy":
        return cls(**{k: v for k, v in data.items() if k not in ("recovery", "recovery_stderr")})
