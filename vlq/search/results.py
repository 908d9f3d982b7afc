"""A finished search, typed: its decisions, bits, phases, memory and the live objects later stages need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..data.models import LoadedVLM
from ..formats.applicability import FormatExclusion
from ..runtime.cuda_extensions import ExtensionLoad
from .accounting import PhaseTimes
from .decisions import GroupDecision, groups_within
from .scheme import Scheme


@dataclass
class SearchResult:
    """What a search decided, plus the live objects later stages need.

    ``groups`` covers every decision ModelOpt made; :meth:`lm_groups` the language model's.
    ``modelopt_state`` is ModelOpt's own state dict, kept to re-solve other targets and to verify
    manifests; read it only through :func:`decisions_from_state`.
    """

    scheme: Scheme
    loaded: LoadedVLM
    groups: tuple[GroupDecision, ...]
    achieved_bits: float  # over the language model only
    modelopt_achieved_bits: float  # ModelOpt's own figure (denominator per its cost model)
    total_score: float
    is_satisfied: bool
    times: PhaseTimes
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    modelopt_state: dict[str, Any] = field(repr=False)
    searched_model: nn.Module = field(repr=False)
    disabled_layers: tuple[str, ...] = ()
    cost_excluded: tuple[str, ...] = ()
    restored_from_checkpoint: bool = False
    name_prefix: str = ""  # maps the searched module's names to full-VLM names (see searched_module)
    calibration_source: str = ""
    score_calls: int = 0  # scoring steps run in this call (0 when scores were restored from a saved state)
    #: forwards ModelOpt calibrated with, over every format (0 when restored; see calibration_forwards())
    calibration_calls: int = 0
    # peak GPU memory as if the searched model were the only thing on the GPU (other resident
    # tensors, e.g. a test session's read-only copy of the model, subtracted)
    peak_gpu_own_bytes: int | None = None
    # every visible GPU's peak during the search (a model split over GPUs uses several); () on CPU
    peak_gpu_bytes_per_device: tuple[int, ...] = ()
    #: candidate formats removed from groups before the search because the layer shapes do not fit them
    format_exclusions: tuple[FormatExclusion, ...] = ()
    #: ModelOpt's CUDA extensions loaded before calibration (the ``extension_build_s`` phase)
    extensions: ExtensionLoad = field(default_factory=lambda: ExtensionLoad(device="cpu"))
    #: extensions ModelOpt loaded during the search anyway (their time is inside a phase; should be ())
    extensions_loaded_while_searching: tuple[str, ...] = ()

    def lm_groups(self) -> tuple[GroupDecision, ...]:
        return groups_within(self.groups, self.loaded.lm_path)

    def other_groups(self) -> tuple[GroupDecision, ...]:
        lm = set(self.lm_groups())
        return tuple(g for g in self.groups if g not in lm)


def timing_summary(result: SearchResult) -> str:
    """``12.3s (extension build 9.0s, calibrate 1.1s, score 2.0s, solve 0.2s)``; the extension phase is
    named only when it loaded something in this search."""
    t = result.times
    phases = [f"{result.extensions.phase} {t.extension_build_s:.1f}s"] if result.extensions.phase != "none" else []
    phases += [f"calibrate {t.calibrate_s:.1f}s", f"score {t.score_s:.1f}s", f"solve {t.solve_s:.1f}s"]
    return f"{t.total_s:.1f}s ({', '.join(phases)})"
