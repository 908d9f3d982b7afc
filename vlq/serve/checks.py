"""Stage 7b — what a served checkpoint must show, layer by layer, checked on :mod:`vlq.serve.runner`'s data.

* :func:`check_vision_and_head_unquantized` — every ``visual.*`` linear and ``lm_head`` keeps an
  unquantized method (a checkpoint whose ignore list lacks the tower loads "fine" in vLLM, with
  never-loaded scales and a vision tower that outputs exactly 0);
* :func:`check_lm_layers` — every LM linear (vLLM's fused ``qkv_proj``/``o_proj``/``gate_up_proj``/
  ``down_proj``) uses the method and weight dtype the manifest (or the checkpoint config) says;
* :func:`check_outputs` — generations are finite and not degenerate;
* :func:`check_image_sensitivity` and :func:`check_vision_probe` — the vision tower really works;
* :func:`check_against_reference` — greedy tokens and logprobs agree with a BF16 reference within a
  tolerance suited to the format;
* :func:`check_kv_cache` — an FP8 KV cache is active and its calibrated scales were loaded.

Every check returns a :class:`vlq.checks.check.Check` whose ``require()`` raises :class:`ServingError`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from ..checks.check import Check
from ..checks.registry import get_check, run_stage
from ..runtime.errors import CheckpointError, ServingError
from ..formats.registry import (
    FORMATS, FUSED_GROUPS, FUSED_LAYER_OF, NO_QUANT, UNKNOWN_FORMAT_REFERENCE, UNQUANTIZED_REFERENCE, UNQUANTIZED_WEIGHT_DTYPES,
    format_of_algo,
)
from ..formats.spec import LogprobTolerance
from .results import GenerationResult, QuantResolution, ServedLayer, ServingReport, is_unquantized_method
from .resolution import preflight, read_config

# ------------------------------------------------------------------------------------------------
# Names and expectations
# ------------------------------------------------------------------------------------------------

LM_LINEAR_RE = re.compile(r"^language_model\.model\.layers\.(\d+)\.(self_attn\.(?:qkv_proj|o_proj)|mlp\.(?:gate_up_proj|down_proj))$")
VISION_PREFIX = "visual."
LM_HEAD_NAMES = ("language_model.lm_head", "lm_head")


def expected_methods(fmt: str) -> tuple[str, ...]:
    """The quant-method class names a layer served in vlq format ``fmt`` may carry (none for an unserved format)."""
    support = FORMATS[fmt].vllm if fmt in FORMATS else None
    return support.methods if support is not None else ()


def expected_weight_dtypes(fmt: str) -> tuple[str, ...]:
    """The torch dtypes a served layer's weight may have in ``fmt`` (:data:`NO_QUANT`: BF16/FP16)."""
    if fmt == NO_QUANT:
        return UNQUANTIZED_WEIGHT_DTYPES
    support = FORMATS[fmt].vllm if fmt in FORMATS else None
    return support.weight_dtypes if support is not None else ()


def vllm_layer_name(member: str, lm_path: str = "model.language_model", vision_root: str = "model.visual") -> str:
    """Map a transformers-5 module name to the fused layer vLLM builds for it.

    ``model.language_model.layers.0.self_attn.q_proj`` -> ``language_model.model.layers.0.self_attn.qkv_proj``.
    """
    from ..export.inspect import checkpoint_module_name

    hub = checkpoint_module_name(member, lm_path, vision_root)  # model.layers.0.self_attn.q_proj
    parent, _, leaf = hub.rpartition(".")
    leaf = FUSED_LAYER_OF.get(leaf, leaf)
    if hub == "lm_head":
        return "language_model.lm_head"
    if hub.startswith("model."):
        return f"language_model.{parent}.{leaf}"
    return f"{parent}.{leaf}" if parent else leaf


