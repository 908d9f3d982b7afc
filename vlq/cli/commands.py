"""``vlq`` command line: parse, validate (before any heavy import), call :mod:`vlq.pipeline`, print.

Every bad input is refused with one ``vlq: error:`` line on stderr and exit code 2, before torch,
ModelOpt or vLLM are imported.  A command that writes into a run folder locks it (:mod:`vlq.runtime.runlock`)
right after that validation, before anything loads: a second writer is refused at once, naming the
first.  While a command runs, third-party output goes to the run folder's
``log.txt`` (``--verbose`` shows it); the terminal shows vlq's stages, one progress bar per long
phase, then the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
import contextlib
import shlex
import sys
from pathlib import Path
from typing import IO, Callable, Iterator

from ..runtime.errors import SchemeError, VlqError
from ..inputs.requests import POINT_NAMES, TINY, TINY_TRAINED, DataRequest, ModelRequest, RunFolder
from ..search.scheme import METHODS, SCHEME_FIELDS, STRATEGIES, Scheme, default_scheme
from . import evaluate as evaluate_cli, recipe as recipe_cli


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def _scheme_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheme (default: formats vLLM serves on the device: fp8 at 12 bits on CPU, fp8+nvfp4 at 6 on CUDA)")
    g.add_argument("--scheme", help="YAML scheme file (other scheme flags override its fields)")
    recipe_cli.add_recipe_option(g)
    g.add_argument("--formats", help="candidate formats joined by '+', e.g. fp8+nvfp4 (`vlq explain` lists them)")
    g.add_argument("--bits", type=float, dest="target_bits", help="target bits per LM weight (16 = no compression)")
    g.add_argument("--method", choices=METHODS)
    g.add_argument("--strategy", choices=STRATEGIES)
    g.add_argument("--calib-steps", type=int, dest="num_calib_steps")
    g.add_argument("--score-steps", type=int, dest="num_score_steps")
    g.add_argument("--batch-size", type=_batch_size, help="rows per step, or 'auto' (default for full-size models on "
                   "CUDA): the largest batch under the memory budget, the steps read as rows at batch 1, gradient "
                   "checkpointing off when the activations fit (`vlq plan` shows the choice)")
    g.add_argument("--memory-budget", type=_positive_gib, metavar="GIB", help="GiB per device the search may use "
                   "(default: the free memory; auto batching grows activations by at most 20 GiB unless this is set)")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--kv-cache-fp8", action="store_true", default=None, help="add FP8 KV-cache quantization after the search")


def _batch_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or 'auto', got {text!r}") from None


def _positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of GiB, e.g. 40; got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 GiB, got {text}")
    return value


def _model_args(p: argparse.ArgumentParser, *, default_model: str | None = TINY) -> None:
    default = f" (default {default_model})" if default_model else ""
    p.add_argument("--model", default=default_model,
                   help=f"local Qwen2.5-VL checkpoint folder{default}, 'tiny' (random weights: seconds, but its fidelity "
                   "numbers mean little), 'tiny-trained' (learned weights: fidelity means something) or a published shape "
                   "with random weights: qwen2.5-vl-{3b,7b,32b,72b}-random")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, or cuda")
    p.add_argument("--data", help="calibration text: a local .txt (one sample per line) or .jsonl with a 'text' field")
    p.add_argument("--images", help="image+text calibration instead of text: 'generated' (seeded synthetic images) or a "
                   "local imagefolder folder (images + metadata.jsonl) / .jsonl of image paths with a text field")
    p.add_argument("--seed", type=int, default=0, help="seed of generated images / synthetic tokens")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the checkpoint to run")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="show third-party output (ModelOpt, transformers, vLLM) "
                   "on the terminal instead of the run's log.txt")


# ------------------------------------------------------------------------------------------------
# Validation (light) and resolution
# ------------------------------------------------------------------------------------------------


def _scheme(args, device: str, *, full_size: bool):
    """The scheme the flags ask for, on top of the device's default (or the --scheme file, or the --recipe)."""
    if getattr(args, "recipe", None):
        return recipe_cli.recipe_scheme_from_args(args, device, full_size=full_size)
    base = Scheme.from_yaml(args.scheme).to_dict() if args.scheme else default_scheme(device, full_size=full_size).to_dict()
    for key in SCHEME_FIELDS:  # the flags' dests are the scheme's field names
        value = getattr(args, key, None)
        if value is not None and value != "auto":
            base[key] = value
    return Scheme.from_dict(base)


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _requests(args) -> tuple[ModelRequest, DataRequest]:
    """Model and data requests, validated without heavy imports (device 'auto' still unresolved)."""
    device = args.device if args.device != "auto" else "cpu"
    model = ModelRequest(args.model, device, getattr(args, "trust_remote_code", False))
    data = DataRequest(getattr(args, "data", None), getattr(args, "images", None), getattr(args, "seed", 0))
    return model, data


