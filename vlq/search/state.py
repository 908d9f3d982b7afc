"""Saved search states: what they were made from, how they are read, how they are written.

ModelOpt's ``auto_quantize(checkpoint=PATH)`` saves its searcher state (calibrated quantizer states
after calibration, then candidate scores after scoring) with ``torch.save`` and restores it on a
rerun, skipping the work already done.  vlq adds three things around that file:

* **A settings sidecar** (``PATH.vlq.json``, plain JSON) records the formats, method, strategy, step
  counts, a fingerprint of the model's weights and of the calibration batches.  Before ModelOpt
  touches a saved state, :func:`check_resume` compares it with the search about to run and refuses
  any difference *by name*.  ModelOpt itself only checks formats, method and grouping: a state
  scored on another model with the same architecture, or on other data, would be silently reused.
  The effective-bits target is not recorded: it only enters the solve, which always reruns.
* **Safe reading.**  The state is a pickle; vlq reads it only with ``torch.load(weights_only=True)``
  (tensors, containers and the few ModelOpt classes ModelOpt registers as safe globals), also while
  ModelOpt restores it, so a state file cannot run code even when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
  is set.  A truncated or corrupt file is a :class:`SearchStateError` naming the file.
* **Atomic writes.**  Each save goes to a temporary file in the same folder, is fsynced and renamed
  over the previous state, so an interrupted save leaves the previous state, never half a file.

``VLQ_TEST_KILL_AFTER`` (test hook): ``calibration`` or ``scoring`` SIGKILLs the process right after
the state of that phase is saved; ``export`` right after the checkpoint files are written to the
temporary export folder (see :func:`vlq.runtime.files.kill_point`).  Tests use it to interrupt real runs at exact
points.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch

from ..runtime.files import atomic_write, atomic_write_text, kill_point, link_or_copy
from ..runtime.errors import SearchStateError

SIDECAR_SUFFIX = ".vlq.json"
SIDECAR_VERSION = 1


# ------------------------------------------------------------------------------------------------
# Fingerprints and the settings record
# ------------------------------------------------------------------------------------------------


def weights_summary(module: torch.nn.Module) -> list[list[Any]]:
    """Per parameter: name, shape, sum and sum of absolute values (float64, computed on its device).

    Cheap on a GPU (no bytes leave the device except two numbers a tensor) and tolerant of the
    last-digit differences between devices; any real change of weights moves the sums.
    """
    rows = []
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            if param.is_meta:
                rows.append([name, list(param.shape), None, None])
                continue
            t = param.detach().double()
            rows.append([name, list(param.shape), float(t.sum()), float(t.abs().sum())])
    return rows


def calibration_digest(calibration, num_batches: int) -> str:
    """SHA-256 over every tensor of the first ``num_batches`` batches (what calibration and scoring read)."""
    digest = hashlib.sha256()
    for batch in list(calibration.batches)[:num_batches]:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                digest.update(f"{key}|{value!r}".encode())
    return digest.hexdigest()


def search_settings(loaded, scheme, calibration) -> dict[str, Any]:
    """What a saved state depends on, as JSON-ready data."""
    steps = max(scheme.num_calib_steps, scheme.num_score_steps)
    return {
        "vlq_search_state_version": SIDECAR_VERSION,
        "formats": list(scheme.formats),
        "method": scheme.method,
        "strategy": scheme.strategy,
        "num_calib_steps": scheme.num_calib_steps,
        "num_score_steps": scheme.num_score_steps,
        "model": {"source": str(loaded.source), "weights": weights_summary(loaded.vlm)},
        "calibration": {
            "source": calibration.source,
            "batch_size": calibration.batch_size,
            "seq_len": calibration.seq_len,
            "digest": calibration_digest(calibration, steps),
        },
        # a recipe's exclusions change what is scored; absent (as in older sidecars) when there are none
        **{key: value for key, value in (("disabled_layers", list(scheme.disabled_layers)),
                                         ("cost_excluded_layers", list(scheme.cost_excluded_layers)),
                                         ("search_spaces", [s.to_modelopt() for s in scheme.search_spaces])) if value},
    }


def sidecar_path(state_path: str | os.PathLike) -> Path:
    state_path = Path(state_path)
    return state_path.with_name(state_path.name + SIDECAR_SUFFIX)


def write_sidecar(state_path: str | os.PathLike, settings: dict[str, Any]) -> Path:
    return atomic_write_text(sidecar_path(state_path), json.dumps(settings, indent=1) + "\n")


def link_state(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """``dest`` (and its settings sidecar) the same saved state as ``source``; every later save replaces
    ``dest`` by a rename, so ``source`` is never written through it."""
    source, dest = Path(source), Path(dest)
    for src, to in ((source, dest), (sidecar_path(source), sidecar_path(dest))):
        if src.exists():
            link_or_copy(src, to)
        else:
            Path(to).unlink(missing_ok=True)
    return dest


def _weights_differ(saved: list, now: list) -> str | None:
    if len(saved) != len(now):
        return f"{len(saved)} parameters saved, {len(now)} now"
    for (name_a, shape_a, sum_a, abs_a), (name_b, shape_b, sum_b, abs_b) in zip(saved, now):
        if name_a != name_b or list(shape_a) != list(shape_b):
            return f"parameter {name_a} {shape_a} saved, {name_b} {shape_b} now"
        for a, b in ((sum_a, sum_b), (abs_a, abs_b)):
            if a is None or b is None:
                continue
            if not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6 * max(1.0, abs(abs_a or 0.0))):
                return f"parameter {name_a} has other values"
    return None


def settings_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Every setting in which ``saved`` and ``now`` differ, as ``name: saved X, now Y`` lines."""
    diffs = []
    for key in ("formats", "method", "strategy", "num_calib_steps", "num_score_steps", "disabled_layers",
                "cost_excluded_layers", "search_spaces"):
        if saved.get(key) != now.get(key):
            fmt = (lambda v: "+".join(v) if isinstance(v, list) else repr(v))
            diffs.append(f"{key}: saved {fmt(saved.get(key))}, now {fmt(now.get(key))}")
    s_model, n_model = saved.get("model") or {}, now.get("model") or {}
    why = _weights_differ(s_model.get("weights") or [], n_model.get("weights") or [])
    if why is not None:
        diffs.append(f"model: saved from {s_model.get('source')!r}, now {n_model.get('source')!r} — the weights differ ({why})")
    s_cal, n_cal = saved.get("calibration") or {}, now.get("calibration") or {}
    for key in ("batch_size", "seq_len"):
        if s_cal.get(key) != n_cal.get(key):
            diffs.append(f"calibration {key}: saved {s_cal.get(key)}, now {n_cal.get(key)}")
    if s_cal.get("digest") != n_cal.get("digest") and not any(d.startswith("calibration") for d in diffs):
        diffs.append(f"calibration data: saved from {s_cal.get('source')!r}, now {n_cal.get('source')!r} — the token batches differ")
    return diffs