def expected_lm_formats(*, manifest=None, checkpoint: str | os.PathLike | None = None) -> dict[str, str]:
    """vLLM layer name -> expected vlq format for every LM linear, from a manifest or a checkpoint config."""
    expected: dict[str, str] = {}
    conflicts: list[str] = []
    if manifest is not None:
        for group in manifest.groups:
            for member in group.members:
                name = vllm_layer_name(member, manifest.lm_path, manifest.vision_root)
                if expected.setdefault(name, group.chosen) != group.chosen:
                    conflicts.append(f"{name}: manifest gives its shards {expected[name]} and {group.chosen}")
    elif checkpoint is not None:
        from ..export.inspect import CheckpointQuantConfig

        path = Path(checkpoint)
        config = CheckpointQuantConfig.read(path)
        layers = _num_text_layers(path)
        for i in range(layers):
            for parent, leaves in (("self_attn", ("qkv_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj"))):
                for leaf in leaves:
                    shards = FUSED_GROUPS.get(leaf, (leaf,))
                    formats = {format_of_algo(config.algo_for(f"model.layers.{i}.{parent}.{s}")) for s in shards}
                    name = f"language_model.model.layers.{i}.{parent}.{leaf}"
                    if len(formats) != 1:
                        conflicts.append(f"{name}: checkpoint config gives its shards {sorted(formats)}")
                    expected[name] = sorted(formats)[0]
    else:
        raise ValueError("expected_lm_formats needs manifest= or checkpoint=.")
    if conflicts:
        raise ServingError("Fused layers with mixed formats cannot be served:\n  " + "\n  ".join(conflicts))
    return expected


def _num_text_layers(path: Path) -> int:
    config = read_config(path)
    text = config.get("text_config") or config
    return int(text["num_hidden_layers"])


def _result(key: str, problems: Sequence[str], checked: int, detail: str = "") -> Check:
    return get_check(key).result(problems, checked, detail)


# ------------------------------------------------------------------------------------------------
# Guarantees
# ------------------------------------------------------------------------------------------------


def _layers_of(source) -> tuple[ServedLayer, ...]:
    return tuple(source.layers) if hasattr(source, "layers") else tuple(source)


def check_vision_and_head_unquantized(source) -> Check:
    """Every ``visual.*`` module with a quant method, and ``lm_head``, are unquantized with loaded weights."""
    layers = _layers_of(source)
    problems = []
    vision = [l for l in layers if l.name.startswith(VISION_PREFIX)]
    heads = [l for l in layers if l.name in LM_HEAD_NAMES]
    if not vision:
        problems.append("no vision-tower layer (visual.*) found in the served model")
    if not heads:
        problems.append("no lm_head found in the served model")
    for layer in vision + heads:
        if not is_unquantized_method(layer.quant_method):
            problems.append(f"{layer.name} ({layer.layer_cls}) uses {layer.quant_method}, expected Unquantized*")
        if layer.weight_dtype is not None and layer.weight_dtype not in UNQUANTIZED_WEIGHT_DTYPES:
            problems.append(f"{layer.name} weight dtype {layer.weight_dtype}, expected bf16/fp16")
        if layer.unloaded_scales:
            problems.append(f"{layer.name} has never-loaded scales {list(layer.unloaded_scales)}")
    return _result("vllm_vision_and_head", problems, len(vision) + len(heads),
                   f"{len(vision)} vision layers, lm_head")


def check_lm_layers(source, expected: dict[str, str]) -> Check:
    """Every LM linear uses the quant method and weight dtype of its expected format."""
    layers = {l.name: l for l in _layers_of(source) if LM_LINEAR_RE.match(l.name)}
    problems = []
    for name in sorted(set(expected) - set(layers)):
        problems.append(f"{name}: expected {expected[name]}, but vLLM built no such layer")
    for name in sorted(set(layers) - set(expected)):
        problems.append(f"{name}: served as {layers[name].quant_method} but has no expected format")
    for name in sorted(set(layers) & set(expected)):
        layer, fmt = layers[name], expected[name]
        if fmt == NO_QUANT:
            ok_method = is_unquantized_method(layer.quant_method)
        else:
            ok_method = layer.quant_method in expected_methods(fmt)
        if not ok_method:
            want = "Unquantized*" if fmt == NO_QUANT else "/".join(expected_methods(fmt) or ("?",))
            problems.append(f"{name}: expected {fmt} ({want}), vLLM uses {layer.quant_method}")
        dtypes = expected_weight_dtypes(fmt)
        if layer.weight_dtype is not None and dtypes and layer.weight_dtype not in dtypes:
            problems.append(f"{name}: expected {fmt} weight dtype {'/'.join(dtypes)}, found {layer.weight_dtype}")
        if layer.unloaded_scales:
            problems.append(f"{name} has never-loaded scales {list(layer.unloaded_scales)}")
    counts: dict[str, int] = {}
    for fmt in expected.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return _result("vllm_lm_layers", problems, len(expected), detail)


