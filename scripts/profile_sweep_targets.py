"""Where does a measured sweep spend its time per target?  (issue 11: 8 targets in <= 1.5x one search)

Searches ``--model`` once, captures the BF16 reference on ``--rows`` held-out rows per kind, then decides
and measures ``--targets`` as ``vlq.pipeline.sweep`` does (``manifest_for_target``, ``apply_decisions``,
``measure_fake_quant`` with one ``HostOriginals``), the measurement taken apart step by step with a
device sync after each: weight folding, held-out forwards, KLD statistics, unfolding.  The last target
is measured once more by ``measure_fake_quant`` itself (same numbers, no per-step syncs).
``--search-profile N`` adds cProfile's top functions of the search.

    python scripts/profile_sweep_targets.py --model qwen2.5-vl-3b-random --device cuda              # one H200
    python scripts/profile_sweep_targets.py --model tiny-trained --device cpu --formats fp8 \\
        --targets 12,10 --steps 2 --seq-len 32 --rows 4                                            # CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-vl-3b-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--formats", default="fp8,nvfp4")
    parser.add_argument("--targets", default="8,7.5,7,6.5,6,5.5,5,4.75", help="as the measured-sweep benchmark")
    parser.add_argument("--steps", type=int, default=16, help="calibration and scoring rows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rows", type=int, default=32, help="held-out rows per kind (text, image+text)")
    parser.add_argument("--json", type=Path, help="also write the step times here")
    parser.add_argument("--search-profile", type=int, default=0, metavar="N",
                        help="also print the N functions with the most cumulative time in the search (cProfile)")
    parser.add_argument("--auto-batch", action="store_true",
                        help="search as vlq does by default (plan_search's batch and checkpointing), not batch 1")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]

    from vlq import pipeline
    from vlq.data.models import load_vlm
    from vlq.search.scheme import Scheme
    from vlq.fidelity.metrics import FidelityAccumulator, hidden_logits_forward
    from vlq.fidelity.quantized_weights import HostOriginals, weights_quantized_once
    from vlq.search.search import apply_decisions
    from vlq.manifest.sweep import manifest_for_target

    pristine = load_vlm(args.model, device=args.device)
    device = pristine.device
    scheme = Scheme(formats=tuple(args.formats.split(",")), target_bits=targets[0], num_calib_steps=args.steps,
                    num_score_steps=args.steps, seq_len=args.seq_len)
    if args.auto_batch:
        from vlq.runtime.hardware import visible_gpus
        from vlq.search.plan import plan_search

        scheme = plan_search(pristine.config.to_dict(), scheme, device=str(device), gpus=visible_gpus(), auto_batch=True).scheme
    print("[scheme]", scheme.id, f"batch {scheme.batch_size}, checkpointing {scheme.gradient_checkpointing}", flush=True)
    calibration = pipeline.calibrate(pristine, scheme)
    _sync(device)
    t0 = time.perf_counter()
    references = pipeline.fidelity_references(pristine, scheme, calibration=calibration, rows=args.rows)
    _sync(device)
    reference_s = time.perf_counter() - t0
    import cProfile
    import pstats

    copy_ = pipeline.fresh_copy(pristine)
    profiler = cProfile.Profile() if args.search_profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    base = pipeline.search(copy_, scheme, calibration)
    _sync(device)
    search_s = time.perf_counter() - t0
    if profiler:
        profiler.disable()
    print("[search]", f"{search_s:.2f} s wall;", base.result.times, flush=True)
    if profiler:
        print(f"\n[search profile] top {args.search_profile} by cumulative time")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.search_profile)
        print(f"\n[search profile] top {args.search_profile} by own time")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.search_profile)
    del pristine  # the sweep keeps only the searched copy on the device
    originals = HostOriginals()  # as vlq.pipeline.sweep keeps them for in-place targets
    pipeline.measure_fake_quant(base.loaded, references, originals=originals)  # first-use costs outside the timings
    _sync(device)

    forward = hidden_logits_forward(base.loaded.vlm)
    steps: list[dict] = []
    for target in targets:
        t0 = time.perf_counter()
        manifest = manifest_for_target(base.manifest, base.result, target)
        t1 = time.perf_counter()
        apply_decisions(base.result, manifest.groups)
        _sync(device)
        t2 = time.perf_counter()
        # vlq.pipeline.measure_fake_quant, step by step
        forward_s = kld_s = 0.0
        kinds = {}
        with weights_quantized_once(base.loaded.vlm, originals=originals):
            _sync(device)
            t3 = time.perf_counter()
            for reference in references:
                accumulator = FidelityAccumulator()
                for batch, base_logits in zip(reference.batches, reference.logits):
                    a = time.perf_counter()
                    with torch.no_grad():
                        quant_logits = forward(batch)
                    _sync(device)
                    b = time.perf_counter()
                    accumulator.add(base_logits, quant_logits, batch["labels"], batch.get("attention_mask"))
                    _sync(device)
                    forward_s, kld_s = forward_s + b - a, kld_s + time.perf_counter() - b
                a = time.perf_counter()
                kinds[reference.data_kind] = accumulator.finish(data_source=reference.data_source, data_kind=reference.data_kind,
                                                                measurement_point="fake_quant")
                kld_s += time.perf_counter() - a
            t4 = time.perf_counter()
        _sync(device)
        t5 = time.perf_counter()
        forwards = sum(len(r.batches) for r in references)
        steps.append(dict(target=target, solve_s=round(t1 - t0, 3), apply_s=round(t2 - t1, 3), measure_s=round(t5 - t2, 3),
                          fold_s=round(t3 - t2, 3), forwards=forwards, forward_s=round(forward_s, 3), kld_s=round(kld_s, 3),
                          unfold_s=round(t5 - t4, 3), text_kld=round(kinds["text"].kld_mean, 5)))
        print("[target]", steps[-1], flush=True)
    # the library's own call for the last target: the same numbers, and its time without the per-step syncs
    t0 = time.perf_counter()
    official = pipeline.measure_fake_quant(base.loaded, references, originals=originals)
    _sync(device)
    official_s = time.perf_counter() - t0
    assert abs(official[0].kld_mean - steps[-1]["text_kld"]) < 1e-4, (official[0].kld_mean, steps[-1])
    per_target = sum(s["solve_s"] + s["apply_s"] + s["measure_s"] for s in steps) / len(steps)
    summary = dict(model=args.model, device=str(device), scheme=scheme.id, batch_size=scheme.batch_size,
                   gradient_checkpointing=scheme.gradient_checkpointing, rows_per_kind=args.rows,
                   search_s=round(search_s, 2), search_phases_s=dataclasses.asdict(base.result.times),
                   reference_s=round(reference_s, 2), per_target_s=round(per_target, 3),
                   measure_fake_quant_last_target_s=round(official_s, 3), targets=steps,
                   measured_sweep_over_search=round((search_s + reference_s + per_target * len(targets)) / search_s, 3))
    print("[summary]", json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
