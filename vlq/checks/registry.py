"""The check registry: every guarantee vlq checks, once, in the order a run makes them.

Each :class:`CheckSpec` names a check (what tables print), its stage, what it proves, the test that sees it fail
(its negative control), the error it raises, and the function that runs it (``module:function``, imported when
the stage runs, so this module stays light).  A stage runs the checks registered for it, in registry order
(:func:`run_stage`); ``vlq run``'s table lists each check once, in the same order (:func:`in_registry_order`);
the README's "What each check guarantees" table is :func:`checks_markdown` (``tests/test_checks.py`` holds
them equal); tests that pin check names read them here.

A runner takes the stage's context as keyword arguments and returns a :class:`vlq.checks.check.Check` made by
its spec (:meth:`CheckSpec.result`), or ``None`` where the check does not apply (no reference to compare
against, no FP8 KV cache, an engine that was not started).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..runtime.errors import CheckpointError, GuardViolation, ManifestMismatch, ServingError, VlqError
from .check import Check

#: The stages that make checks, in the order a run reaches them.
STAGES = ("search", "manifest", "inspect", "fidelity", "serve")


@dataclass(frozen=True)
class CheckSpec:
    key: str
    name: str  # what tables print; ``{folder}`` is filled in by the runner where a check names its folder
    stage: str
    proves: str
    negative_control: str  # a test (``tests/FILE.py::test_name``) that makes the check fail
    error: type[VlqError]
    runner: str  # ``module:function`` under vlq

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"check {self.key}: unknown stage {self.stage!r}; stages are {STAGES}")

    def result(self, problems: Iterable[str] = (), checked: int = 0, detail: str = "", **name_fields: str) -> Check:
        """This check's verdict: its registered name (with ``name_fields`` filled in) and error class."""
        return Check(self.name.format(**name_fields), tuple(problems), checked, detail, self.error, key=self.key)

    def run_function(self) -> Callable[..., Check | None]:
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(f"vlq.{module}"), function)


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("vision_guard", "vision tower unquantized (VisionGuard)", "search",
              "no enabled quantizer under `model.visual`, no decision quantizes a vision module, vision weights "
              "byte-identical to load time",
              "tests/test_search.py::test_vision_guard_catches_a_search_that_quantizes_vision", GuardViolation,
              "search.guards:vision_guard"),
    CheckSpec("lm_head_guard", "lm_head unquantized (LmHeadGuard)", "search",
              "`lm_head` carries no enabled quantizer and no decision quantizes it",
              "tests/test_search.py::test_lm_head_guard_catches_a_quantized_lm_head", GuardViolation,
              "search.guards:lm_head_guard"),
    CheckSpec("manifest_vs_search", "manifest == searcher state == live quantizers", "manifest",
              "every group's members, choice, candidate scores and costs equal ModelOpt's state; achieved bits "
              "recomputed; each module's live quantizers have its format's signature",
              "tests/test_search.py::test_tampered_manifest_fails_against_state", ManifestMismatch,
              "manifest.manifest:verify_against_search"),
    CheckSpec("checkpoint_on_disk", "checkpoint on disk ({folder})", "inspect",
              "every safetensors file parses; vision tensors BF16 without scales; the config excludes vision and "
              "`lm_head`; each quantized layer has its format's dtypes, tensors and scale shapes, scales finite "
              "and positive; q/k/v and gate/up share one format and equal scales",
              "tests/test_export.py::test_inspector_catches_quantized_vision_tensor", CheckpointError,
              "export.inspect:on_disk_check"),
    CheckSpec("manifest_vs_checkpoint", "manifest == exported checkpoint", "inspect",
              "each layer's exported `quant_algo` is the manifest's, and the checkpoint holds every layer the "
              "manifest names",
              "tests/test_search.py::test_tampered_manifest_fails_against_checkpoint", ManifestMismatch,
              "export.inspect:manifest_check"),
    CheckSpec("export_agreement", "checkpoint from disk == fake-quantized model (fidelity)", "fidelity",
              "the checkpoint rebuilt from its files by the independent dequantizer is within its formats' export "
              "agreement of the fake-quantized model (KLD)",
              "tests/test_fidelity_search.py::test_checkpoint_with_a_doubled_scale_disagrees", CheckpointError,
              "pipeline.measure:export_agreement_check"),
    CheckSpec("vllm_vision_and_head", "vision tower and lm_head unquantized", "serve",
              "vLLM built every vision linear and `lm_head` unquantized, BF16, with no never-loaded scales",
              "tests/test_serving.py::test_export_without_vision_in_ignore_fails", ServingError,
              "serve.checks:vision_and_head_check"),
    CheckSpec("vllm_lm_layers", "LM layers match the manifest", "serve",
              "vLLM built every LM linear (fused `qkv_proj`, `gate_up_proj`, ...) with the method and weight dtype "
              "of its format, no never-loaded scales",
              "tests/test_serving.py::test_lower_target_keeps_some_groups_unquantized", ServingError,
              "serve.checks:lm_layers_check"),
    CheckSpec("vllm_resolves", "quant config resolves", "serve",
              "without kernels: vLLM's quantization config gives every layer a method (no mixed formats inside a "
              "fused layer)",
              "tests/test_serving.py::test_resolution_names_a_fused_layer_with_mixed_formats", ServingError,
              "serve.checks:resolution_check"),
    CheckSpec("vllm_outputs", "outputs finite and not degenerate", "serve",
              "text and image generations exist, their logprobs are finite, and the distribution is not flat",
              "tests/test_serving.py::test_degenerate_output_fails", ServingError, "serve.checks:outputs_check"),
    CheckSpec("vllm_image_sensitivity", "image changes the output", "serve",
              "two different images give different step-0 logprobs (the vision tower reaches the output)",
              "tests/test_serving.py::test_export_without_vision_in_ignore_fails", ServingError,
              "serve.checks:image_sensitivity_check"),
    CheckSpec("vllm_vision_probe", "vision tower output (raw-pixel probe)", "serve",
              "`model.visual` on fixed raw pixels gives a finite output that depends on the pixels, close to the "
              "reference's",
              "tests/test_serving.py::test_export_without_vision_in_ignore_fails", ServingError,
              "serve.checks:vision_probe_check"),
    CheckSpec("vllm_reference", "agrees with the BF16 reference", "serve",
              "greedy tokens and logprobs agree with a BF16 reference within the formats' tolerance",
              "tests/test_serving.py::test_reference_check_catches_drift", ServingError, "serve.checks:reference_check"),
    CheckSpec("vllm_kv_cache", "FP8 KV cache with calibrated scales", "serve",
              "an FP8 KV cache is active for every LM attention layer and its calibrated k/v scales were loaded",
              "tests/test_serving.py::test_kv_cache_check_fails_without_fp8_cache", ServingError,
              "serve.checks:kv_cache_check"),
)