def _uniform(step: tuple[tuple[int, float], ...]) -> bool:
    values = [lp for _, lp in step]
    return len(values) >= 2 and max(values) - min(values) < 1e-6


def check_outputs(generations: Iterable[GenerationResult] | ServingReport) -> Check:
    """Generations exist, their logprobs are finite, and the distribution is not flat.

    A random-weight model legitimately repeats one token, so repetition alone is no failure; a
    flat top-k at every step (zero logits, a dead model) is.
    """
    if isinstance(generations, ServingReport):
        generations = (generations.text, generations.image, generations.image_alt)
    generations = tuple(generations)
    problems = []
    for g in generations:
        label = f"{g.kind} generation"
        if not g.token_ids:
            problems.append(f"{label} produced no tokens")
            continue
        bad = [i for i, lp in enumerate(g.logprobs) if not math.isfinite(lp) or lp > 1e-6]
        if bad or len(g.logprobs) != len(g.token_ids):
            problems.append(f"{label}: missing or non-finite logprobs at steps {bad or 'all'}")
        bad_top = [i for i, step in enumerate(g.top_logprobs) if any(not math.isfinite(lp) for _, lp in step)]
        if bad_top:
            problems.append(f"{label}: non-finite top-k logprobs at steps {bad_top}")
        if g.top_logprobs and all(_uniform(step) for step in g.top_logprobs):
            problems.append(
                f"{label} is degenerate: the top-{len(g.top_logprobs[0])} logprobs are equal at every step "
                f"(tokens {list(g.token_ids)}, logprob {g.logprobs[0]:.4f})"
            )
    return _result("vllm_outputs", problems, len(generations))


def check_image_sensitivity(report: ServingReport, *, min_delta: float = 1e-6) -> Check:
    """Two different images give different step-0 logprobs (a dead vision tower gives identical ones)."""
    a, b = report.image.top(0), report.image_alt.top(0)
    shared = set(a) & set(b)
    problems = []
    if not a or not b:
        problems.append("no step-0 logprobs for the image prompts")
        delta = float("nan")
    elif not shared:
        delta = float("inf")  # different top-k sets: the image clearly matters
    else:
        delta = max(abs(a[k] - b[k]) for k in shared)
        if not delta > min_delta:
            problems.append(
                f"step-0 logprobs are identical for two different images (max |Δ| {delta:.2e} <= {min_delta:g}): "
                "the output does not depend on the image, so the vision tower is not working"
            )
    return _result("vllm_image_sensitivity", problems, 1, f"max |Δ step-0 logprob| {delta:.4g}")


def check_vision_probe(report: ServingReport, reference: ServingReport | None = None, *, min_cos: float = 0.99) -> Check:
    """``model.visual`` on fixed raw pixels gives a finite output that depends on the pixels (and is close
    to the reference's)."""
    probe = report.vision_probe
    problems = []
    if not probe.ran:
        return _result("vllm_vision_probe", [], 0, f"not run: {probe.error}")
    if not probe.values:
        problems.append("the vision tower returned an empty output")
    elif not probe.finite:
        problems.append("the vision tower output is not finite")
    elif probe.abs_mean == 0.0:
        problems.append("the vision tower output is exactly 0 (quantized with never-loaded scales?)")
    elif probe.values_alt and max(abs(a - b) for a, b in zip(probe.values, probe.values_alt)) <= 1e-6:
        problems.append(
            "the vision tower output does not depend on its pixels (two inputs give the same output: "
            "its linears compute 0 and only biases remain; quantized with never-loaded scales?)"
        )
    detail = f"|mean| {probe.abs_mean:.4g}"
    if reference is not None and reference.vision_probe.ran and not problems:
        ref = reference.vision_probe.values
        if len(ref) != len(probe.values):
            problems.append(f"vision output size {len(probe.values)} != reference {len(ref)}")
        else:
            dot = sum(x * y for x, y in zip(probe.values, ref))
            norm = math.sqrt(sum(x * x for x in probe.values)) * math.sqrt(sum(y * y for y in ref))
            cos = dot / norm if norm else 0.0
            detail += f", cos vs reference {cos:.4f}"
            if cos < min_cos:
                problems.append(f"vision output cos {cos:.4f} vs the BF16 reference < {min_cos}")
    return _result("vllm_vision_probe", problems, 1, detail)


