"""Data-free: how far each format's real quantizer moves each group's weights.

The score of (group, format) is the group's relative Frobenius error ``||W - Q(W)|| / ||W||`` (its member
weights taken together, ``Q`` the ModelOpt weight quantizer the search calibrated for that format) times the
group's uncompressed cost.  The LP minimizes a sum of scores, so a group's error counts in proportion to the
weights it applies to: a relative error on a small projection weighs less than the same on a large MLP matrix.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ...formats.registry import NO_QUANT
from ...search.search import apply_decisions
from ..strategy import GroupScores, MemoryMeter, ScoredStrategy, StudyContext, candidate_formats


@torch.no_grad()
def relative_weight_error(vlm, members) -> float:
    """``||W - Q(W)|| / ||W||`` over ``members``' weights with their live weight quantizers."""
    error = norm = 0.0
    for name in members:
        module = vlm.get_submodule(name)
        weight = module.weight
        quantized = module.weight_quantizer(weight)
        error += float((weight.float() - quantized.float()).pow(2).sum())
        norm += float(weight.float().pow(2).sum())
    return (error / norm) ** 0.5 if norm > 0 else 0.0


class WeightError(ScoredStrategy):
    name = "weight_error"

    def scores(self, context: StudyContext) -> GroupScores:
        start = time.perf_counter()
        groups = context.groups
        scores: dict[str, dict[str, float]] = {}
        try:
            with MemoryMeter(context.model.device) as meter:
                for group in groups:
                    scores[group.name] = {}
                    full = group.candidate(NO_QUANT).cost
                    for fmt in candidate_formats(group):
                        if fmt == NO_QUANT:
                            continue
                        apply_decisions(context.search_result, [dataclasses.replace(group, chosen=fmt)])
                        scores[group.name][fmt] = relative_weight_error(context.model.vlm, group.members) * full
        finally:
            apply_decisions(context.search_result, context.search_result.groups)
        return GroupScores(self.name, scores, time.perf_counter() - start, meter.peak, meter.kind, "no data")


STRATEGY = WeightError()
