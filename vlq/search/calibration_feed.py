"""What ModelOpt's AutoQuant iterates while it calibrates and while it scores: the same rows, merged into fewer,
bigger forwards for calibration where the formats' calibration allows it."""

from __future__ import annotations

import torch

from .scheme import Scheme


#: Calibration forwards merge consecutive batches up to this many tokens (3B at 512 tokens: 16 rows in one
#: forward).  Calibration keeps no activations for a backward pass, and on an H200 a 3B forward costs about
#: the same (~0.25 s, mostly ModelOpt's per-quantizer work) at 1 row as at 4, so fewer, bigger forwards cut
#: that phase by the batch factor.
CALIBRATION_TOKENS_PER_FORWARD = 8192


def calibrating() -> bool:
    """ModelOpt calibrates under ``torch.no_grad`` and scores with gradients (``gradient``) or under
    inference mode (``kl_div``)."""
    return not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


class CalibrationThenScoring:
    """The ``data_loader`` ModelOpt's AutoQuant iterates afresh for every format's calibration and for
    scoring: while calibrating it yields ``calibration`` (the same rows merged into bigger forwards),
    otherwise the scoring batches.  Only for formats calibrated by a running max (max, SmoothQuant): the
    same rows in other forwards give the same amax.  AWQ's search is per batch, and ModelOpt feeds it a
    quarter of the steps, so a scheme with AWQ keeps one batch per step."""

    def __init__(self, calibration: list[dict], scoring: list[dict]):
        self.calibration, self.scoring = calibration, scoring

    def __iter__(self):
        return iter(self.calibration if calibrating() else self.scoring)


def calibration_forwards(scheme: Scheme, batches: list[dict]) -> list[dict]:
    """The first ``num_calib_steps`` batches as calibration forwards: merged up to
    :data:`CALIBRATION_TOKENS_PER_FORWARD` tokens unless a format's calibration depends on the batching."""
    from ..fidelity.reference import group_rows

    first = batches[: scheme.num_calib_steps]
    if any(f.calibration_by_batch for f in scheme.format_objects):
        return first
    return group_rows(first, max(1, CALIBRATION_TOKENS_PER_FORWARD // scheme.seq_len))
