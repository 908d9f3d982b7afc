"""`pytest -m gpu`: the full-size Qwen2.5-VL-3B path on one GPU.

Model: ``--vlq-model PATH`` / ``VLQ_MODEL`` (a local checkpoint), else the published 3B architecture
with random bf16 weights built on the GPU.  Variants: every ``lane: gpu`` entry of
``tests/matrix/search_variants.yaml``.  Calibration: seeded synthetic rows below the vision markers
(``vlq.data.calibration.synthetic_text_calibration``), so the whole-VLM forward of the mask strategy is
text-only.  The model is built once; each variant searches and exports a private copy through
:mod:`vlq.pipeline` that is freed afterwards, keeping only plain results.
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass

import pytest

from helpers import variant_params
from vlq import pipeline
from vlq.data.calibration import synthetic_text_calibration
from vlq.checks.check import Check
from vlq.export.export import export_checkpoint
from vlq.manifest.manifest import Manifest
from vlq.pipeline import fresh_copy
from vlq.formats.registry import NO_QUANT
from vlq.search.scheme import Scheme
from vlq.checks.registry import CHECK_NAMES
from vlq.search.guards import LmHeadGuard, VisionGuard
from vlq.search.accounting import PhaseTimes
from vlq.search.search import search_lm_only

pytestmark = pytest.mark.gpu


def _calibration(loaded, scheme: Scheme):
    return synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, batch_size=scheme.batch_size,
                                      num_batches=max(scheme.num_calib_steps, scheme.num_score_steps), seq_len=scheme.seq_len)


@dataclass(frozen=True)
class GpuSearched:
    """What one variant's search and export showed; plain data, so the model copy can be freed."""

    scheme: Scheme
    manifest: Manifest
    checks: tuple[Check, ...]  # the pipeline's: guards, manifest vs state/live quantizers/checkpoint, on disk
    achieved_bits: float
    modelopt_bits: float
    satisfied: bool
    times: PhaseTimes
    peak_gpu_gib: float
    lm_module_names: tuple[str, ...]

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)


@pytest.fixture(scope="module", params=variant_params("gpu"))
def gpu_searched(request, gpu_pristine_vlm, tmp_path_factory):
    import torch

    scheme = request.param
    loaded = fresh_copy(gpu_pristine_vlm)
    searched = None
    folder = tmp_path_factory.mktemp(scheme.id)
    try:
        searched = pipeline.search(loaded, scheme, _calibration(loaded, scheme))
        exported = pipeline.export(searched, folder / "checkpoint")
        result = searched.result
        out = GpuSearched(
            scheme, searched.manifest, searched.checks + exported.checks, result.achieved_bits, result.modelopt_achieved_bits,
            result.is_satisfied, result.times, (result.peak_gpu_bytes or 0) / 2**30, tuple(loaded.lm_module_names()),
        )
        print(f"\n[gpu] {scheme.id}: {result.times} peak {out.peak_gpu_gib:.2f} GiB, bits {result.achieved_bits:.3f}, "
              f"formats {searched.manifest.format_counts()}")
        del exported, result
    finally:
        del loaded, searched
        gc.collect()
        torch.cuda.empty_cache()
        # the checks ran; the 4 GiB checkpoint goes (several variants and the family share the lane's disk)
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    return out


def test_vision_and_lm_head_stay_unquantized(gpu_searched, record_property):
    record_property("peak_gpu_gib", round(gpu_searched.peak_gpu_gib, 3))
    record_property("search_s", round(gpu_searched.times.total_s, 2))
    vision, head = gpu_searched.check(VisionGuard.name), gpu_searched.check(LmHeadGuard.name)
    assert vision.ok and vision.checked > 0, vision.problems
    assert head.ok, head.problems


def test_manifest_state_quantizers_export_agree(gpu_searched):
    assert [c.name for c in gpu_searched.checks] == [CHECK_NAMES[k].format(folder="checkpoint") for k in (
        "vision_guard", "lm_head_guard", "manifest_vs_search", "checkpoint_on_disk", "manifest_vs_checkpoint")]
    for check in gpu_searched.checks:
        assert check.ok, (check.name, check.problems)


