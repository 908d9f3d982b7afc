"""ModelOpt's kl_div score: KLD on calibration rows per group and format (each candidate scored by a forward)."""

from __future__ import annotations

from .gradient import ModelOptScores

STRATEGY = ModelOptScores("kl_div")
