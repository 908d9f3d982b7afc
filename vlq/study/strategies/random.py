"""Random allocations that meet the target: ``seeds`` per target, each drawn from its own seed.

One draw starts with every group in its cheapest candidate, visits the groups in a random order and moves each
to a candidate picked uniformly among its more precise ones that keep the allocation within the target (none
fits: it stays).  Every draw therefore meets the target and spends most of it, as the LP does, so the band is a
fair "uninformed" reference at equal bits.
"""

from __future__ import annotations

import random as _random
from typing import Sequence

from ...search.decisions import lm_achieved_bits
from ..strategy import Allocation, BaselineStrategy, StudyContext, candidate_formats, with_choices


def random_choices(groups, target: float, rng: _random.Random) -> dict[str, str]:
    chosen = {g.name: candidate_formats(g)[0] for g in groups}
    order = list(groups)
    rng.shuffle(order)
    for group in order:
        formats = candidate_formats(group)
        upgrades = [f for f in formats[formats.index(chosen[group.name]) + 1:]
                    if lm_achieved_bits(with_choices(groups, {**chosen, group.name: f})) <= target + 1e-9]
        if upgrades:
            chosen[group.name] = rng.choice(upgrades)
    return chosen


class RandomAllocation(BaselineStrategy):
    name = "random"
    summary = "seeded random allocations within each target"

    def allocations(self, context: StudyContext, targets: Sequence[float], *, argument: str = "",
                    seeds: int = 0) -> tuple[Allocation, ...]:
        out = []
        for target in targets:
            for seed in range(seeds):
                rng = _random.Random(f"{target:g}/{seed}")
                chosen = random_choices(context.groups, target, rng)
                out.append(Allocation(self.name, float(target), tuple((g.name, chosen[g.name]) for g in context.groups), seed))
        return tuple(out)


STRATEGY = RandomAllocation()
