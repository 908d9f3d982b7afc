"""One error hierarchy for everything vlq refuses.

Every message says what is wrong, with which names, expected versus got, and how to fix it.
"""

from __future__ import annotations


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
