"""``vlq`` command line: wires the stages together; all logic lives in the stage modules."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import VlqError

STATE_FILE = "search_state.pth"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_DIR = "checkpoint"


def _say(msg: str) -> None:
    print(f"[vlq {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _scheme_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheme")
    g.add_argument("--scheme", help="YAML scheme file (other scheme flags override its fields)")
    g.add_argument("--formats", help="candidate formats joined by '+', e.g. fp8+int4_awq")
    g.add_argument("--bits", type=float, dest="effective_bits", help="effective-bits target over the LM")
    g.add_argument("--method", choices=["gradient", "kl_div"])
    g.add_argument("--strategy", choices=["extract", "mask"])
    g.add_argument("--calib-steps", type=int, dest="num_calib_steps")
    g.add_argument("--score-steps", type=int, dest="num_score_steps")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--kv-cache-fp8", action="store_true", default=None, help="add FP8 KV-cache quantization after the search")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="local checkpoint folder, 'tiny' (default) or 'qwen2.5-vl-3b-random'")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data", help="calibration text: a local .txt (one sample per line) or .jsonl with a 'text' field")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the checkpoint to run")
    p.add_argument("--images", help="image+text calibration instead of text: 'generated' (seeded synthetic images) or a "
                   "local imagefolder folder (images + metadata.jsonl) / .jsonl of image paths with a text field")


RECOMMENDED_FULL_SIZE = {"num_calib_steps": 16, "num_score_steps": 16, "batch_size": 1, "seq_len": 512}


def build_scheme(args):
    from .schemes import Scheme

    base = Scheme.from_yaml(args.scheme).to_dict() if args.scheme else Scheme().to_dict()
    if not args.scheme and getattr(args, "model", "tiny") not in (None, "tiny"):
        # Full-size models get the measured recommendation (README: 16+16 steps x 512 tokens kept
        # 97.9% of the 128+128 reference decisions in 28 s on an H200); the tiny model keeps its
        # seconds-long defaults.
        base.update(RECOMMENDED_FULL_SIZE)
    for key in ("formats", "effective_bits", "method", "strategy", "num_calib_steps", "num_score_steps", "batch_size", "seq_len", "kv_cache_fp8"):
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    return Scheme.from_dict(base)


def _load(args, scheme):
    from .calibration import synthetic_batches, text_batches
    from .models import load_vlm, resolve_model_source

    resolve_model_source(args.model)  # cheap validation before heavy imports and loading
    scheme.require_device(args.device)
    _say(f"loading {args.model} on {args.device}")
    loaded = load_vlm(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    batches = max(scheme.num_calib_steps, scheme.num_score_steps)
    if getattr(args, "images", None):
        from .calibration import image_text_calibration

        calibration = image_text_calibration(loaded, args.images, num_batches=batches, batch_size=scheme.batch_size,
                                             seq_len=scheme.seq_len, seed=getattr(args, "seed", 0))
    elif loaded.tokenizer is not None:
        calibration = text_batches(loaded.tokenizer, vocab_size=loaded.vocab_size, num_batches=batches,
                                   batch_size=scheme.batch_size, seq_len=scheme.seq_len, path=args.data)
    else:
        calibration = synthetic_batches(vocab_size=loaded.vocab_size, num_batches=batches, batch_size=scheme.batch_size, seq_len=scheme.seq_len)
    _say(f"calibration: {calibration.num_samples} samples x {calibration.seq_len} tokens from {calibration.source}")
    return loaded, calibration


def _search(args, scheme, out: Path):
    from .manifest import Manifest
    from .search import check_guards, search_lm_only

    loaded, calibration = _load(args, scheme)
    result = search_lm_only(loaded, scheme, calibration, checkpoint=out / STATE_FILE, progress=_say)
    for guard in check_guards(result):
        guard.require()
    manifest = Manifest.from_search(result)
    manifest.verify(state=result.modelopt_state, model=loaded.vlm).require()
    manifest.save(out / MANIFEST_FILE)
    _say(f"manifest written to {out / MANIFEST_FILE}")
    return loaded, calibration, result, manifest


def _export(args, loaded, calibration, result, manifest, out: Path):
    from .export import add_fp8_kv_cache, export_checkpoint
    from .report import CheckLine
    from .search import check_guards, make_forward_step

    if manifest.scheme.kv_cache_fp8:
        add_fp8_kv_cache(loaded, calibration, make_forward_step(loaded, "extract"))
    export = export_checkpoint(loaded, out / CHECKPOINT_DIR, overwrite=args.overwrite)
    verify = manifest.verify(checkpoint=export.path).require()
    vision, head = check_guards(result)
    _say(f"checkpoint written to {export.path}")
    return [
        CheckLine("vision tower unquantized (VisionGuard)", vision.ok, f"{vision.checked} vision linears, weights unchanged"),
        CheckLine("lm_head unquantized", head.ok, "tied to embeddings" if loaded.tied_lm_head else ""),
        CheckLine("manifest == searcher state == live quantizers", True, f"{len(manifest.groups)} groups"),
        CheckLine("manifest == exported config", verify.ok, export.report.quant_config.quant_algo or "unquantized"),
        CheckLine("checkpoint on disk", export.report.ok,
                  f"{len(export.report.quantized_layers())} quantized layers, {export.report.unified_groups} fused groups share scales, "
                  "vision BF16 and excluded"),
    ]


def cmd_search(args) -> int:
    from .report import layer_table

    scheme = build_scheme(args)
    out = Path(args.out or f"runs/{scheme.id}")
    _, _, _, manifest = _search(args, scheme, out)
    print(layer_table(manifest))
    return 0


def cmd_run(args) -> int:
    from .export import check_export_dir
    from .report import layer_table, summary_table

    from .models import resolve_model_source

    scheme = build_scheme(args)
    out = Path(args.out or f"runs/{scheme.id}")
    if args.check_serving:
        scheme.require_servable()  # an unservable scheme is refused before loading or searching
    resolve_model_source(args.model)  # a bad model source is refused before anything is created
    scheme.require_device(args.device)
    check_export_dir(out / CHECKPOINT_DIR, args.overwrite)
    loaded, calibration, result, manifest = _search(args, scheme, out)
    checks = _export(args, loaded, calibration, result, manifest, out)
    print()
    print(layer_table(manifest))
    print()
    print(summary_table(manifest, checks))
    ok = all(c.ok for c in checks)
    if args.check_serving:
        from .serving import check_cli

        print()
        ok = check_cli(argparse.Namespace(path=str(out / CHECKPOINT_DIR), manifest=str(out / MANIFEST_FILE), reference=None)) == 0 and ok
    return 0 if ok else 1


def cmd_export(args) -> int:
    """Re-apply a saved search (no re-scoring) and export it."""
    from .manifest import Manifest
    from .report import layer_table, summary_table

    out = Path(args.run_dir)
    manifest = Manifest.load(out / MANIFEST_FILE)
    if not (out / STATE_FILE).exists():
        raise VlqError(f"{out} has no {STATE_FILE}; run `vlq search --out {out}` first.")
    from .export import check_export_dir

    check_export_dir(out / CHECKPOINT_DIR, args.overwrite)
    args.model = args.model or manifest.model_source
    if args.images is None:  # an image+text search is restored from the batches it was scored on
        from .calibration import images_option_from_source

        args.images, args.seed = images_option_from_source(manifest.calibration_source)
    loaded, calibration, result, restored = _search(args, manifest.scheme, out)
    if restored.groups != manifest.groups:
        raise VlqError("The restored search decided differently from the saved manifest; the search state does not match it.")
    checks = _export(args, loaded, calibration, result, restored, out)
    print(layer_table(restored))
    print(summary_table(restored, checks))
    return 0 if all(c.ok for c in checks) else 1


def cmd_explain(args) -> int:
    from .explain import explain

    print(explain(args.format))
    return 0


def cmd_check(args) -> int:
    from .serving import check_cli

    return check_cli(args)


def cmd_sweep(args) -> int:
    """Score once, then decide, export and verify every effective-bits target."""
    from .sweep import sweep_targets

    scheme = build_scheme(args)
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    for target in targets:
        scheme.with_(effective_bits=target)  # refuse an infeasible target before loading anything
    out = Path(args.out or f"runs/sweep-{'+'.join(scheme.formats)}-{scheme.method}-{scheme.strategy}")
    loaded, calibration = _load(args, scheme)
    result = sweep_targets(loaded, scheme, calibration, targets, out, export=not args.no_export,
                           overwrite=args.overwrite, progress=_say)
    from tabulate import tabulate

    print(tabulate([[p.target_bits, f"{p.effective_bits:.3f}", f"{p.total_score:.4g}", p.manifest.format_counts(),
                     f"{p.resolve_s:.2f}", f"{p.export_s:.2f}", "PASS" if p.verified or args.no_export else "FAIL"]
                    for p in result.points],
                   headers=["target", "achieved", "score", "formats", "re-solve s", "export+verify s", "verified"], tablefmt="github"))
    print(f"one search {result.search_s:.1f}s; all decisions {result.decisions_s:.1f}s; with exports {result.total_s:.1f}s")
    _say(f"sweep written to {out / 'sweep.json'}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.out, benchmarks=args.benchmarks or [], manifests=args.manifests or [],
                        sweeps=args.sweeps or [], baseline=args.baseline)
    _say(f"report written to {path}")
    return 0


def cmd_compare_calibration(args) -> int:
    """Text-only vs image+text search on one model and budget (issue 7): agreement, rank correlation, plot."""
    from .compare import compare_calibrations, search_and_compare
    from .manifest import Manifest

    if bool(args.text_manifest) != bool(args.image_manifest):
        raise VlqError("--text-manifest and --image-manifest go together (compare two saved searches).")
    if args.text_manifest:
        comparison = compare_calibrations(Manifest.load(args.text_manifest), Manifest.load(args.image_manifest))
        out = Path(args.out or "runs/compare-calibration")
        comparison.write(out)
    else:
        from .calibration import image_text_calibration

        scheme = build_scheme(args)
        out = Path(args.out or f"runs/compare-calibration-{scheme.id}")
        images, args.images = args.images or "generated", None  # _load builds the text-only side
        loaded, text = _load(args, scheme)
        if text.kind != "text":
            raise VlqError(f"{args.model} has no tokenizer, so there is no real text to compare against ({text.source}).")
        image_text = image_text_calibration(loaded, images, num_batches=len(text), batch_size=scheme.batch_size,
                                            seq_len=scheme.seq_len, seed=args.seed)
        _say(f"image+text calibration: {image_text.num_samples} samples from {image_text.source}")
        comparison = search_and_compare(loaded, scheme, text, image_text, out_dir=out, progress=_say).comparison
    print(comparison.markdown(plot_path=str(out / "comparison.png")))
    _say(f"comparison written to {out / 'comparison.md'} (+ comparison.json, comparison.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="search -> manifest -> export -> verify (tiny model by default)")
    _model_args(p)
    _scheme_args(p)
    p.add_argument("--out", help="run folder (default runs/<scheme id>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in the run folder")
    p.add_argument("--check-serving", action="store_true",
                   help="refuse a scheme vLLM cannot serve before loading, and check the export in vLLM (`vlq check`)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("search", help="LM-only AutoQuant search; writes manifest.json and the search state")
    _model_args(p)
    _scheme_args(p)
    p.add_argument("--out", help="run folder (default runs/<scheme id>)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="export the checkpoint of a finished search (state restored, not re-scored)")
    p.add_argument("run_dir", help="folder written by `vlq search`")
    p.add_argument("--model", default=None, help="model source (default: the one in the manifest)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data")
    p.add_argument("--images", help="image+text calibration of the search (default: the one its manifest names)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="score once, solve many: decide/export/verify several effective-bits targets")
    _model_args(p)
    _scheme_args(p)
    p.add_argument("--targets", required=True, help="comma-separated effective-bits targets, e.g. 8,7,6,5")
    p.add_argument("--out", help="sweep folder")
    p.add_argument("--no-export", action="store_true", help="decide only (manifests), no checkpoints")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="Markdown tables and PNG plots from saved benchmarks, manifests and sweeps")
    p.add_argument("--out", default="reports", help="output folder (default reports/)")
    p.add_argument("--benchmarks", nargs="*", help="pytest-benchmark JSON files")
    p.add_argument("--baseline", help="a saved benchmark JSON to compare against (regressions flagged)")
    p.add_argument("--manifests", nargs="*", help="manifest.json files (per-layer format maps)")
    p.add_argument("--sweeps", nargs="*", help="sweep.json files (Pareto curves)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare-calibration", help="search text-only and image+text on one model and budget; compare the decisions")
    _model_args(p)
    _scheme_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    p.add_argument("--text-manifest", help="compare two saved manifests instead of searching: the text-only one")
    p.add_argument("--image-manifest", help="... and the image+text one")
    p.add_argument("--out", help="folder for comparison.md/.json/.png and both manifests")
    p.set_defaults(func=cmd_compare_calibration)

    p = sub.add_parser("explain", help="print the live ModelOpt facts vlq relies on")
    p.add_argument("--format", default="fp8", help="format whose config entries to show")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("check", help="serve an exported checkpoint in vLLM and check it layer by layer")
    p.add_argument("path", help="exported checkpoint folder")
    p.add_argument("--manifest", help="manifest.json to compare per-layer methods against")
    p.add_argument("--reference", help="BF16 checkpoint to compare greedy outputs against")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VlqError as exc:
        print(f"vlq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
