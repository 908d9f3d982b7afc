"""`pytest -m gpu`: fidelity to BF16 on the full-size 3B architecture (issue 11), points a and b.

The published 3B shape (random weights, or ``--vlq-model``) searched at the recommended full-size settings
(fp8+nvfp4, 6 bits, 16+16 x 512), then measured on held-out text and image+text disjoint from calibration:

* point a, the fake-quantized model, moves away from BF16 (KLD > 0, finite) while the unquantized copy
  measured the same way sits at KLD ~0 (the control: the yardstick itself adds nothing on a GPU);
* point b, the exported checkpoint re-read by vlq's independent dequantizer on the GPU (NVFP4 and FP8
  decoded from disk), agrees with point a within the per-format tolerance, and a checkpoint whose
  down_proj weight scales were doubled does not (the control: the agreement check can fail); an E4M3
  block scale doubled past its range (NaN on disk) is a failed check too, not a crash;
* layer by layer, every linear read from disk equals ModelOpt's fake quant of its weight and of the
  activations it really sees on held-out text (``vlq.export.dequant`` tolerances), so a model-level
  disagreement can be traced to a layer.

Measured on an H200 (2026-12-01): KLD(BF16||a) 0.0547, KLD(a||b) 0.059 (1.08x, within FP8's derived 1.5x),
and 0.056 still with a's own fake-quantized weights loaded into b's model: scripts/diagnose_b_vs_a.py traced
that to RoPE (the random-shape builder cast inv_freq to bf16; the rebuilt checkpoint keeps float32), fixed
since; the lane passed after the fix.  Doubled tensor scales sit 8.6x away and are caught; the
layer-by-layer comparison is the sharp check on this shape.

Timing of point a on 32 rows is a benchmark (benchmarks/test_fidelity_benchmarks.py), never asserted here.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass

import pytest

from helpers import down_proj_tensor_scales, tampered_copy
from vlq import pipeline
from vlq.checks.check import Check
from vlq.fidelity.metrics import FidelityMetrics, logits_forward
from vlq.fidelity.reference import FidelityReference, capture_reference
from vlq.manifest.manifest import Manifest
from vlq.pipeline import fresh_copy
from vlq.search.scheme import Scheme

pytestmark = pytest.mark.gpu

SCHEME = Scheme(formats=("fp8", "nvfp4"), target_bits=6.0, num_calib_steps=16, num_score_steps=16, seq_len=512)
#: held-out rows per data kind (the benchmark measures 32; 8 keep the lane short)
ROWS = 8


@dataclass(frozen=True)
class Measured3B:
    """Points a and b of one 3B search, as plain data (the model copy is freed before the checks)."""

    manifest: Manifest
    unquantized: tuple[FidelityMetrics, ...]  # the BF16 copy against its own reference: the control
    fake_quant: tuple[FidelityMetrics, ...]  # point a, text and image+text
    checkpoint: tuple[FidelityMetrics, ...]  # point b, text and image+text
    fake_quant_logits: FidelityReference  # a's logits on held-out text, to check the checkpoint against
    layers: dict  # checkpoint layer name -> (fake-quantized weight, held-out input x, input_quantizer(x)), CPU
    folded: tuple[int, int, float]  # weights quantized once: (linears folded, quantized LM linears, max |logit diff| vs live)
    path: object  # the exported checkpoint
    seconds: dict


@pytest.fixture(scope="module")
def measured_3b(gpu_pristine_vlm, tmp_path_factory):
    import torch

    from vlq.export.export import unify_fused_scales

    loaded = fresh_copy(gpu_pristine_vlm)
    folder = tmp_path_factory.mktemp("fidelity-3b")
    seconds = {}
    try:
        calibration = pipeline.calibrate(loaded, SCHEME)
        start = time.perf_counter()
        references = pipeline.fidelity_references(loaded, SCHEME, calibration=calibration, rows=ROWS)
        seconds["reference"] = time.perf_counter() - start
        unquantized = pipeline.measure_fake_quant(loaded, references)
        searched = pipeline.search(loaded, SCHEME, calibration)
        failed = [(c.name, c.problems[:3]) for c in searched.checks if not c.ok]
        assert not failed, failed
        unify_fused_scales(loaded.language_model)  # as `vlq run` measures a: fused scales as exported
        start = time.perf_counter()
        fake_quant = pipeline.measure_fake_quant(loaded, references)
        seconds["point_a"] = time.perf_counter() - start
        text = references[0]
        assert text.data_kind == "text"
        fake_quant_logits = capture_reference(logits_forward(loaded.vlm), text.batches, data_source="fake-quant", data_kind="text")
        layers = _live_layers(loaded, text.batches[0])
        folded = _folded_against_live(loaded, text.batches[0], quantized=len(layers))
        path = pipeline.export(searched, folder / "checkpoint").path
        manifest = searched.manifest
        del searched, loaded  # point b builds the dequantized model on the GPU; a's copy is no longer needed
        gc.collect()
        torch.cuda.empty_cache()
        start = time.perf_counter()
        checkpoint = pipeline.measure_checkpoint(path, references)
        seconds["point_b"] = time.perf_counter() - start
        diagnosis = _weights_or_activations(path, layers, fake_quant_logits)
        print(f"\n[gpu fidelity] {SCHEME.id}, {ROWS} rows x {SCHEME.seq_len} per kind: {manifest.format_counts()}; "
              + "; ".join(f"{m.measurement_point} {m.data_kind}: {m.summary_row()}" for m in fake_quant + checkpoint)
              + f"; seconds {', '.join(f'{k} {v:.1f}' for k, v in seconds.items())}; a vs b: {diagnosis}", flush=True)
        yield Measured3B(manifest, unquantized, fake_quant, checkpoint, fake_quant_logits, layers, folded, path, seconds)
    finally:
        gc.collect()
        torch.cuda.empty_cache()
        shutil.rmtree(folder, ignore_errors=True)  # ~4 GiB; the lane's disk is shared


def _live_layers(loaded, batch, tokens: int = 64) -> dict:
    """Every quantized LM linear's fake-quantized weight, and the input it sees on ``batch`` (first
    ``tokens`` positions) before and after its input quantizer; checkpoint names, CPU."""
    import torch

    lm = loaded.language_model
    quantized = {name: m for name, m in lm.named_modules()
                 if hasattr(m, "weight_quantizer") and hasattr(m, "in_features") and m.weight_quantizer.is_enabled}
    seen: dict = {}

    def keep(name):
        def hook(_module, args):
            seen[name] = args[0].reshape(-1, args[0].shape[-1])[:tokens].detach().clone()
            # returns None: a pre-hook that returns a value replaces the layer's input

        return hook

    hooks = [m.register_forward_pre_hook(keep(name)) for name, m in quantized.items()]
    try:
        with torch.no_grad():
            logits_forward(loaded.vlm)(batch)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        # the export writes the language model (model.language_model in transformers 5) as model.*
        return {f"model.{name}": (m.weight_quantizer(m.weight).cpu(), seen[name].cpu(), m.input_quantizer(seen[name]).cpu())
                for name, m in quantized.items()}


def _folded_against_live(loaded, batch, *, quantized: int) -> tuple[int, int, float]:
    """Point a is measured with each fake-quantized weight computed once (``weights_quantized_once``);
    on the GPU kernels that must still give the live forward's logits, bit for bit."""
    import torch

    from vlq.fidelity.quantized_weights import weights_quantized_once

    forward = logits_forward(loaded.vlm)
    with torch.no_grad():
        live = forward(batch)
        with weights_quantized_once(loaded.vlm) as count:
            once = forward(batch)
        again = forward(batch)  # everything restored: the live forward is unchanged
    assert torch.equal(again, live)
    return count, quantized, float((once.float() - live.float()).abs().max())