def _require_kv_cache_servable(model: ModelRequest, scheme) -> None:
    """An FP8 KV cache this machine's vLLM cannot run is refused now, not in the engine after the search."""
    if not scheme.kv_cache_fp8:
        return
    from ..formats.applicability import text_head_dim
    from ..runtime.capabilities import require_fp8_kv_cache_servable
    from ..inputs.requests import model_config

    config = model_config(model.source)
    require_fp8_kv_cache_servable(head_dim=text_head_dim(config) if config is not None else None)


@dataclass(frozen=True)
class _LightChecks:
    """What the torch-free checks found: the requests, whether the model is full-size, and the scheme as the
    likely device defaults it (the device is resolved, importing torch, only after them)."""

    model: ModelRequest
    data: DataRequest
    full_size: bool
    scheme: object
    folder: bool  # the model is a checkpoint folder (its files were checked)


def _light_checks(args) -> _LightChecks:
    """Paths, formats and bits, and what a checkpoint folder cannot give a later stage, refused without
    importing torch; the fallbacks a run will take are printed as notes."""
    from ..runtime.hardware import visible_gpus

    model, data = _requests(args)
    full_size = model.source not in (TINY, TINY_TRAINED)  # tiny models keep their seconds-long defaults
    folder = full_size and Path(str(model.source)).is_dir()
    likely = args.device if args.device != "auto" else ("cuda" if visible_gpus() else "cpu")  # no torch yet
    light = _scheme(args, likely, full_size=full_size)  # formats/bits errors, fast
    if folder:
        from ..formats.applicability import require_fits_config

        require_fits_config(Path(model.source) / "config.json", light)
        _check_prerequisites(args, model, data, light)
    if getattr(args, "command", None) == "run" and not getattr(args, "no_serve", False):
        _require_kv_cache_servable(model, light)
    return _LightChecks(model, data, full_size, light, folder)


def _prepare(args, checked: _LightChecks | None = None):
    """Validate everything light first (paths, formats, bits), then resolve the device and the scheme."""
    checked = checked or _light_checks(args)
    model, data, full_size, folder, light = checked.model, checked.data, checked.full_size, checked.folder, checked.scheme
    device = _resolve_device(args.device)
    model = ModelRequest(model.source, device, model.trust_remote_code)
    scheme = _scheme(args, device, full_size=full_size)
    scheme.require_device(device)
    if folder and scheme != light:
        from ..formats.applicability import require_fits_config

        require_fits_config(Path(model.source) / "config.json", scheme)  # layer sizes outside a format's blocks
    plan = _plan(args, model, scheme)
    if plan is not None:
        scheme = plan.require().scheme  # refused here, before anything loads, when it cannot fit
        placement = _placement(plan)
        if placement is not None:  # more than one GPU needed and visible: split the model (device_map)
            model = dataclasses.replace(model, device_map=dict(placement.device_map))
    return model, data, scheme


def _will_serve(args, scheme) -> bool:
    """Whether this command ends by loading its export in vLLM (``vlq run`` without --no-serve, a servable
    scheme, a vLLM installed): its serve prerequisites are then checked before anything loads."""
    from ..inputs.prerequisites import installed_vllm_build

    return (getattr(args, "command", None) == "run" and not getattr(args, "no_serve", False)
            and scheme.vllm_servability().servable and installed_vllm_build() is not None)


