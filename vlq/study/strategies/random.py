"""Random allocations that meet the target: ``seeds`` per target, each drawn from its own seed.

One draw starts with every group in its cheapest candidate, visits the groups in a random order and moves each
to a candidate picked uniformly among its more precise ones that keep the allocation within the target (none
fits: it stays).  Every draw therefore meets the target and spends most of it, as the LP does, so the band is a
fair "uninformed" reference at equal bits.
"""

from __future__ import annotations

import random as _random
from typing import Sequence

from ...formats.registry import NO_QUANT
from ..strategy import Allocation, BaselineStrategy, StudyContext, candidate_formats


def random_choices(groups, target: float, rng: _random.Random) -> dict[str, str]:
    chosen = {g.name: candidate_formats(g)[0] for g in groups}
    full = sum(g.candidate(NO_QUANT).cost for g in groups)
    spent = sum(g.candidate(chosen[g.name]).cost for g in groups)  # bits = spent / full * 16, as lm_achieved_bits
    order = list(groups)
    rng.shuffle(order)
    for group in order:
        formats = candidate_formats(group)
        here = group.candidate(chosen[group.name]).cost
        upgrades = [f for f in formats[formats.index(chosen[group.name]) + 1:]
                    if (spent - here + group.candidate(f).cost) / full * 16 <= target + 1e-9]
        if upgrades:
            chosen[group.name] = rng.choice(upgrades)
            spent += group.candidate(chosen[group.name]).cost - here
    return chosen


class RandomAllocation(BaselineStrategy):
    name = "random"

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
