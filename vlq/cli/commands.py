"""The commands: each parses what its flags left as text, calls :mod:`vlq.pipeline`, and prints the tables.

Every bad input is refused with one ``vlq: error:`` line on stderr and exit code 2, before torch,
ModelOpt or vLLM are imported.  A command that writes into a run folder locks it (:mod:`vlq.runtime.runlock`)
right after that validation, before anything loads: a second writer is refused at once, naming the
first.  While a command runs, third-party output goes to the run folder's
``log.txt`` (``--verbose`` shows it); the terminal shows vlq's stages, one progress bar per long
phase, then the tables.
"""

from __future__ import annotations

from pathlib import Path

from ..runtime.errors import SchemeError, VlqError
from ..inputs.requests import POINT_NAMES, DataRequest, ModelRequest, RunFolder
from ..search.scheme import METHODS
from .arguments import float_list, positive_int
from .preparation import (
    locked, placement_of, plan_from_flags, prepared, print_blocks, requests_from, resolve_device, scheme_from_flags, session,
)


def cmd_run(args) -> int:
    from ..runtime.files import check_export_dir

    rows = positive_int(args.fidelity_rows, "--fidelity-rows")
    with prepared(args, lambda scheme: f"runs/{scheme.id}") as (model, data, scheme, folder):
        check_export_dir(folder.checkpoint, args.overwrite)
        verdict = scheme.vllm_servability()
        with session(folder, args.verbose) as (terminal, progress):
            if not verdict.servable:
                progress.stage(f"note: {verdict.reason} The export is checked on disk only.")
            from .. import pipeline

            loaded = pipeline.load_model(model, progress=progress)
            outcome = pipeline.run(loaded, scheme, data, folder, overwrite=args.overwrite, serve=not args.no_serve,
                                   rows=rows, progress=progress)
    from ..report.tables import fidelity_table, layer_table, served_layer_table, summary_table

    manifest = outcome.searched.manifest
    print_blocks("", layer_table(manifest), summary_table(manifest, outcome.checks),
           "Fidelity to the BF16 model (KLD in nats per token, held-out data):\n" + fidelity_table(manifest.fidelity))
    if outcome.served is not None:
        print_blocks(f"vLLM ({outcome.served.expectations_from} gives the expected formats):",
               served_layer_table(outcome.served.layers, outcome.served.expected), outcome.served.note)
    else:
        print_blocks(f"vLLM check skipped: {outcome.serve_skipped}")
    print(f"\nrun folder {folder.root} (third-party output in {folder.log})")
    return 0 if outcome.ok else 1


def cmd_search(args) -> int:
    with prepared(args, lambda scheme: f"runs/{scheme.id}") as (model, data, scheme, folder), \
            session(folder, args.verbose) as (terminal, progress):
        from .. import pipeline

        loaded = pipeline.load_model(model, progress=progress)
        calibration = pipeline.calibrate(loaded, scheme, data, progress=progress)
        searched = pipeline.search(loaded, scheme, calibration, run=folder, progress=progress)
    from ..report.tables import checks_table, layer_table

    print_blocks(layer_table(searched.manifest), checks_table(searched.checks))
    return 0


def cmd_export(args) -> int:
    """Re-apply a saved search (no re-scoring) and export it."""
    from ..runtime.files import check_export_dir

    folder = RunFolder(args.run_dir)
    for needed in (folder.manifest, folder.search_state):
        if not needed.exists():
            raise VlqError(f"{folder.root} has no {needed.name}; pass a folder written by `vlq search --out FOLDER`.")
    with locked(folder, args):
        check_export_dir(folder.checkpoint, args.overwrite)
        from ..manifest.manifest import Manifest

        saved = Manifest.load(folder.manifest)
        args.model = args.model or saved.model_source
        model, data = requests_from(args)
        model = ModelRequest(model.source, resolve_device(args.device), model.trust_remote_code)
        saved.scheme.require_device(model.device)
        given = args.data is not None or args.images is not None
        with session(folder, args.verbose) as (terminal, progress):
            from .. import pipeline

            loaded = pipeline.load_model(model, progress=progress)
            searched = pipeline.restore(folder, loaded, data if given else None, progress=progress)
            exported = pipeline.export(searched, folder, overwrite=args.overwrite, progress=progress)
    from ..report.tables import layer_table, summary_table

    checks = searched.checks + exported.checks
    print_blocks(layer_table(searched.manifest), summary_table(searched.manifest, checks))
    return 0 if all(c.ok for c in checks) else 1