def test_bits_within_bounds(gpu_searched):
    scheme = gpu_searched.scheme
    assert gpu_searched.satisfied
    assert scheme.minimum_bits - 1e-9 <= gpu_searched.achieved_bits <= scheme.target_bits + 1e-9
    assert gpu_searched.modelopt_bits == pytest.approx(gpu_searched.achieved_bits)


def test_every_lm_linear_decided_and_fused_groups_share(gpu_searched):
    decided = sorted(m for g in gpu_searched.manifest.groups for m in g.members)
    assert decided == sorted(gpu_searched.lm_module_names)
    for g in gpu_searched.manifest.groups:
        leaves = {m.rsplit(".", 1)[1] for m in g.members}
        assert leaves in ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"o_proj"}, {"down_proj"})
        assert g.chosen in set(gpu_searched.scheme.formats) | {NO_QUANT}


def test_tied_lm_head_never_reaches_an_export_quantized(gpu_pristine_vlm, tmp_path):
    """Negative control on the full-size model: an unguarded search quantizes the tied lm_head; both
    the guard and the export check catch it."""
    import torch

    assert gpu_pristine_vlm.tied_lm_head
    loaded = fresh_copy(gpu_pristine_vlm)
    result = None
    try:
        scheme = Scheme(formats=("fp8",), target_bits=8.0, strategy="mask", num_calib_steps=2, num_score_steps=2, seq_len=512)
        result = search_lm_only(loaded, scheme, _calibration(loaded, scheme), disable_vision=False, exclude_cost=False)
        assert not LmHeadGuard(loaded).check(result).ok
        assert not VisionGuard(loaded).check(result).ok
        from vlq.runtime.errors import CheckpointError

        with pytest.raises(CheckpointError, match="lm_head|vision"):
            export_checkpoint(loaded, tmp_path / "ckpt")
        assert not (tmp_path / "ckpt").exists()
    finally:
        del loaded, result
        gc.collect()
        torch.cuda.empty_cache()


def test_cuda_extensions_load_before_calibration(gpu_pristine_vlm, record_property):
    """On CUDA the scheme's extensions are loaded (built on a cold cache) in their own phase before the
    search's clock starts: ModelOpt loads none during calibration or scoring, the phases add up, and a
    second search in the process loads nothing again (its extension phase is "none")."""
    import torch

    from vlq.runtime.cuda_extensions import FP8_EXT, loaded_in_process
    from vlq.search.results import timing_summary

    scheme = Scheme(formats=("fp8", "nvfp4"), target_bits=6.0, num_calib_steps=1, num_score_steps=1, seq_len=512)
    results = []
    for _ in range(2):
        loaded = fresh_copy(gpu_pristine_vlm)
        try:
            result = search_lm_only(loaded, scheme, _calibration(loaded, scheme))
            results.append((result.extensions, result.times, result.extensions_loaded_while_searching, timing_summary(result)))
            del result
        finally:
            del loaded
            gc.collect()
            torch.cuda.empty_cache()
    (first, first_times, first_late, first_line), (second, second_times, second_late, _) = results
    record_property("extension_phase", first.phase)
    record_property("extension_build_s", round(first_times.extension_build_s, 2))
    print(f"\n[gpu] extensions: {first.summary()}; {first_line}")
    assert first.applicable and FP8_EXT in first.needed and not first.failed, first.summary()
    assert set(first.needed) == {n for n, _ in first.loaded} | set(first.already_loaded)
    assert set(first.needed) <= loaded_in_process()
    assert first_late == () and second_late == (), (first_late, second_late)  # nothing built inside calibrate/score
    assert first_times.total_s == pytest.approx(first_times.extension_build_s + first_times.searching_s)
    assert first_times.extension_build_s == pytest.approx(first.seconds)
    assert (first.phase in first_line) == bool(first.loaded)
    assert second.loaded == () and set(second.already_loaded) == set(second.needed) and second.phase == "none"
