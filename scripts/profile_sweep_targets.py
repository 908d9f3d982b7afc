"""Where does a measured sweep spend its time per target?  (issue 11: 8 targets in <= 1.5x one search)

Searches ``--model`` once, captures the BF16 reference on ``--rows`` held-out rows per kind, then decides
and measures ``--targets`` exactly as ``vlq.pipeline.sweep`` does (``manifest_for_target``,
``apply_decisions``, ``measure_fake_quant``) under ``torch.profiler``.  Prints the wall time of each
step and the operations that took the most CPU and device time, so one GPU call says whether the
forwards, the weight folding (page-locked copies), the reference copies or the KLD dominate.

    python scripts/profile_sweep_targets.py --model qwen2.5-vl-3b-random --device cuda              # one H200
    python scripts/profile_sweep_targets.py --model tiny-trained --device cpu --formats fp8 \\
        --targets 12,10 --steps 2 --seq-len 32 --rows 4                                            # CPU, seconds
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--top", type=int, default=25, help="operations to list")
    parser.add_argument("--json", type=Path, help="also write the step times here")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]

    from torch.profiler import ProfilerActivity, profile

    from vlq import pipeline
    from vlq.models import load_vlm
    from vlq.schemes import Scheme
    from vlq.search import apply_decisions
    from vlq.sweep import manifest_for_target

    pristine = load_vlm(args.model, device=args.device)
    device = pristine.device
    scheme = Scheme(formats=tuple(args.formats.split(",")), target_bits=targets[0], num_calib_steps=args.steps,
                    num_score_steps=args.steps, seq_len=args.seq_len)
    calibration = pipeline.calibrate(pristine, scheme)
    _sync(device)
    t0 = time.perf_counter()
    references = pipeline.fidelity_references(pristine, scheme, calibration=calibration, rows=args.rows)
    _sync(device)
    reference_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = pipeline.search(pipeline.fresh_copy(pristine), scheme, calibration)
    _sync(device)
    search_s = time.perf_counter() - t0
    del pristine  # the sweep keeps only the searched copy on the device
    pipeline.measure_fake_quant(base.loaded, references)  # first-use costs (kernels, allocator) outside the profile
    _sync(device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps: list[dict] = []
    with profile(activities=activities) as prof:
        for target in targets:
            t0 = time.perf_counter()
            manifest = manifest_for_target(base.manifest, base.result, target)
            t1 = time.perf_counter()
            apply_decisions(base.result, manifest.groups)
            _sync(device)
            t2 = time.perf_counter()
            metrics = pipeline.measure_fake_quant(base.loaded, references)
            _sync(device)
            t3 = time.perf_counter()
            steps.append(dict(target=target, solve_s=round(t1 - t0, 3), apply_s=round(t2 - t1, 3),
                              measure_s=round(t3 - t2, 3), text_kld=round(metrics[0].kld_mean, 5)))
            print("[target]", steps[-1], flush=True)
    per_target = sum(s["solve_s"] + s["apply_s"] + s["measure_s"] for s in steps) / len(steps)
    summary = dict(model=args.model, device=str(device), rows_per_kind=args.rows, search_s=round(search_s, 2),
                   reference_s=round(reference_s, 2), per_target_s=round(per_target, 3), targets=steps,
                   measured_sweep_over_search=round((search_s + reference_s + per_target * len(targets)) / search_s, 3))
    print("[summary]", json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    sort_keys = ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else [])
    averages = prof.key_averages()
    for key in sort_keys:
        print(f"\n[profile] top {args.top} by {key} over {len(targets)} targets")
        try:
            print(averages.table(sort_by=key, row_limit=args.top, max_name_column_width=60))
        except (AttributeError, KeyError):  # torch releases before "device" named it "cuda"
            print(averages.table(sort_by=key.replace("device", "cuda"), row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