def cmd_sweep(args) -> int:
    """Score once, then decide (and optionally export and verify) every effective-bits target."""
    targets = float_list(args.targets, "--targets")
    rows = positive_int(args.fidelity_rows, "--fidelity-rows")
    if not targets:
        raise SchemeError("--targets needs at least one effective-bits target, e.g. --targets 8,7,6.")
    exports: list[float] | bool = True if args.export == "all" else float_list(args.export or "", "--export")
    unknown = sorted(set(exports) - set(targets)) if exports is not True else []
    if unknown:
        raise SchemeError(f"--export {','.join(f'{t:g}' for t in unknown)} is not among --targets {args.targets}; export a subset of the targets.")
    default_out = (lambda scheme: f"runs/sweep-{'+'.join(scheme.formats)}-{scheme.method}-{scheme.strategy}")
    with prepared(args, default_out) as (model, data, scheme, folder):
        for target in targets:
            scheme.with_(target_bits=target)  # refuse an infeasible target before loading anything
            if Path(model.source, "config.json").exists():
                from ..formats.applicability import require_fits_config

                require_fits_config(Path(model.source) / "config.json", scheme.with_(target_bits=target))
        with session(folder, args.verbose) as (terminal, progress):
            from .. import pipeline

            loaded = pipeline.load_model(model, progress=progress)
            calibration = pipeline.calibrate(loaded, scheme, data, progress=progress)
            result = pipeline.sweep(loaded, scheme, calibration, targets, folder, export_targets=exports,
                                    rows=rows, overwrite=args.overwrite, progress=progress)
    from ..report.tables import sweep_table

    print_blocks(sweep_table(result.points),
           f"one search {result.search_s:.1f}s; all decisions {result.decisions_s:.1f}s; "
           f"measured {result.measured_s:.1f}s ({result.rows} rows per kind, BF16 reference included); "
           f"with exports {result.total_s:.1f}s; "
           f"written to {folder.sweep}")
    return 0 if all(p.verified for p in result.points if p.export_path is not None) else 1



def cmd_report(args) -> int:
    from ..report.document import write_report

    path = write_report(args.out, benchmarks=args.benchmarks or [], manifests=args.manifests or [],
                        sweeps=args.sweeps or [], baseline=args.baseline, comparisons=args.comparisons or [],
                        studies=args.studies or [])
    print(f"report written to {path}")
    return 0


def cmd_compare_calibration(args) -> int:
    """Text-only vs image+text search on one model and budget: agreement, rank correlation, plot."""
    if bool(args.text_manifest) != bool(args.image_manifest):
        raise VlqError("--text-manifest and --image-manifest go together (compare two saved searches).")
    if args.text_manifest:
        out = Path(args.out or "runs/compare-calibration")
        with locked(RunFolder(out).require_writable(), args):
            from .. import pipeline

            comparison = pipeline.compare_saved_calibrations(args.text_manifest, args.image_manifest, out)
    else:
        images = args.images or "generated"
        args.images = None  # the text side is calibrated from --data / the corpus
        with prepared(args, lambda scheme: f"runs/compare-calibration-{scheme.id}") as (model, text_data, scheme, folder), \
                session(folder, args.verbose) as (terminal, progress):
            from .. import pipeline

            out = folder.root
            image_data = DataRequest(images=images, seed=args.seed)
            loaded = pipeline.load_model(model, progress=progress)
            text = pipeline.calibrate(loaded, scheme, text_data, progress=progress)
            if text.kind != "text":
                raise VlqError(f"{model.source} has no tokenizer, so there is no real text to compare against ({text.source}).")
            image_text = pipeline.calibrate(loaded, scheme, image_data, progress=progress)
            comparison = pipeline.compare_calibration(loaded, scheme, text, image_text, data=text_data, out_dir=out,
                                                      progress=progress).comparison
    print(comparison.markdown(plot_path=str(out / "comparison.png")))
    print(f"comparison written to {out / 'comparison.md'} (+ comparison.json, comparison.png)")
    return 0