def _check_prerequisites(args, model: ModelRequest, data: DataRequest, scheme) -> None:
    """Refuse what a later stage would fail on (tokenizer, image processor, vLLM's limits); print the fallbacks."""
    from ..inputs.requests import model_config
    from ..inputs.prerequisites import check_prerequisites

    found = check_prerequisites(model.source, model_config(model.source), seq_len=scheme.seq_len,
                                serve=_will_serve(args, scheme), images=data.images)
    for note in found.notes:
        print(f"vlq: note: {note}", file=sys.stderr, flush=True)


def _placement(plan):
    """The device_map of a plan that needs several GPUs, None when one device holds it."""
    if plan.devices_needed <= 1:
        return None
    from ..search.placement import place

    return place(plan.shape, [f"cuda:{i}" for i in range(plan.devices_needed)], budget_bytes=plan.budget_bytes)


def _auto_batch(args, device: str) -> bool:
    asked = getattr(args, "batch_size", None)
    return asked == "auto" or (asked is None and not getattr(args, "scheme", None) and device.startswith("cuda"))


def _plan(args, model: ModelRequest, scheme):
    """The memory plan of a full-size model (None for the tiny ones, built in code): still no torch."""
    from ..runtime.hardware import visible_gpus
    from ..inputs.requests import model_config
    from ..search.plan import plan_search

    config = model_config(model.source)
    if config is None:
        return None
    gpus = visible_gpus() if model.device.startswith("cuda") else ()
    return plan_search(config, scheme, name=Path(str(model.source)).name, device=model.device, gpus=gpus,
                       budget_gib=getattr(args, "memory_budget", None), auto_batch=_auto_batch(args, model.device))


@contextlib.contextmanager
def _locked(folder: RunFolder, args) -> Iterator[RunFolder]:
    """One writer per run folder, for the rest of the command: refused at once (one line naming the
    holder) when another process writes there; what a writer that is gone left is finished or removed."""
    from ..runtime.runlock import RunLock

    with RunLock(folder, command=getattr(args, "command_line", None)) as lock:
        for note in lock.notes:
            print(f"vlq: note: {note}", file=sys.stderr, flush=True)
        yield folder


@contextlib.contextmanager
def _prepared(args, default_out: Callable[[object], str]) -> Iterator[tuple[ModelRequest, DataRequest, object, RunFolder]]:
    """Validate, lock the run folder, then resolve the device and the scheme.

    With ``--out`` the lock comes before ``--device auto`` imports torch (a second writer is refused
    in a fraction of a second); without it the default folder is named after the device's scheme.
    """
    if args.device == "auto" and args.out:
        checked = _light_checks(args)
        with _locked(RunFolder(args.out).require_writable(), args) as folder:
            model, data, scheme = _prepare(args, checked)
            yield model, data, scheme, folder
        return
    model, data, scheme = _prepare(args)  # a named device: torch-free
    with _locked(RunFolder(args.out or default_out(scheme)).require_writable(), args) as folder:
        yield model, data, scheme, folder


@contextlib.contextmanager
def _session(folder: RunFolder | None, verbose: bool) -> Iterator[tuple[IO[str], object]]:
    """Third-party output to ``folder``'s log; yields the terminal and a progress reporter on it."""
    from ..runtime.console import third_party_to_log
    from ..runtime.progress import Lines, TerminalBars

    with third_party_to_log(folder.log if folder else None, verbose=verbose) as terminal:
        bars = TerminalBars(terminal) if getattr(terminal, "isatty", lambda: False)() else Lines(terminal)
        yield terminal, bars


def _print(*blocks: str) -> None:
    print("\n\n".join(b for b in blocks if b), flush=True)


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------