_BY_KEY = {spec.key: spec for spec in CHECKS}
#: key -> the name tables print (tests that pin check names read them here).
CHECK_NAMES = {spec.key: spec.name for spec in CHECKS}


def get_check(key: str) -> CheckSpec:
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"no check {key!r}; registered: {', '.join(_BY_KEY)}") from None


def spec_named(name: str) -> CheckSpec | None:
    """The check registered under ``name`` (as tables print it), if any."""
    return next((spec for spec in CHECKS if spec.name == name), None)


def stage_checks(stage: str) -> tuple[CheckSpec, ...]:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    return tuple(spec for spec in CHECKS if spec.stage == stage)


def run_stage(stage: str, **context: Any) -> tuple[Check, ...]:
    """Every check registered for ``stage``, in registry order, on ``context`` (those that apply)."""
    checks = (spec.run_function()(**context) for spec in stage_checks(stage))
    return tuple(check for check in checks if check is not None)


def in_registry_order(checks: Sequence[Check]) -> tuple[Check, ...]:
    """Each registered check once, in registry order: a check made twice (the on-disk checks again before vLLM
    starts) is listed by its failed verdict if one failed, else its first.  Checks the registry does not know
    follow, in their order."""
    by_key: dict[str, Check] = {}
    for check in checks:
        if check.key and (check.key not in by_key or (by_key[check.key].ok and not check.ok)):
            by_key[check.key] = check
    return tuple(by_key[spec.key] for spec in CHECKS if spec.key in by_key) + tuple(c for c in checks if not c.key)


def checks_markdown() -> str:
    """The README's "What each check guarantees" table, from the registry."""
    rows = ["| check | stage | what it proves | negative control (a test that sees it fail) |", "|---|---|---|---|"]
    rows += [f"| {spec.name.format(folder='FOLDER')} | {spec.stage} | {spec.proves} | `{spec.negative_control}` |" for spec in CHECKS]
    return "\n".join(rows)