# ------------------------------------------------------------------------------------------------
# Reading a state safely
# ------------------------------------------------------------------------------------------------


def _register_modelopt_safe_globals() -> None:
    import modelopt.torch.quantization  # noqa: F401  (registers QuantRecipe & co. as weights_only-safe)


def load_search_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a saved AutoQuant state with ``weights_only=True``; refuse anything else clearly."""
    path = Path(path)
    _register_modelopt_safe_globals()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SearchStateError(
            f"Search state {path} holds objects a weights-only load refuses ({str(exc).splitlines()[0]}). "
            "vlq never unpickles arbitrary objects: the file was not written by ModelOpt's AutoQuant or was "
            "tampered with. Delete it to search again from scratch."
        ) from exc
    except Exception as exc:  # torch raises many types for a truncated or corrupt zip
        raise SearchStateError(
            f"Search state {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it is truncated or corrupt. Delete it to search again from scratch."
        ) from exc
    if not isinstance(state, dict) or not ({"candidate_stats", "quantizer_states"} & set(state)):
        raise SearchStateError(f"{path} is not an AutoQuant search state (no candidate_stats or quantizer_states).")
    return state


def check_resume(state_path: str | os.PathLike, settings: dict[str, Any]) -> dict[str, Any]:
    """Refuse to resume from ``state_path`` unless it was made with ``settings``; return the state."""
    state_path = Path(state_path)
    side = sidecar_path(state_path)
    if side.exists():
        try:
            saved = json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise SearchStateError(f"Search settings {side} cannot be read ({exc}); delete {state_path} and {side}.") from exc
        if not isinstance(saved, dict) or saved.get("vlq_search_state_version") != SIDECAR_VERSION:
            raise SearchStateError(f"{side} is not a vlq search-settings file of version {SIDECAR_VERSION}.")
        diffs = settings_differences(saved, settings)
        if diffs:
            raise SearchStateError(
                f"Search state {state_path} was made with other settings, so its calibration and scores do "
                "not apply to this search:\n  " + "\n  ".join(diffs) + "\nUse another --out folder (checkpoint "
                "path), or delete the state to search again from scratch."
            )
    state = load_search_state(state_path)
    method = state.get("method")
    if method not in (None, settings["method"]):
        raise SearchStateError(
            f"Search state {state_path} was made with method={method!r} but this search uses "
            f"method={settings['method']!r}. Use another checkpoint path or the same method."
        )
    return state


# ------------------------------------------------------------------------------------------------
# Writing (and re-reading) states while ModelOpt runs
# ------------------------------------------------------------------------------------------------


def _atomic_torch_save(obj: Any, f, **kwargs) -> None:
    from modelopt.torch.utils.serialization import _sanitize_for_save

    if not isinstance(f, (str, os.PathLike)):
        torch.save(_sanitize_for_save(obj), f, **kwargs)
        return
    atomic_write(f, lambda fh: torch.save(_sanitize_for_save(obj), fh, **kwargs), binary=True)
    scored = isinstance(obj, dict) and bool(obj.get("candidate_stats"))
    kill_point("scoring" if scored else "calibration")


def _weights_only_load(f, **kwargs) -> Any:
    kwargs["weights_only"] = True
    return torch.load(f, **kwargs)


@contextlib.contextmanager
def modelopt_state_io() -> Iterator[None]:
    """While active, ModelOpt's searcher saves its state atomically and reads it weights-only."""
    from modelopt.torch.opt import searcher

    saved = searcher.safe_save, searcher.safe_load
    searcher.safe_save, searcher.safe_load = _atomic_torch_save, _weights_only_load
    try:
        yield
    finally:
        searcher.safe_save, searcher.safe_load = saved