def cmd_run(args) -> int:
    from ..runtime.files import check_export_dir

    rows = _positive_int(args.fidelity_rows, "--fidelity-rows")
    with _prepared(args, lambda scheme: f"runs/{scheme.id}") as (model, data, scheme, folder):
        check_export_dir(folder.checkpoint, args.overwrite)
        verdict = scheme.vllm_servability()
        with _session(folder, args.verbose) as (terminal, progress):
            if not verdict.servable:
                progress.stage(f"note: {verdict.reason} The export is checked on disk only.")
            from .. import pipeline

            loaded = pipeline.load_model(model, progress=progress)
            outcome = pipeline.run(loaded, scheme, data, folder, overwrite=args.overwrite, serve=not args.no_serve,
                                   rows=rows, progress=progress)
    from ..report.tables import fidelity_table, layer_table, served_layer_table, summary_table

    manifest = outcome.searched.manifest
    _print("", layer_table(manifest), summary_table(manifest, outcome.checks),
           "Fidelity to the BF16 model (KLD in nats per token, held-out data):\n" + fidelity_table(manifest.fidelity))
    if outcome.served is not None:
        _print(f"vLLM ({outcome.served.expectations_from} gives the expected formats):",
               served_layer_table(outcome.served.layers, outcome.served.expected), outcome.served.note)
    else:
        _print(f"vLLM check skipped: {outcome.serve_skipped}")
    print(f"\nrun folder {folder.root} (third-party output in {folder.log})")
    return 0 if outcome.ok else 1


def cmd_search(args) -> int:
    with _prepared(args, lambda scheme: f"runs/{scheme.id}") as (model, data, scheme, folder), \
            _session(folder, args.verbose) as (terminal, progress):
        from .. import pipeline

        loaded = pipeline.load_model(model, progress=progress)
        calibration = pipeline.calibrate(loaded, scheme, data, progress=progress)
        searched = pipeline.search(loaded, scheme, calibration, run=folder, progress=progress)
    from ..report.tables import checks_table, layer_table

    _print(layer_table(searched.manifest), checks_table(searched.checks))
    return 0


def cmd_export(args) -> int:
    """Re-apply a saved search (no re-scoring) and export it."""
    from ..runtime.files import check_export_dir

    folder = RunFolder(args.run_dir)
    for needed in (folder.manifest, folder.search_state):
        if not needed.exists():
            raise VlqError(f"{folder.root} has no {needed.name}; pass a folder written by `vlq search --out FOLDER`.")
    with _locked(folder, args):
        check_export_dir(folder.checkpoint, args.overwrite)
        from ..manifest.manifest import Manifest

        saved = Manifest.load(folder.manifest)
        args.model = args.model or saved.model_source
        model, data = _requests(args)
        model = ModelRequest(model.source, _resolve_device(args.device), model.trust_remote_code)
        saved.scheme.require_device(model.device)
        given = args.data is not None or args.images is not None
        with _session(folder, args.verbose) as (terminal, progress):
            from .. import pipeline

            loaded = pipeline.load_model(model, progress=progress)
            searched = pipeline.restore(folder, loaded, data if given else None, progress=progress)
            exported = pipeline.export(searched, folder, overwrite=args.overwrite, progress=progress)
    from ..report.tables import layer_table, summary_table

    checks = searched.checks + exported.checks
    _print(layer_table(searched.manifest), summary_table(searched.manifest, checks))
    return 0 if all(c.ok for c in checks) else 1


def cmd_sweep(args) -> int:
    """Score once, then decide (and optionally export and verify) every effective-bits target."""
    targets = _float_list(args.targets, "--targets")
    rows = _positive_int(args.fidelity_rows, "--fidelity-rows")
    if not targets:
        raise SchemeError("--targets needs at least one effective-bits target, e.g. --targets 8,7,6.")
    exports: list[float] | bool = True if args.export == "all" else _float_list(args.export or "", "--export")
    unknown = sorted(set(exports) - set(targets)) if exports is not True else []
    if unknown:
        raise SchemeError(f"--export {','.join(f'{t:g}' for t in unknown)} is not among --targets {args.targets}; export a subset of the targets.")
    default_out = (lambda scheme: f"runs/sweep-{'+'.join(scheme.formats)}-{scheme.method}-{scheme.strategy}")
    with _prepared(args, default_out) as (model, data, scheme, folder):
        for target in targets:
            scheme.with_(target_bits=target)  # refuse an infeasible target before loading anything
            if Path(model.source, "config.json").exists():
                from ..formats.applicability import require_fits_config

                require_fits_config(Path(model.source) / "config.json", scheme.with_(target_bits=target))
        with _session(folder, args.verbose) as (terminal, progress):
            from .. import pipeline

            loaded = pipeline.load_model(model, progress=progress)
            calibration = pipeline.calibrate(loaded, scheme, data, progress=progress)
            result = pipeline.sweep(loaded, scheme, calibration, targets, folder, export_targets=exports,
                                    rows=rows, overwrite=args.overwrite, progress=progress)
    from ..report.tables import sweep_table

    _print(sweep_table(result.points),
           f"one search {result.search_s:.1f}s; all decisions {result.decisions_s:.1f}s; "
           f"measured {result.measured_s:.1f}s ({result.rows} rows per kind, BF16 reference included); "
           f"with exports {result.total_s:.1f}s; "
           f"written to {folder.sweep}")
    return 0 if all(p.verified for p in result.points if p.export_path is not None) else 1


