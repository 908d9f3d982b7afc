"""The measured oracle: the model with only that group in that format, KLD to BF16 on the scoring split.

Shared work (:mod:`vlq.study.layerwise`): one BF16 forward per scoring batch captures every decoder layer's input;
for each layer, format and group of that layer the group alone is switched to the format and only the layers
from its own onward are re-run.  A (group, format) costs ``(layers - L) / layers`` of a forward, not a forward.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

from ...formats.registry import NO_QUANT
from ...search.search import apply_decisions
from ..layerwise import capture_layer_inputs, kld_from_layer
from ..strategy import (
    GroupScores, MemoryMeter, ScoredStrategy, StudyContext, candidate_formats, decoder_layer_index, with_choices,
)


def ablation_scores(context: StudyContext, *, include_none: bool = False) -> dict[str, dict[str, float]]:
    """KLD of each (group, format) alone; with ``include_none`` also the unquantized model through the same path."""
    groups = context.groups
    everything_off = {g.name: NO_QUANT for g in groups}
    apply_decisions(context.search_result, with_choices(groups, everything_off))
    captured = capture_layer_inputs(context.model, context.scoring)
    by_layer: dict[int, list] = defaultdict(list)
    for group in groups:
        by_layer[decoder_layer_index(group.name)].append(group)
    scores: dict[str, dict[str, float]] = {g.name: {} for g in groups}
    pairs = sum(len([f for f in candidate_formats(g) if f != NO_QUANT or include_none]) for g in groups)
    try:
        with context.progress.bar("ablation (one group at a time)", total=pairs) as bar:
            for layer in sorted(by_layer):
                formats = dict.fromkeys(f for g in by_layer[layer] for f in candidate_formats(g))
                for fmt in formats:  # a layer's groups back to back in one format: quantizers switched, not rebuilt
                    if fmt == NO_QUANT and not include_none:
                        continue
                    for group in (g for g in by_layer[layer] if fmt in candidate_formats(g)):
                        # only this group switches (everything else stays off): one hparam, not every group's
                        apply_decisions(context.search_result, [dataclasses.replace(group, chosen=fmt)])
                        scores[group.name][fmt] = kld_from_layer(context.model, captured, layer)
                        apply_decisions(context.search_result, [dataclasses.replace(group, chosen=NO_QUANT)])
                        bar.update()
    finally:
        apply_decisions(context.search_result, context.search_result.groups)  # back to the search's own choice
    return scores


class Ablation(ScoredStrategy):
    name = "ablation"

    def scores(self, context: StudyContext) -> GroupScores:
        start = time.perf_counter()
        with MemoryMeter(context.model.device) as meter:
            scores = ablation_scores(context)
        rows = sum(int(b["input_ids"].shape[0]) for b in context.scoring)
        return GroupScores(self.name, scores, time.perf_counter() - start, meter.peak, meter.kind,
                           f"{rows} scoring rows, layers re-run from each group's own")


STRATEGY = Ablation()
