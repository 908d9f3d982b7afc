"""The first and last k decoder layers in the most precise candidate, the rest in the cheapest; for each target
the largest k whose allocation stays within it (a common hand-made scheme: the ends of the stack are sensitive)."""

from __future__ import annotations

from typing import Sequence

from ...search.decisions import lm_achieved_bits
from ..strategy import Allocation, BaselineStrategy, StudyContext, candidate_formats, decoder_layer_index, with_choices


def position_choices(groups, k: int, layers: int) -> dict[str, str]:
    ends = set(range(k)) | set(range(layers - k, layers))
    return {g.name: candidate_formats(g)[-1] if decoder_layer_index(g.name) in ends else candidate_formats(g)[0]
            for g in groups}


class Position(BaselineStrategy):
    name = "position"

    def allocations(self, context: StudyContext, targets: Sequence[float], *, argument: str = "",
                    seeds: int = 0) -> tuple[Allocation, ...]:
        groups = context.groups
        layers = 1 + max(decoder_layer_index(g.name) for g in groups)
        out = []
        for target in targets:
            best = position_choices(groups, 0, layers)
            for k in range(1, (layers + 1) // 2 + 1):
                chosen = position_choices(groups, k, layers)
                if lm_achieved_bits(with_choices(groups, chosen)) > target + 1e-9:
                    break
                best = chosen
            out.append(Allocation(self.name, float(target), tuple((g.name, best[g.name]) for g in groups)))
        return tuple(out)


STRATEGY = Position()
