"""What every command does before its stage: validate the flags without heavy imports (paths, formats,
bits, a checkpoint folder's prerequisites, the memory plan), lock the run folder, resolve the device and the
scheme, and route third-party output to the run's log."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from ..inputs.requests import TINY, TINY_TRAINED, DataRequest, ModelRequest, RunFolder
from ..search.scheme import SCHEME_FIELDS, Scheme, default_scheme


def scheme_from_flags(args, device: str, *, full_size: bool):
    """The scheme the flags ask for, on top of the device's default (or the --scheme file, or the --recipe)."""
    if getattr(args, "recipe", None):
        from .recipe import recipe_scheme_from_args

        return recipe_scheme_from_args(args, device, full_size=full_size)
    base = Scheme.from_yaml(args.scheme).to_dict() if args.scheme else default_scheme(device, full_size=full_size).to_dict()
    for key in SCHEME_FIELDS:  # the flags' dests are the scheme's field names
        value = getattr(args, key, None)
        if value is not None and value != "auto":
            base[key] = value
    return Scheme.from_dict(base)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def requests_from(args) -> tuple[ModelRequest, DataRequest]:
    """Model and data requests, validated without heavy imports (device 'auto' still unresolved)."""
    device = args.device if args.device != "auto" else "cpu"
    model = ModelRequest(args.model, device, getattr(args, "trust_remote_code", False))
    data = DataRequest(getattr(args, "data", None), getattr(args, "images", None), getattr(args, "seed", 0))
    return model, data


def require_kv_cache_servable(model: ModelRequest, scheme) -> None:
    """An FP8 KV cache this machine's vLLM cannot run is refused now, not in the engine after the search."""
    if not scheme.kv_cache_fp8:
        return
    from ..formats.applicability import text_head_dim
    from ..runtime.capabilities import require_fp8_kv_cache_servable
    from ..inputs.requests import model_config

    config = model_config(model.source)
    require_fp8_kv_cache_servable(head_dim=text_head_dim(config) if config is not None else None)


@dataclass(frozen=True)
class LightChecks:
    """What the torch-free checks found: the requests, whether the model is full-size, and the scheme as the
    likely device defaults it (the device is resolved, importing torch, only after them)."""

    model: ModelRequest
    data: DataRequest
    full_size: bool
    scheme: object
    folder: bool  # the model is a checkpoint folder (its files were checked)


def light_checks(args) -> LightChecks:
    """Paths, formats and bits, and what a checkpoint folder cannot give a later stage, refused without
    importing torch; the fallbacks a run will take are printed as notes."""
    from ..runtime.hardware import visible_gpus

    model, data = requests_from(args)
    full_size = model.source not in (TINY, TINY_TRAINED)  # tiny models keep their seconds-long defaults
    folder = full_size and Path(str(model.source)).is_dir()
    likely = args.device if args.device != "auto" else ("cuda" if visible_gpus() else "cpu")  # no torch yet
    light = scheme_from_flags(args, likely, full_size=full_size)  # formats/bits errors, fast
    if folder:
        from ..formats.applicability import require_fits_config

        require_fits_config(Path(model.source) / "config.json", light)
        check_folder_prerequisites(args, model, data, light)
    if getattr(args, "command", None) == "run" and not getattr(args, "no_serve", False):
        require_kv_cache_servable(model, light)
    return LightChecks(model, data, full_size, light, folder)


def prepare(args, checked: LightChecks | None = None):
    """Validate everything light first (paths, formats, bits), then resolve the device and the scheme."""
    checked = checked or light_checks(args)
    model, data, full_size, folder, light = checked.model, checked.data, checked.full_size, checked.folder, checked.scheme
    device = resolve_device(args.device)
    model = ModelRequest(model.source, device, model.trust_remote_code)
    scheme = scheme_from_flags(args, device, full_size=full_size)
    scheme.require_device(device)
    if folder and scheme != light:
        from ..formats.applicability import require_fits_config

        require_fits_config(Path(model.source) / "config.json", scheme)  # layer sizes outside a format's blocks
    plan = plan_from_flags(args, model, scheme)
    if plan is not None:
        scheme = plan.require().scheme  # refused here, before anything loads, when it cannot fit
        placement = placement_of(plan)
        if placement is not None:  # more than one GPU needed and visible: split the model (device_map)
            model = dataclasses.replace(model, device_map=dict(placement.device_map))
    return model, data, scheme