def reference_tolerance(fmt: str) -> LogprobTolerance:
    """How close greedy outputs of ``fmt`` stay to the BF16 reference (:attr:`vlq.formats.spec.VllmSupport.reference`)."""
    if fmt == NO_QUANT:
        return UNQUANTIZED_REFERENCE
    support = FORMATS[fmt].vllm if fmt in FORMATS else None
    return support.reference if support is not None else UNKNOWN_FORMAT_REFERENCE


def tolerance_for(report: ServingReport) -> LogprobTolerance:
    from ..export.inspect import CheckpointQuantConfig

    formats = {NO_QUANT}
    try:
        qc = CheckpointQuantConfig.read(report.checkpoint)
        if qc.quant_algo == "MIXED_PRECISION":
            formats |= {format_of_algo(a) for a in qc.quantized_layers.values()}
        elif qc.quant_algo is not None:
            formats.add(format_of_algo(qc.quant_algo))
        if qc.kv_cache_quant_algo is not None:
            formats.add("fp8")
    except CheckpointError:
        pass
    chosen = [reference_tolerance(f) for f in formats]
    return LogprobTolerance(all(t.same_tokens for t in chosen), max(t.max_abs_logprob for t in chosen))


def check_against_reference(report: ServingReport, reference: ServingReport, tolerance: LogprobTolerance | None = None) -> Check:
    """Greedy steps agree with a BF16 reference within the format's :class:`vlq.formats.spec.LogprobTolerance`."""
    tol = tolerance or tolerance_for(report)
    problems = []
    worst = 0.0
    labels = ("text", "image", "other image")
    pairs = ((report.text, reference.text), (report.image, reference.image), (report.image_alt, reference.image_alt))
    for label, (mine, ref) in zip(labels, pairs):
        if mine.prompt_len != ref.prompt_len:
            problems.append(f"{label}: prompt length {mine.prompt_len} != reference {ref.prompt_len}")
            continue
        if not mine.token_ids or not ref.token_ids:
            problems.append(f"{label}: no tokens to compare")
            continue
        for step, (tok, ref_tok) in enumerate(zip(mine.token_ids, ref.token_ids)):
            mine_top = mine.top(step)
            got = mine.logprobs[step] if tok == ref_tok else mine_top.get(ref_tok)
            if got is None:
                problems.append(f"{label}: reference token {ref_tok} is not in the top-{len(mine_top)} at step {step}")
                break
            delta = abs(got - ref.logprobs[step])
            worst = max(worst, delta)
            if not delta <= tol.max_abs_logprob:
                problems.append(f"{label}: |Δ logprob| {delta:.4f} > {tol.max_abs_logprob} at step {step}")
            if tok != ref_tok:
                ref_of_mine = ref.top(step).get(tok)
                gap = ref.logprobs[step] - ref_of_mine if ref_of_mine is not None else float("inf")
                if tol.same_tokens and not gap <= 2 * tol.max_abs_logprob:
                    problems.append(
                        f"{label}: greedy token {tok} != reference {ref_tok} at step {step}, and not a near-tie "
                        f"(the reference ranks it {gap:.3f} below its top-1)"
                    )
                break  # contexts diverge from here
    return _result("vllm_reference", problems, len(pairs),
                   f"max |Δ logprob| {worst:.4f} (tolerance {tol.max_abs_logprob}{', same tokens but near-ties' if tol.same_tokens else ''})")