def _weights_or_activations(path, layers: dict, fake_quant_logits: FidelityReference) -> str:
    """Where b differs from a, when it does: KLD(a || b) with b's decoded weights, then with a's own
    fake-quantized weights in b's model (what is left is activation quantization and the model build)."""
    import torch

    from vlq.export.dequant import dequantize_checkpoint
    from vlq.fidelity.reference import measure_against

    built = dequantize_checkpoint(path).build_model(device="cuda")
    try:
        forward = logits_forward(built.model)
        decoded = measure_against(fake_quant_logits, forward, measurement_point="checkpoint").kld_mean
        modules = dict(built.model.named_modules())
        with torch.no_grad():
            for name, (weight, _, _) in layers.items():
                target = modules[name.replace("model.", "model.language_model.", 1)].weight
                target.copy_(weight.to(target.device, target.dtype))
        swapped = measure_against(fake_quant_logits, forward, measurement_point="checkpoint").kld_mean
    finally:
        built.remove_hooks()
        del built
    return f"KLD(a||b) {decoded:.4g} with weights from disk, {swapped:.4g} with a's weights"


def _down_proj_block_scales(tensors) -> list[str]:
    """Each NVFP4 down_proj's E4M3 block scales: doubled, the largest (448) overflow to NaN."""
    return [k for k in tensors if k.endswith("mlp.down_proj.weight_scale") and k + "_2" in tensors]


