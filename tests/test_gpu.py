"""`pytest -m gpu`: the full-size Qwen2.5-VL-3B path on one GPU.

Model: ``--vlq-model PATH`` / ``VLQ_MODEL`` (a local checkpoint), else the published 3B architecture
with random bf16 weights built on the GPU.  Calibration: synthetic 512-token rows (no image or
vision-marker ids, so the whole-VLM forward of the mask strategy is text-only).  The model is built
once; each variant searches a private copy that is freed afterwards.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass

import pytest

from vlq.calibration import synthetic_batches
from vlq.export import export_checkpoint
from vlq.manifest import Manifest
from vlq.schemes import NO_QUANT, Scheme
from vlq.search import LmHeadGuard, VisionGuard, search_lm_only

pytestmark = pytest.mark.gpu

SEQ_LEN = 512
STEPS = 16
GPU_MATRIX = [
    Scheme(formats=("fp8", "nvfp4"), target_bits=6.0, method="gradient", strategy="extract",
           num_calib_steps=STEPS, num_score_steps=STEPS, seq_len=SEQ_LEN),
    Scheme(formats=("fp8", "nvfp4"), target_bits=6.0, method="gradient", strategy="mask",
           num_calib_steps=STEPS, num_score_steps=STEPS, seq_len=SEQ_LEN),
    Scheme(formats=("mxfp8", "w4a16_nvfp4"), target_bits=6.0, method="gradient", strategy="extract",
           num_calib_steps=STEPS, num_score_steps=STEPS, seq_len=SEQ_LEN),
    Scheme(formats=("fp8", "int4_awq"), target_bits=6.0, method="kl_div", strategy="extract",
           num_calib_steps=4, num_score_steps=2, seq_len=SEQ_LEN),
]


@dataclass
class GpuSearched:
    scheme: Scheme
    manifest: Manifest
    vision_ok: tuple
    lm_head_ok: tuple
    live_mismatches: tuple
    state_mismatches: tuple
    checkpoint_mismatches: tuple
    checkpoint_problems: tuple
    effective_bits: float
    modelopt_bits: float
    satisfied: bool
    times: object
    peak_gpu_gib: float
    lm_module_names: tuple


@pytest.fixture(scope="session")
def gpu_calibration(gpu_pristine_vlm):
    loaded = gpu_pristine_vlm
    lowest_special = min(
        t for t in (loaded.config.image_token_id, loaded.config.video_token_id, loaded.config.vision_start_token_id,
                    getattr(loaded.config.text_config, "bos_token_id", None) or loaded.vocab_size) if t is not None
    )
    return synthetic_batches(vocab_size=loaded.vocab_size, num_batches=STEPS, seq_len=SEQ_LEN, max_token_id=lowest_special - 1)


@pytest.fixture(scope="module", params=GPU_MATRIX, ids=lambda s: s.id)
def gpu_searched(request, gpu_pristine_vlm, gpu_calibration, tmp_path_factory):
    import torch

    scheme = request.param
    loaded = copy.deepcopy(gpu_pristine_vlm)
    try:
        result = search_lm_only(loaded, scheme, gpu_calibration)
        manifest = Manifest.from_search(result)
        live = manifest.verify(model=loaded.vlm)
        state = manifest.verify(state=result.modelopt_state)
        vision = VisionGuard(loaded).check(result)
        head = LmHeadGuard(loaded).check(result)
        export = export_checkpoint(loaded, tmp_path_factory.mktemp(scheme.id) / "ckpt", verify=False)
        on_disk = manifest.verify(checkpoint=export.path)
        out = GpuSearched(
            scheme, manifest, (vision.ok, vision.problems), (head.ok, head.problems), live.problems, state.problems,
            on_disk.problems, export.report.check.problems, result.achieved_bits, result.modelopt_achieved_bits,
            result.is_satisfied, result.times, (result.peak_gpu_bytes or 0) / 2**30, tuple(loaded.lm_module_names()),
        )
        print(f"\n[gpu] {scheme.id}: {result.times} peak {out.peak_gpu_gib:.2f} GiB, bits {result.achieved_bits:.3f}, "
              f"formats {manifest.format_counts()}")
    finally:
        del loaded
        gc.collect()
        torch.cuda.empty_cache()
    return out


def test_vision_and_lm_head_stay_unquantized(gpu_searched, record_property):
    record_property("peak_gpu_gib", round(gpu_searched.peak_gpu_gib, 3))
    record_property("search_s", round(gpu_searched.times.total_s, 2))
    assert gpu_searched.vision_ok[0], gpu_searched.vision_ok[1]
    assert gpu_searched.lm_head_ok[0], gpu_searched.lm_head_ok[1]


def test_manifest_state_quantizers_export_agree(gpu_searched):
    assert not gpu_searched.state_mismatches, gpu_searched.state_mismatches
    assert not gpu_searched.live_mismatches, gpu_searched.live_mismatches
    assert not gpu_searched.checkpoint_mismatches, gpu_searched.checkpoint_mismatches
    assert not gpu_searched.checkpoint_problems, gpu_searched.checkpoint_problems


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


def test_tied_lm_head_never_reaches_an_export_quantized(gpu_pristine_vlm, gpu_calibration, tmp_path):
    """Negative control on the full-size model: an unguarded search quantizes the tied lm_head; both
    the guard and the export check catch it."""
    import torch

    assert gpu_pristine_vlm.tied_lm_head
    loaded = copy.deepcopy(gpu_pristine_vlm)
    try:
        scheme = Scheme(formats=("fp8",), target_bits=8.0, strategy="mask", num_calib_steps=2, num_score_steps=2, seq_len=SEQ_LEN)
        result = search_lm_only(loaded, scheme, gpu_calibration, disable_vision=False, exclude_cost=False)
        assert not LmHeadGuard(loaded).check(result).ok
        assert not VisionGuard(loaded).check(result).ok
        from vlq.errors import CheckpointError

        with pytest.raises(CheckpointError, match="lm_head|vision"):
            export_checkpoint(loaded, tmp_path / "ckpt")
        assert not (tmp_path / "ckpt").exists()
    finally:
        del loaded
        gc.collect()
        torch.cuda.empty_cache()