def check_kv_cache(report: ServingReport, *, checkpoint: str | os.PathLike | None = None) -> Check:
    """An FP8 KV cache is active for every LM attention layer and the calibrated k/v scales were loaded."""
    problems = []
    lm_kv = [k for k in report.kv_layers if k.name.startswith("language_model.")]
    if not report.kv_cache_dtype.startswith("fp8"):
        problems.append(f"engine kv_cache_dtype is {report.kv_cache_dtype}, expected fp8")
    if not lm_kv:
        problems.append("no language-model attention layer reports a KV cache")
    stored = _stored_kv_scales(Path(checkpoint or report.checkpoint))
    for layer in lm_kv:
        if not layer.kv_cache_dtype.startswith("fp8"):
            problems.append(f"{layer.name}: kv_cache_dtype {layer.kv_cache_dtype}, expected fp8")
        match = re.search(r"layers\.(\d+)\.", layer.name)
        want = stored.get(int(match.group(1))) if match else None
        if want is None:
            problems.append(f"{layer.name}: the checkpoint has no k_scale/v_scale for this layer")
            continue
        for label, got, exp in (("k_scale", layer.k_scale, want[0]), ("v_scale", layer.v_scale, want[1])):
            if not (math.isfinite(got) and abs(got - exp) <= 1e-2 * abs(exp)):
                problems.append(f"{layer.name}: served {label} {got:.6g} != checkpoint {exp:.6g} (scale not loaded)")
    return _result("vllm_kv_cache", problems, len(lm_kv),
                   f"{report.kv_cache_dtype}, {len(lm_kv)} attention layers")


def _stored_kv_scales(path: Path) -> dict[int, tuple[float, float]]:
    from safetensors import safe_open

    found: dict[int, dict[str, float]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            for key in fh.keys():
                match = re.search(r"layers\.(\d+)\.self_attn\.[kv]_proj\.([kv]_scale)$", key)
                if match:
                    found.setdefault(int(match.group(1)), {})[match.group(2)] = float(fh.get_tensor(key).float())
    return {i: (d["k_scale"], d["v_scale"]) for i, d in found.items() if "k_scale" in d and "v_scale" in d}


def run_checks(report: ServingReport, *, manifest=None, reference: ServingReport | None = None) -> tuple[Check, ...]:
    """Every guarantee that applies to ``report`` (LM expectations from the manifest, else the config): the serve
    stage's registered checks."""
    return run_stage("serve", report=report, manifest=manifest, reference=reference)


def check_resolution(resolution: QuantResolution, *, manifest=None) -> tuple[Check, ...]:
    """The guarantees that hold without kernels: per-layer methods only."""
    return run_stage("serve", resolution=resolution, manifest=manifest)


# ------------------------------------------------------------------------------------------------
# The serve stage's registered checks (vlq.checks.registry): each on an engine's report, or on the per-layer
# resolution made without kernels, where it applies
# ------------------------------------------------------------------------------------------------


def _expected(source, manifest) -> dict[str, str]:
    return expected_lm_formats(manifest=manifest) if manifest is not None else expected_lm_formats(checkpoint=source.checkpoint)


def vision_and_head_check(*, report: ServingReport | None = None, resolution: QuantResolution | None = None, **_) -> Check:
    return check_vision_and_head_unquantized(report if report is not None else resolution)


def lm_layers_check(*, report: ServingReport | None = None, resolution: QuantResolution | None = None, manifest=None, **_) -> Check:
    source = report if report is not None else resolution
    return check_lm_layers(source, _expected(source, manifest))


def resolution_check(*, resolution: QuantResolution | None = None, **_) -> Check | None:
    if resolution is None or not resolution.errors:
        return None
    return _result("vllm_resolves", resolution.errors, len(resolution.layers))


def outputs_check(*, report: ServingReport | None = None, **_) -> Check | None:
    return None if report is None else check_outputs(report)


def image_sensitivity_check(*, report: ServingReport | None = None, **_) -> Check | None:
    return None if report is None else check_image_sensitivity(report)


def vision_probe_check(*, report: ServingReport | None = None, reference: ServingReport | None = None, **_) -> Check | None:
    return None if report is None else check_vision_probe(report, reference)


def reference_check(*, report: ServingReport | None = None, reference: ServingReport | None = None, **_) -> Check | None:
    return None if report is None or reference is None else check_against_reference(report, reference)


def kv_cache_check(*, report: ServingReport | None = None, **_) -> Check | None:
    if report is None or not report.kv_layers or preflight(report.checkpoint).kv_cache_quant_algo is None:
        return None
    return check_kv_cache(report)