def will_serve(args, scheme) -> bool:
    """Whether this command ends by loading its export in vLLM (``vlq run`` without --no-serve, a servable
    scheme, a vLLM installed): its serve prerequisites are then checked before anything loads."""
    from ..inputs.prerequisites import installed_vllm_build

    return (getattr(args, "command", None) == "run" and not getattr(args, "no_serve", False)
            and scheme.vllm_servability().servable and installed_vllm_build() is not None)


def check_folder_prerequisites(args, model: ModelRequest, data: DataRequest, scheme) -> None:
    """Refuse what a later stage would fail on (tokenizer, image processor, vLLM's limits); print the fallbacks."""
    from ..inputs.requests import model_config
    from ..inputs.prerequisites import check_prerequisites

    found = check_prerequisites(model.source, model_config(model.source), seq_len=scheme.seq_len,
                                serve=will_serve(args, scheme), images=data.images)
    for note in found.notes:
        print(f"vlq: note: {note}", file=sys.stderr, flush=True)


def placement_of(plan):
    """The device_map of a plan that needs several GPUs, None when one device holds it."""
    if plan.devices_needed <= 1:
        return None
    from ..search.placement import place

    return place(plan.shape, [f"cuda:{i}" for i in range(plan.devices_needed)], budget_bytes=plan.budget_bytes)


def auto_batch(args, device: str) -> bool:
    asked = getattr(args, "batch_size", None)
    return asked == "auto" or (asked is None and not getattr(args, "scheme", None) and device.startswith("cuda"))


def plan_from_flags(args, model: ModelRequest, scheme):
    """The memory plan of a full-size model (None for the tiny ones, built in code): still no torch."""
    from ..runtime.hardware import visible_gpus
    from ..inputs.requests import model_config
    from ..search.plan import plan_search

    config = model_config(model.source)
    if config is None:
        return None
    gpus = visible_gpus() if model.device.startswith("cuda") else ()
    return plan_search(config, scheme, name=Path(str(model.source)).name, device=model.device, gpus=gpus,
                       budget_gib=getattr(args, "memory_budget", None), auto_batch=auto_batch(args, model.device))


@contextlib.contextmanager
def locked(folder: RunFolder, args) -> Iterator[RunFolder]:
    """One writer per run folder, for the rest of the command: refused at once (one line naming the
    holder) when another process writes there; what a writer that is gone left is finished or removed."""
    from ..runtime.runlock import RunLock

    with RunLock(folder, command=getattr(args, "command_line", None)) as lock:
        for note in lock.notes:
            print(f"vlq: note: {note}", file=sys.stderr, flush=True)
        yield folder


@contextlib.contextmanager
def prepared(args, default_out: Callable[[object], str]) -> Iterator[tuple[ModelRequest, DataRequest, object, RunFolder]]:
    """Validate, lock the run folder, then resolve the device and the scheme.

    With ``--out`` the lock comes before ``--device auto`` imports torch (a second writer is refused
    in a fraction of a second); without it the default folder is named after the device's scheme.
    """
    if args.device == "auto" and args.out:
        checked = light_checks(args)
        with locked(RunFolder(args.out).require_writable(), args) as folder:
            model, data, scheme = prepare(args, checked)
            yield model, data, scheme, folder
        return
    model, data, scheme = prepare(args)  # a named device: torch-free
    with locked(RunFolder(args.out or default_out(scheme)).require_writable(), args) as folder:
        yield model, data, scheme, folder


@contextlib.contextmanager
def session(folder: RunFolder | None, verbose: bool) -> Iterator[tuple[IO[str], object]]:
    """Third-party output to ``folder``'s log; yields the terminal and a progress reporter on it."""
    from ..runtime.console import third_party_to_log
    from ..runtime.progress import Lines, TerminalBars

    with third_party_to_log(folder.log if folder else None, verbose=verbose) as terminal:
        bars = TerminalBars(terminal) if getattr(terminal, "isatty", lambda: False)() else Lines(terminal)
        yield terminal, bars


def print_blocks(*blocks: str) -> None:
    print("\n\n".join(b for b in blocks if b), flush=True)
