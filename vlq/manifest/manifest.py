"""Stage 5 — the manifest: what the search decided for the language model, as JSON.

Per decision group: member modules, chosen format, every candidate format with its score and
cost; plus the LM-only effective bits.  :meth:`Manifest.verify` checks the manifest against the
searcher state, the live model's quantizers and an exported checkpoint's quantization config, and
reports every disagreement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..formats.applicability import FormatExclusion
from ..checks.check import Check
from ..checks.registry import spec_named
from ..runtime.errors import ManifestMismatch
from ..fidelity.metrics import FidelityMetrics
from ..evaluation.results import TaskAccuracy
from ..formats.registry import FORMATS, NO_QUANT
from ..search.scheme import Scheme
from ..formats.signatures import live_signature
from ..search.decisions import Candidate, GroupDecision, decisions_from_state, groups_within, lm_achieved_bits
from ..search.results import SearchResult

MANIFEST_VERSION = 2  # 2: effective_bits renamed achieved_bits; scheme version 2


@dataclass(frozen=True)
class ManifestGroup:
    name: str
    members: tuple[str, ...]
    chosen: str
    candidates: tuple[Candidate, ...]

    @classmethod
    def from_decision(cls, d: GroupDecision) -> "ManifestGroup":
        return cls(d.name, tuple(d.members), d.chosen, tuple(d.candidates))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "members": list(self.members),
            "chosen": self.chosen,
            "candidates": [asdict(c) for c in self.candidates],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ManifestGroup":
        return cls(
            data["name"], tuple(data["members"]), data["chosen"],
            tuple(Candidate(c["format"], float(c["score"]), float(c["cost"])) for c in data["candidates"]),
        )


@dataclass(frozen=True)
class Manifest:
    """The language model's per-group decisions and what produced them."""

    model_source: str
    lm_path: str
    vision_root: str
    tied_lm_head: bool
    scheme: Scheme
    groups: tuple[ManifestGroup, ...]
    achieved_bits: float
    total_score: float
    strategy_prefix: str  # name prefix that maps the searched model's names to full-VLM names
    calibration_source: str = ""
    version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    #: measured fidelity to the BF16 model (one entry per data kind and measurement point)
    fidelity: tuple[FidelityMetrics, ...] = field(default=(), compare=False)
    #: candidate formats removed from groups before the search (layer shapes outside their blocks), with why
    format_exclusions: tuple[FormatExclusion, ...] = ()
    #: lm-eval task accuracy, BF16 against quantized (one entry per task, metric and measurement point)
    accuracy: tuple[TaskAccuracy, ...] = field(default=(), compare=False)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_search(cls, result: SearchResult) -> "Manifest":
        lm_groups = result.lm_groups()
        return cls(
            model_source=result.loaded.source,
            lm_path=result.loaded.lm_path,
            vision_root=result.loaded.vision.root,
            tied_lm_head=result.loaded.tied_lm_head,
            scheme=result.scheme,
            groups=tuple(ManifestGroup.from_decision(g) for g in lm_groups),
            achieved_bits=result.achieved_bits,
            total_score=sum(g.candidate(g.chosen).score for g in lm_groups),
            strategy_prefix=result.name_prefix,
            calibration_source=result.calibration_source,
            format_exclusions=tuple(result.format_exclusions),
        )

    def with_groups(self, groups, *, achieved_bits: float | None = None) -> "Manifest":
        """A copy with other decisions (re-solve, or a tampered copy in tests)."""
        groups = tuple(groups)
        bits = achieved_bits if achieved_bits is not None else lm_achieved_bits(groups)
        return Manifest(
            self.model_source, self.lm_path, self.vision_root, self.tied_lm_head, self.scheme, groups,
            bits, sum(next(c.score for c in g.candidates if c.format == g.chosen) for g in groups),
            self.strategy_prefix, self.calibration_source, self.version, dict(self.extra),
            format_exclusions=self.format_exclusions,
        )

    def with_fidelity(self, *metrics: FidelityMetrics) -> "Manifest":
        """A copy that also records ``metrics`` (an entry for the same data kind and point is replaced)."""
        kept = [m for m in self.fidelity if (m.data_kind, m.measurement_point) not in {(n.data_kind, n.measurement_point) for n in metrics}]
        return dataclasses.replace(self, fidelity=tuple(kept) + tuple(metrics))

    def with_accuracy(self, *results: TaskAccuracy) -> "Manifest":
        """A copy that also records ``results`` (an entry for the same task, metric and point is replaced)."""
        key = (lambda a: (a.task, a.metric, a.measurement_point))
        new = {key(a) for a in results}
        return dataclasses.replace(self, accuracy=tuple(a for a in self.accuracy if key(a) not in new) + tuple(results))

    # -- views ---------------------------------------------------------------------------------
    def group(self, name: str) -> ManifestGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def module_formats(self) -> dict[str, str]:
        """Full-VLM module name -> chosen format, for every LM module the search decided."""
        return {m: g.chosen for g in self.groups for m in g.members}

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for g in self.groups:
            counts[g.chosen] = counts.get(g.chosen, 0) + 1
        return counts

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "vlq_manifest_version": self.version,
            "model": {
                "source": self.model_source,
                "lm_path": self.lm_path,
                "vision_root": self.vision_root,
                "tied_lm_head": self.tied_lm_head,
            },
            "scheme": self.scheme.to_dict(),
            "scheme_id": self.scheme.id,
            "achieved_bits": self.achieved_bits,
            "total_score": self.total_score,
            "strategy_prefix": self.strategy_prefix,
            "calibration_source": self.calibration_source,
            "format_counts": self.format_counts(),
            "groups": [g.to_dict() for g in self.groups],
            "extra": self.extra,
            "fidelity": [m.to_dict() for m in self.fidelity],
            "format_exclusions": [e.to_dict() for e in self.format_exclusions],
            **({"accuracy": [a.to_dict() for a in self.accuracy]} if self.accuracy else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        version = data.get("vlq_manifest_version")
        if version == 1:  # version 1 called the achieved bits "effective_bits"
            data = {**data, "achieved_bits": data.get("effective_bits")}
        elif version != MANIFEST_VERSION:
            raise ManifestMismatch(f"Manifest version {version!r} is not supported; this vlq reads versions 1 and {MANIFEST_VERSION}.")
        model = data["model"]
        return cls(
            model_source=model["source"],
            lm_path=model["lm_path"],
            vision_root=model["vision_root"],
            tied_lm_head=bool(model["tied_lm_head"]),
            scheme=Scheme.from_dict(data["scheme"]),
            groups=tuple(ManifestGroup.from_dict(g) for g in data["groups"]),
            achieved_bits=float(data["achieved_bits"]),
            total_score=float(data["total_score"]),
            strategy_prefix=data.get("strategy_prefix", ""),
            calibration_source=data.get("calibration_source", ""),
            extra=dict(data.get("extra", {})),
            fidelity=tuple(FidelityMetrics.from_dict(m) for m in data.get("fidelity", ())),
            format_exclusions=tuple(FormatExclusion.from_dict(e) for e in data.get("format_exclusions", ())),
            accuracy=tuple(TaskAccuracy.from_dict(a) for a in data.get("accuracy", ())),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, renamed into place."""
        from ..runtime.files import atomic_write_text

        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ManifestMismatch(f"Manifest {path} does not exist.") from exc
        except json.JSONDecodeError as exc:
            raise ManifestMismatch(f"Manifest {path} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as exc:
            raise ManifestMismatch(f"Manifest {path} lacks field {exc}; it was not written by vlq.") from exc

    # -- verification --------------------------------------------------------------------------
    def verify(self, *, state: dict[str, Any] | None = None, model=None, checkpoint: str | os.PathLike | None = None) -> Check:
        """Check this manifest against any of: ModelOpt's search state, the live VLM, a checkpoint."""
        checked, problems = [], []
        if state is not None:
            checked.append("searcher state")
            problems += self._against_state(state)
        if model is not None:
            checked.append("live quantizers")
            problems += self._against_model(model)
        if checkpoint is not None:
            checked.append("exported checkpoint")
            problems += self._against_checkpoint(checkpoint)
        if not checked:
            raise ValueError("verify() needs at least one of state=, model=, checkpoint=.")
        members = sum(len(g.members) for g in self.groups)
        name, detail = f"manifest == {' == '.join(checked)}", f"{len(self.groups)} groups, {members} modules"
        spec = spec_named(name)  # the registered comparisons; others (a state alone) are made by tests and refusals
        if spec is not None:
            return spec.result(problems, members, detail)
        return Check(name, tuple(problems), members, detail, ManifestMismatch)

    def _self_consistency(self) -> list[str]:
        problems = []
        bits = lm_achieved_bits(self.groups)
        if not math.isclose(bits, self.achieved_bits, rel_tol=1e-9, abs_tol=1e-9):
            problems.append(f"achieved_bits {self.achieved_bits} != {bits} recomputed from the groups' costs")
        chosen = {m: g.chosen for g in self.groups for m in g.members}
        for e in self.format_exclusions:
            if chosen.get(e.group) == e.format:
                problems.append(f"group {e.group} chose {e.format}, which was removed from its candidates ({e.reason})")
        return problems

    def _against_state(self, state: dict[str, Any]) -> list[str]:
        problems = self._self_consistency()
        decided = decisions_from_state(state, name_prefix=self.strategy_prefix)
        expected = {g.name: g for g in groups_within(decided, self.lm_path)}
        mine = {g.name: g for g in self.groups}
        for name in sorted(set(expected) - set(mine)):
            problems.append(f"group {name} is in the searcher state but not in the manifest")
        for name in sorted(set(mine) - set(expected)):
            problems.append(f"group {name} is in the manifest but not in the searcher state")
        for name in sorted(set(mine) & set(expected)):
            m, e = mine[name], expected[name]
            if tuple(m.members) != tuple(e.members):
                problems.append(f"group {name}: members {list(m.members)} != state {list(e.members)}")
            if m.chosen != e.chosen:
                problems.append(f"group {name}: chosen {m.chosen} != state {e.chosen}")
            if tuple(m.candidates) != tuple(e.candidates):
                problems.append(f"group {name}: candidates {m.candidates} != state {e.candidates}")
        for g in decided:
            if g.name not in expected and g.chosen != NO_QUANT:
                problems.append(f"state quantizes {g.name} ({g.chosen}) outside the language model")
        return problems

    def _against_model(self, vlm) -> list[str]:
        problems = []
        modules = dict(vlm.named_modules())
        for g in self.groups:
            want = FORMATS[g.chosen].quantizer_signature() if g.chosen != NO_QUANT else None
            for member in g.members:
                module = modules.get(member)
                if module is None:
                    problems.append(f"{member}: not a module of the live model")
                    continue
                got = live_signature(module)
                if want is None:
                    if got.weight is not None or got.input is not None:
                        problems.append(f"{member}: manifest says none but live quantizers are {got}")
                elif got != want:
                    problems.append(f"{member}: manifest says {g.chosen} {want} but live quantizers are {got}")
        return problems

    def _against_checkpoint(self, checkpoint) -> list[str]:
        from ..export.inspect import CheckpointQuantConfig, checkpoint_module_name, read_tensor_index

        config = CheckpointQuantConfig.read(checkpoint)
        index, _ = read_tensor_index(Path(checkpoint))  # unreadable files are the on-disk check's to report
        problems, absent, named = [], [], set()
        for g in self.groups:
            want = FORMATS[g.chosen].export_quant_algo if g.chosen != NO_QUANT else None
            for member in g.members:
                name = checkpoint_module_name(member, self.lm_path, self.vision_root)
                named.add(name)
                if index and f"{name}.weight" not in index:
                    absent.append(name)
                    continue
                got = config.algo_for(name)
                if got != want:
                    problems.append(f"{member}: manifest says {want or 'unquantized'} but the checkpoint config says {got or 'unquantized'}")
        if absent:
            problems.insert(0, f"{len(absent)} of the manifest's {len(named)} layers are not in the checkpoint (first: {absent[0]}): "
                            f"the manifest (model {self.model_source}) describes another model; pass the manifest of this export")
        linears = {key.rpartition(".")[0] for key, meta in index.items() if key.endswith(".weight") and len(meta.shape) == 2}
        extra = sorted(linears - named)
        quantized_extra = [name for name in extra if name.startswith("model.layers.") and config.algo_for(name) is not None]
        if quantized_extra:
            problems.append(f"the checkpoint quantizes {len(quantized_extra)} layers the manifest does not list (first: {quantized_extra[0]})")
        return problems


def verify_against_search(*, manifest: Manifest, result, **_) -> Check:
    """The manifest stage's check: the manifest against ModelOpt's search state and the live quantizers."""
    return manifest.verify(state=result.modelopt_state, model=result.loaded.vlm)
