"""Where does point b (the checkpoint rebuilt from disk) depart from point a (the fake-quantized model)?

Searches ``--model`` with the scheme given, unifies fused scales as ``vlq run`` does, exports, rebuilds the
checkpoint with vlq's dequantizer and loads a's own fake-quantized weights into it, so that what remains
between the two models is everything *but* the weights (activation quantization, attention path, model
build).  Then one row runs through both and every module output that both models have is compared, in
the order a runs them; the first modules that differ are printed.

    python scripts/diagnose_b_vs_a.py --model qwen2.5-vl-3b-random --device cuda          # the 3B gap, issue 11
    python scripts/diagnose_b_vs_a.py --model tiny-trained --device cpu --formats fp8 --bits 12 --steps 4 --seq-len 64

On the tiny model every output is identical (the swap gives KLD 0).  On the random 3B shape (H200,
2026-12-01) the swap left KLD(a||b) = 0.057 and this script found the first differing output at
``rotary_emb`` (cos/sin 4.9% apart), before any quantized linear: the random-shape builder had cast RoPE's
inv_freq to bf16, which from_pretrained and the rebuilt checkpoint keep in float32 (fixed in vlq.data.models).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def _output(value):
    return value[0] if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-vl-3b-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--formats", default="fp8,nvfp4")
    parser.add_argument("--bits", type=float, default=6.0)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--show", type=int, default=25, help="differing modules to print")
    args = parser.parse_args()

    from vlq import pipeline
    from vlq.export.dequant import dequantize_checkpoint
    from vlq.export.export import unify_fused_scales
    from vlq.data.models import load_vlm
    from vlq.search.scheme import Scheme

    loaded = load_vlm(args.model, device=args.device)
    scheme = Scheme(formats=tuple(args.formats.split(",")), target_bits=args.bits, num_calib_steps=args.steps,
                    num_score_steps=args.steps, seq_len=args.seq_len)
    calibration = pipeline.calibrate(loaded, scheme)
    row = {k: v.to(loaded.device) for k, v in next(iter(calibration.batches)).items() if k != "labels"}
    searched = pipeline.search(loaded, scheme, calibration)
    unify_fused_scales(loaded.language_model)
    lm_prefix = next(name for name, module in loaded.vlm.named_modules() if module is loaded.language_model)
    quantized = {f"{lm_prefix}.{name}": m for name, m in loaded.language_model.named_modules()
                 if hasattr(m, "weight_quantizer") and hasattr(m, "in_features") and m.weight_quantizer.is_enabled}

    # a first: the export packs the live weights, after which a no longer runs
    a_outputs: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def keep(name):
        def hook(_module, _inputs, output):
            out = _output(output)
            if isinstance(out, torch.Tensor) and name not in a_outputs:
                a_outputs[name] = out.detach().to("cpu", copy=True)
                order.append(name)
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in loaded.vlm.named_modules() if n]
    with torch.no_grad():
        logits_a = loaded.vlm(**row, use_cache=False).logits.float().cpu()
        a_weights = {name: m.weight_quantizer(m.weight).detach().cpu() for name, m in quantized.items()}
    for hook in hooks:
        hook.remove()

    differences: dict[str, tuple[float, float]] = {}

    def compare(name):
        def hook(_module, _inputs, output):
            out = _output(output)
            if isinstance(out, torch.Tensor) and name in a_outputs and name not in differences \
                    and out.shape == a_outputs[name].shape:
                a = a_outputs[name].float()
                b = out.detach().float().cpu()
                differences[name] = (float((a - b).abs().max()), float((a - b).norm() / a.norm().clamp_min(1e-30)))
        return hook

    with tempfile.TemporaryDirectory() as tmp:
        path = pipeline.export(searched, Path(tmp) / "checkpoint").path
        built = dequantize_checkpoint(path).build_model(device=loaded.device)
    b_modules = dict(built.model.named_modules())
    with torch.no_grad():
        for name, weight in a_weights.items():
            b_modules[name].weight.copy_(weight.to(b_modules[name].weight.device, b_modules[name].weight.dtype))
    hooks = [m.register_forward_hook(compare(n)) for n, m in built.model.named_modules() if n]
    with torch.no_grad():
        logits_b = built.model(**row, use_cache=False).logits.float().cpu()
    for hook in hooks:
        hook.remove()
    built.remove_hooks()

    kld = torch.nn.functional.kl_div(logits_b.log_softmax(-1), logits_a.log_softmax(-1), log_target=True,
                                     reduction="none").sum(-1).mean()
    print(f"{args.model} {scheme.id}: {len(quantized)} quantized linears with a's weights in b; "
          f"KLD(a||b) on this row {float(kld):.4g}; {len(differences)} module outputs compared")
    differing = [n for n in order if n in differences and differences[n][0] > 0]
    print(f"{len(differing)} differ; the first {min(args.show, len(differing))} in a's order "
          "(max |a-b|, ||a-b|| / ||a||):")
    for name in differing[: args.show]:
        print(f"  {name}: {differences[name][0]:.3g}, {differences[name][1]:.3g}")


if __name__ == "__main__":
    main()