def cmd_plan(args) -> int:
    """Memory, disk and devices a search needs, from the config alone (nothing is loaded)."""
    from ..inputs.requests import TINY, TINY_TRAINED

    model, _ = requests_from(args)
    if model.source in (TINY, TINY_TRAINED):
        raise SchemeError(f"`vlq plan` needs a config: pass a checkpoint folder or a qwen2.5-vl-*-random shape, not {model.source!r}.")
    device = "cuda" if args.device == "auto" else args.device  # planning is for the GPU unless asked otherwise
    scheme = scheme_from_flags(args, device, full_size=True)
    plan = plan_from_flags(args, ModelRequest(model.source, device, False), scheme)
    lines = plan.lines()
    try:
        placement = placement_of(plan)  # shown also where the GPUs are not visible here
    except VlqError:
        placement = None
    if placement is not None:
        lines.append("placement      " + "; ".join(f"cuda:{i}: {n} decoder layers, {b / 2**30:.0f} GiB weights+state"
                                                  for i, (n, b) in enumerate(zip(placement.layers_per_device,
                                                                                  placement.planned_bytes))))
    print("\n".join(lines))
    return 0 if plan.fits else 1



def cmd_compare_methods(args) -> int:
    """The same search with two sensitivity methods: decision agreement and each scheme's KLD to BF16."""
    methods = tuple(m.strip() for m in args.methods.split(","))
    if len(methods) != 2 or any(m not in METHODS for m in methods):
        raise SchemeError(f"--methods takes two of {', '.join(METHODS)} joined by a comma (e.g. gradient,kl_div); got {args.methods!r}.")
    if args.manifests:
        missing = [m for m in args.manifests if not Path(m).is_file()]
        if missing:
            raise VlqError(f"Manifest {missing[0]} does not exist; pass two manifest.json files written by vlq.")
        out = Path(args.out or "runs/compare-methods")
        with locked(RunFolder(out).require_writable(), args):
            from .. import pipeline

            comparison = pipeline.compare_saved_methods(args.manifests[0], args.manifests[1], out)
    else:
        if args.method is not None:
            raise SchemeError("compare-methods searches with both --methods; drop --method.")
        default_out = (lambda scheme: f"runs/compare-methods-{'+'.join(scheme.formats)}-{scheme.target_bits:g}b")
        with prepared(args, default_out) as (model, data, scheme, folder), session(folder, args.verbose) as (terminal, progress):
            from .. import pipeline

            out = folder.root
            loaded = pipeline.load_model(model, progress=progress)
            calibration = pipeline.calibrate(loaded, scheme, data, progress=progress)
            comparison = pipeline.compare_methods(loaded, scheme, calibration, methods=methods, data=data, out_dir=out,
                                                  progress=progress).comparison
    print(comparison.markdown())
    print(f"comparison written to {out / 'comparison.md'} (+ comparison.json)")
    return 0