def _positive_int(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SchemeError(f"{flag} takes a whole number of at least 1 (e.g. 16); got {text!r}.")
    return value


def _float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise SchemeError(f"{flag} takes comma-separated numbers (e.g. 8,7,6); got {text!r}.") from exc


def cmd_report(args) -> int:
    from ..report.tables import write_report

    path = write_report(args.out, benchmarks=args.benchmarks or [], manifests=args.manifests or [],
                        sweeps=args.sweeps or [], baseline=args.baseline, comparisons=args.comparisons or [])
    print(f"report written to {path}")
    return 0


def cmd_compare_calibration(args) -> int:
    """Text-only vs image+text search on one model and budget: agreement, rank correlation, plot."""
    if bool(args.text_manifest) != bool(args.image_manifest):
        raise VlqError("--text-manifest and --image-manifest go together (compare two saved searches).")
    if args.text_manifest:
        out = Path(args.out or "runs/compare-calibration")
        with _locked(RunFolder(out).require_writable(), args):
            from .. import pipeline
            from ..fidelity.comparison import compare_calibrations
            from ..manifest.manifest import Manifest

            comparison = compare_calibrations(Manifest.load(args.text_manifest), Manifest.load(args.image_manifest))
            pipeline.write_comparison(comparison, out)
    else:
        images = args.images or "generated"
        args.images = None  # the text side is calibrated from --data / the corpus
        with _prepared(args, lambda scheme: f"runs/compare-calibration-{scheme.id}") as (model, text_data, scheme, folder), \
                _session(folder, args.verbose) as (terminal, progress):
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

    model, _ = _requests(args)
    if model.source in (TINY, TINY_TRAINED):
        raise SchemeError(f"`vlq plan` needs a config: pass a checkpoint folder or a qwen2.5-vl-*-random shape, not {model.source!r}.")
    device = "cuda" if args.device == "auto" else args.device  # planning is for the GPU unless asked otherwise
    scheme = _scheme(args, device, full_size=True)
    plan = _plan(args, ModelRequest(model.source, device, False), scheme)
    lines = plan.lines()
    try:
        placement = _placement(plan)  # shown also where the GPUs are not visible here
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
        with _locked(RunFolder(out).require_writable(), args):
            from .. import pipeline
            from ..fidelity.comparison import compare_methods
            from ..manifest.manifest import Manifest

            comparison = compare_methods(Manifest.load(args.manifests[0]), Manifest.load(args.manifests[1]))
            pipeline.write_comparison(comparison, out)
    else:
        if args.method is not None:
            raise SchemeError("compare-methods searches with both --methods; drop --method.")
        default_out = (lambda scheme: f"runs/compare-methods-{'+'.join(scheme.formats)}-{scheme.target_bits:g}b")
        with _prepared(args, default_out) as (model, data, scheme, folder), _session(folder, args.verbose) as (terminal, progress):
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
    with _locked(folder, args):
        from ..manifest.manifest import Manifest

        saved = Manifest.load(folder.manifest)
        args.model = args.model or saved.model_source
        given = args.data is not None or args.images is not None or args.seed is not None  # else: the run's own data
        args.seed = 0 if args.seed is None else args.seed
        model, data = _requests(args)
        model = ModelRequest(model.source, _resolve_device(args.device), model.trust_remote_code)
        with _session(folder, args.verbose) as (terminal, progress):
            from .. import pipeline

            if not given:
                data = pipeline.saved_data_request(saved)
            loaded = pipeline.load_model(model, progress=progress)
            measured = pipeline.measure_run(folder, loaded, points, data, progress=progress)
    from ..report.tables import fidelity_table

    _print(f"Fidelity to the BF16 model (KLD in nats per token, held-out data) of {folder.root}:\n" + fidelity_table(measured.measured),
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
        _print(f"vlq check {path} ({pre.quant_algo or 'unquantized'}): pre-flight from disk", checks_table(verdict),
               "\n".join(c.verdict() for c in verdict if not c.ok),
               "vLLM was not started: the checkpoint on disk is inconsistent. Export it again (vlq export RUN --overwrite).")
        return 1
    from ..runtime.files import kill_point

    kill_point("serve")  # tests interrupt here: the checkpoint passed, vLLM not yet started
    if importlib.util.find_spec("vllm") is None:
        raise VlqError("`vlq check` needs vLLM, found no vllm package; install it (scripts/install.sh installs the CPU build).")
    folder = RunFolder(path.parent) if (path.parent / RunFolder.MANIFEST).exists() else None
    with _session(folder, args.verbose) as (terminal, progress):
        from .. import pipeline

        served = pipeline.serve_check(path, manifest=manifest, reference=args.reference, progress=progress)
    from ..report.tables import served_layer_table

    _print(f"vlq check {path} ({pre.quant_algo or 'unquantized'}; expected formats from {served.expectations_from})",
           served_layer_table(served.layers, served.expected), checks_table(served.checks), served.note)
    return 0 if served.ok else 1


# ------------------------------------------------------------------------------------------------
# Parser and entry point
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlq", description="Quantize the language model of Qwen2.5-VL with ModelOpt "
                                     "AutoQuant, keep the vision tower BF16, check the export in vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="search -> manifest -> export -> on-disk checks -> vLLM (tiny model by default)")
    _model_args(p, default_model=TINY_TRAINED)  # fidelity on learned weights
    _scheme_args(p)
    p.add_argument("--out", help="run folder (default runs/<scheme id>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in the run folder")
    p.add_argument("--no-serve", action="store_true", help="skip the vLLM check of the export")
    p.add_argument("--fidelity-rows", help="held-out rows per data kind the fidelity points are measured on "
                   "(default: 32 for full-size models, 8 for tiny ones; fewer is faster and noisier)")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("search", help="LM-only AutoQuant search; writes manifest.json and the search state")
    _model_args(p)
    _scheme_args(p)
    p.add_argument("--out", help="run folder (default runs/<scheme id>)")
    _common(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="export the checkpoint of a finished search (state restored, not re-scored)")
    p.add_argument("run_dir", help="folder written by `vlq search`")
    _model_args(p, default_model=None)
    p.add_argument("--overwrite", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="score once, solve many: decide several effective-bits targets (export some)")
    _model_args(p, default_model=TINY_TRAINED)  # fidelity on learned weights
    _scheme_args(p)
    p.add_argument("--targets", required=True, help="comma-separated effective-bits targets, e.g. 8,7,6,5")
    p.add_argument("--export", help="targets to export and verify: comma-separated (e.g. 6,5) or 'all' (default: none)")
    p.add_argument("--fidelity-rows", help="held-out rows per data kind each target is measured on "
                   "(default: 32 for full-size models, 8 for tiny ones; fewer is faster and noisier)")
    p.add_argument("--out", help="sweep folder")
    p.add_argument("--overwrite", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="Markdown tables and PNG plots from saved benchmarks, manifests and sweeps")
    p.add_argument("--out", default="runs/report", help="output folder (default runs/report; reports/README.md is hand-written)")
    p.add_argument("--benchmarks", nargs="*", help="pytest-benchmark JSON files")
    p.add_argument("--baseline", help="a saved benchmark JSON to compare against (regressions flagged)")
    p.add_argument("--manifests", nargs="*", help="manifest.json files (per-layer format maps)")
    p.add_argument("--sweeps", nargs="*", help="sweep.json files (Pareto curves)")
    p.add_argument("--comparisons", nargs="*", help="comparison.json files of compare-calibration / compare-methods "
                   "(decision agreement beside each scheme's KLD to BF16)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare-calibration", help="search text-only and image+text on one model and budget; compare the decisions")
    _model_args(p, default_model=TINY_TRAINED)  # fidelity on learned weights
    _scheme_args(p)
    p.add_argument("--text-manifest", help="compare two saved manifests instead of searching: the text-only one")
    p.add_argument("--image-manifest", help="... and the image+text one")
    p.add_argument("--out", help="folder for comparison.md/.json/.png and both manifests")
    _common(p)
    p.set_defaults(func=cmd_compare_calibration)

    p = sub.add_parser("plan", help="estimate weights, search peak, export size and GPUs needed, before loading anything")
    _model_args(p, default_model="qwen2.5-vl-3b-random")
    _scheme_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compare-methods", help="search with gradient and with kl_div sensitivity on one model, budget and "
                       "data; compare the decisions and each scheme's KLD to BF16")
    _model_args(p, default_model=TINY_TRAINED)  # fidelity on learned weights
    _scheme_args(p)
    p.add_argument("--methods", default="gradient,kl_div", help="the two methods, comma-separated (default gradient,kl_div)")
    p.add_argument("--manifests", nargs=2, metavar="MANIFEST", help="compare two saved manifests instead of searching")
    p.add_argument("--out", help="folder for comparison.md/.json and both manifests")
    _common(p)
    p.set_defaults(func=cmd_compare_methods)

    p = sub.add_parser("fidelity", help="measure a finished run folder against its BF16 model at one measurement point "
                       "(fake / checkpoint / served) and record it in its manifest")
    p.add_argument("run_dir", help="folder written by `vlq run` (or `vlq search` + `vlq export`)")
    p.add_argument("--point", default="checkpoint", help="fake: the fake-quantized model (search state restored); checkpoint "
                   "(default): the export re-read by the independent dequantizer; served: vLLM prompt logprobs of the export. "
                   "Comma-separated for several")
    _model_args(p, default_model=None)
    _common(p)
    p.set_defaults(func=cmd_fidelity, seed=None)

    p = sub.add_parser("explain", help="print the live ModelOpt facts vlq relies on")
    p.add_argument("--format", default="fp8", help="format whose config entries to show")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("check", help="serve an exported checkpoint in vLLM and check it layer by layer")
    p.add_argument("path", help="exported checkpoint folder")
    p.add_argument("--manifest", help="manifest.json to compare per-layer methods against (default: the run folder's)")
    p.add_argument("--reference", help="BF16 checkpoint to compare greedy outputs against")
    _common(p)
    p.set_defaults(func=cmd_check)
    recipe_cli.add_parser(sub)
    evaluate_cli.add_parser(sub)
    return parser


#: Exit codes (docs/guide.md, "What can go wrong").
EXIT_OK, EXIT_CHECK_FAILED, EXIT_REFUSED, EXIT_INTERNAL = 0, 1, 2, 3


def _raise_on_signal(signum, _frame) -> None:
    import signal

    from ..runtime.errors import Terminated

    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Run one verb; every failure ends as one line on stderr and an exit code, never a traceback.

    0: done, every check holds; 1: a check failed (its verdict is printed); 2: refused (bad input, or a
    stage failed: ``vlq: error:`` names the first cause, the trace is in the log); 3: ``vlq: internal
    error`` (a vlq bug; the trace is in the log); 128+N: stopped by signal N (SIGTERM 143, SIGINT 130)
    after cleaning up what it was writing.
    """
    import signal

    from ..runtime.errors import Terminated

    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["vlq", *map(str, sys.argv[1:] if argv is None else argv)])  # names this command in run-folder locks
    signal.signal(signal.SIGTERM, _raise_on_signal)  # cleanup runs in `finally` blocks, as for Ctrl-C
    try:
        return args.func(args)
    except VlqError as exc:
        print(f"vlq: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (Terminated, KeyboardInterrupt) as exc:
        name = exc.signal_name if isinstance(exc, Terminated) else "SIGINT"
        print(f"vlq: error: stopped by {name}; nothing half-written was kept (a search resumes when the same command runs again).",
              file=sys.stderr)
        return 128 + int(getattr(signal, name))
    except Exception as exc:
        from ..runtime.console import log_exception
        from ..runtime.errors import one_line

        log = log_exception(exc)
        print(f"vlq: internal error: {one_line(exc)} (details: {log or 'no log could be written'})", file=sys.stderr)
        return EXIT_INTERNAL

