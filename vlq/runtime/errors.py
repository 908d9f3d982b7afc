"""One error hierarchy for everything vlq refuses.

Every message says what is wrong, with which names, expected versus got, and how to fix it.
"""

from __future__ import annotations

import contextlib
import errno
from typing import Iterator


class VlqError(Exception):
    """Base class of every error vlq raises on purpose."""


class ModelSourceError(VlqError):
    """The model path or name cannot be loaded as a Qwen2.5-VL checkpoint."""


class CalibrationDataError(VlqError):
    """Calibration data is empty, too short, too small for the steps asked, or off-vocabulary."""


class SchemeError(VlqError):
    """A scheme names an unknown format, an impossible target or a format this device lacks."""


class SearchStateError(VlqError):
    """A saved search state is corrupt or was made with other settings."""


class GuardViolation(VlqError):
    """A guarantee vlq checks (vision untouched, lm_head unquantized) does not hold."""


class ManifestMismatch(VlqError):
    """A manifest disagrees with the searcher state, the live model or an exported checkpoint."""


class CheckpointError(VlqError):
    """An exported checkpoint on disk breaks a guarantee, or its directory cannot be written."""


class ServingError(VlqError):
    """A checkpoint cannot be served by vLLM as the manifest promises."""


class ResourceError(VlqError):
    """The device ran out of memory; the message names the setting to lower."""


class LockHeld(VlqError):
    """Another process writes into the run folder (or into the folder around it); the message names it."""


class Terminated(BaseException):
    """SIGTERM (or SIGINT) arrived: raised in the main thread so every ``finally`` cleans up what it
    was writing.  A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


# ------------------------------------------------------------------------------------------------
# Stage boundaries: a library's exception becomes the stage's error, with its first cause
# ------------------------------------------------------------------------------------------------

#: Top-level packages whose exceptions inside a stage are that stage's failure (not a vlq bug).
THIRD_PARTY_PACKAGES = frozenset({
    "modelopt", "transformers", "vllm", "torch", "safetensors", "huggingface_hub", "tokenizers", "datasets",
    "accelerate", "numpy", "PIL", "pulp", "yaml", "json",
})
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_DISK_FULL_WORDS = ("No space left on device", "File too large", "Disk quota exceeded")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first (``__cause__`` before ``__context__``)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def first_cause(exc: BaseException) -> BaseException:
    """The exception that started the chain: the innermost cause."""
    return _chain(exc)[-1]


def raised_in(exc: BaseException) -> str:
    """Top-level package of the frame that raised ``exc``'s first cause (``vlq`` for our own code)."""
    root = first_cause(exc)
    defined_in = type(root).__module__.split(".")[0]
    if defined_in in THIRD_PARTY_PACKAGES - {"json", "yaml", "numpy"}:  # e.g. safetensors_rust.SafetensorError raised from C
        return defined_in
    tb = root.__traceback__
    module = ""
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "") or module
        tb = tb.tb_next
    return module.split(".")[0] or "unknown"


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of ``exc``'s first cause."""
    root = first_cause(exc)
    text = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


def is_disk_full(exc: BaseException) -> bool:
    """The disk (or a file-size limit) refused a write somewhere in ``exc``'s chain."""
    return any(
        (isinstance(e, OSError) and e.errno in _DISK_FULL) or any(w in str(e) for w in _DISK_FULL_WORDS)
        for e in _chain(exc)
    )


@contextlib.contextmanager
def stage_boundary(stage: str, error: type[VlqError], *, where: str | None = None) -> Iterator[None]:
    """Turn an exception from a library inside ``stage`` into ``error`` naming its first cause.

    The full trace goes to the run's log (:func:`vlq.runtime.console.log_exception`).  A full disk anywhere is a
    :class:`ResourceError` naming ``where``.  vlq's own exceptions pass unchanged; an exception raised by
    vlq's own code is a bug and is left for the CLI's internal-error line.
    """
    try:
        yield
    except VlqError:
        raise
    except Exception as exc:
        from .console import log_exception

        if is_disk_full(exc):
            log = log_exception(exc)
            raise ResourceError(
                f"{stage}: the disk is full or a file-size limit was hit while writing{f' {where}' if where else ''} "
                f"({one_line(exc)}). Free space or choose a folder on another disk; nothing half-written was kept"
                + (f" (trace in {log})" if log else "") + "."
            ) from exc
        origin = raised_in(exc)
        if origin not in THIRD_PARTY_PACKAGES:
            raise
        log = log_exception(exc)
        raise error(f"{stage} failed in {origin}: {one_line(exc)}" + (f" (trace in {log})" if log else "")) from exc