def cmd_fidelity(args) -> int:
    """Measure a finished run folder again at one or more measurement points, against its BF16 model."""
    folder = RunFolder(args.run_dir)
    points = [POINT_NAMES.get(p.strip(), p.strip()) for p in args.point.split(",") if p.strip()]
    if not points or any(p not in POINT_NAMES.values() for p in points):
        raise SchemeError(f"--point takes fake, checkpoint or served (comma-separated); got {args.point!r}.")
    if not folder.manifest.exists():
        raise VlqError(f"{folder.root} has no {RunFolder.MANIFEST}; pass a folder written by `vlq run` or `vlq search --out FOLDER`.")
    if "fake_quant" in points and not folder.search_state.exists():
        raise VlqError(f"{folder.root} has no {RunFolder.SEARCH_STATE} to restore the fake-quantized model (--point fake) from; "
                       "use --point checkpoint.")
    if {"checkpoint", "vllm"} & set(points) and not (folder.checkpoint / "config.json").exists():
        raise VlqError(f"{folder.root} has no exported checkpoint ({RunFolder.CHECKPOINT}/config.json) to measure; "
                       f"run `vlq export {folder.root}` first, or use --point fake.")
    if "vllm" in points:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise VlqError("--point served needs vLLM, found no vllm package; install it (scripts/install.sh installs the CPU build).")
    with locked(folder, args):
        from ..manifest.manifest import Manifest

        saved = Manifest.load(folder.manifest)
        args.model = args.model or saved.model_source
        given = args.data is not None or args.images is not None or args.seed is not None  # else: the run's own data
        args.seed = 0 if args.seed is None else args.seed
        model, data = requests_from(args)
        model = ModelRequest(model.source, resolve_device(args.device), model.trust_remote_code)
        with session(folder, args.verbose) as (terminal, progress):
            from .. import pipeline

            if not given:
                data = pipeline.saved_data_request(saved)
            loaded = pipeline.load_model(model, progress=progress)
            measured = pipeline.measure_run(folder, loaded, points, data, progress=progress)
    from ..report.tables import fidelity_table

    print_blocks(f"Fidelity to the BF16 model (KLD in nats per token, held-out data) of {folder.root}:\n" + fidelity_table(measured.measured),
           f"recorded in {folder.manifest}")
    return 0


def cmd_explain(args) -> int:
    from ..report.explain import explain

    print(explain(args.format))
    return 0


def cmd_check(args) -> int:
    """Pre-flight the checkpoint from disk, then serve it in vLLM and check it layer by layer."""
    import importlib.util

    from ..export.inspect import checkpoint_verdict
    from ..checks.check import checks_table
    from ..serve.resolution import preflight

    path = Path(args.path).expanduser().resolve()
    pre = preflight(path)  # light: refuses what vLLM cannot serve before an engine starts
    manifest_path = Path(args.manifest) if args.manifest else path.parent / RunFolder.MANIFEST
    manifest = None
    if args.manifest or manifest_path.exists():
        from ..manifest.manifest import Manifest

        manifest = Manifest.load(manifest_path)
    # from the files alone, torch-free: only a consistent checkpoint reaches vLLM
    verdict = checkpoint_verdict(path, manifest)
    if not all(c.ok for c in verdict):
        print_blocks(f"vlq check {path} ({pre.quant_algo or 'unquantized'}): pre-flight from disk", checks_table(verdict),
               "\n".join(c.verdict() for c in verdict if not c.ok),
               "vLLM was not started: the checkpoint on disk is inconsistent. Export it again (vlq export RUN --overwrite).")
        return 1
    from ..runtime.files import kill_point

    kill_point("serve")  # tests interrupt here: the checkpoint passed, vLLM not yet started
    if importlib.util.find_spec("vllm") is None:
        raise VlqError("`vlq check` needs vLLM, found no vllm package; install it (scripts/install.sh installs the CPU build).")
    folder = RunFolder(path.parent) if (path.parent / RunFolder.MANIFEST).exists() else None
    with session(folder, args.verbose) as (terminal, progress):
        from .. import pipeline

        served = pipeline.serve_check(path, manifest=manifest, reference=args.reference, progress=progress)
    from ..report.tables import served_layer_table

    print_blocks(f"vlq check {path} ({pre.quant_algo or 'unquantized'}; expected formats from {served.expectations_from})",
           served_layer_table(served.layers, served.expected), checks_table(served.checks), served.note)
    return 0 if served.ok else 1