def test_point_a_moves_from_bf16_and_the_unquantized_copy_does_not(measured_3b):
    assert [m.data_kind for m in measured_3b.fake_quant] == ["text", "image_text"]
    for control, point_a in zip(measured_3b.unquantized, measured_3b.fake_quant):
        assert point_a.measurement_point == "fake_quant" and point_a.tokens == control.tokens > 0
        assert 0 < point_a.kld_mean < float("inf"), point_a
        assert point_a.kld_median <= point_a.kld_p99 <= point_a.kld_max
        assert control.kld_mean <= 1e-6 and control.same_top_rate == 1.0, control
        assert point_a.kld_mean > 100 * max(control.kld_mean, 1e-9), (control, point_a)


def test_weights_quantized_once_equal_live_fake_quant(measured_3b):
    folded, quantized, max_diff = measured_3b.folded
    assert folded == quantized > 0 and max_diff == 0.0, measured_3b.folded


def test_point_b_from_disk_tracks_point_a(measured_3b):
    for point_a, point_b in zip(measured_3b.fake_quant, measured_3b.checkpoint):
        assert point_b.measurement_point == "checkpoint" and point_b.data_kind == point_a.data_kind
        assert point_b.tokens == point_a.tokens
        # same scheme read back from disk: same distance from BF16 up to the export's rounding (factor <= 1)
        assert point_b.kld_mean == pytest.approx(point_a.kld_mean, rel=1.0), (point_a, point_b)


def _agreement(measured: Measured3B, path) -> Check:
    import torch

    check = pipeline.export_agreement(measured.manifest, measured.fake_quant_logits, path,
                                      bf16_to_fake_quant=measured.fake_quant[0])
    gc.collect()
    torch.cuda.empty_cache()
    print(f"\n[gpu fidelity] {path.name}: {check.detail} -> {'ok' if check.ok else check.problems[0]}", flush=True)
    return check


def test_checkpoint_from_disk_agrees_with_fake_quant(measured_3b):
    check = _agreement(measured_3b, measured_3b.path)
    assert check.ok, check.problems


@pytest.mark.parametrize("tamper", [down_proj_tensor_scales, _down_proj_block_scales],
                         ids=["down_proj-tensor-scales-doubled", "down_proj-e4m3-block-scales-doubled"])
def test_checkpoint_with_doubled_scales_disagrees(measured_3b, tmp_path, tamper):
    tampered = tmp_path / "tampered"
    try:
        doubled = tampered_copy(measured_3b.path, tampered, keys_to_double=tamper)
        check = _agreement(measured_3b, tampered)
        assert not check.ok, doubled[:3]
        assert "do not encode what the search measured" in check.problems[0] or "non-finite logits" in check.problems[0]
    finally:
        shutil.rmtree(tampered, ignore_errors=True)


def test_every_layer_from_disk_equals_fake_quant_on_held_out_activations(measured_3b):
    from vlq.export.dequant import compare_activation, compare_weight, dequantize_checkpoint

    ckpt = dequantize_checkpoint(measured_3b.path)
    assert sorted(layer.name for layer in ckpt.layers) == sorted(measured_3b.layers)
    worst: dict = {}
    bad = []
    for layer in ckpt.layers:
        weight, x, quantized_x = measured_3b.layers[layer.name]
        for agreement in (compare_weight(layer, weight), compare_activation(layer, x, quantized_x)):
            key = (agreement.quant_algo, agreement.what)
            if key not in worst or agreement.differing_share > worst[key].differing_share:
                worst[key] = agreement
            if not agreement.ok:
                bad.append(agreement.describe())
    print("\n[gpu fidelity] worst layer per format: " + "; ".join(a.describe() for a in worst.values()), flush=True)
    assert not bad, f"{len(bad)} layer comparisons out of tolerance:\n" + "\n".join(bad[:20])
