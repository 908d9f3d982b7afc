"""Where each part of a Qwen2.5-VL goes when one device cannot hold the search: a ``device_map``.

Decoder layers are split into contiguous runs, one per device, sized by what each device can hold
(weights plus their share of ModelOpt's search state, from :mod:`vlq.search.plan`); the vision tower, the
embeddings and the rotary tables sit on the first device (where the inputs arrive, so image features
never cross devices before they are merged); the final norm and ``lm_head`` on the last (its logits and
their loss are the biggest activations) — unless ``lm_head`` is tied to the embeddings, which keeps it on
the first.  On one device the map is ``{"": device}``: a no-op.

Light (no torch): the CLI shows the placement before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ..runtime.errors import ResourceError
from .plan import BF16, SEARCH_STATE_PER_LM_BYTE, ModelShape

VISION = "model.visual"
LM = "model.language_model"


@dataclass(frozen=True)
class Placement:
    """A ``device_map`` for ``from_pretrained`` / ``accelerate.dispatch_model`` and what it puts where."""

    device_map: Mapping[str, str]
    layers_per_device: tuple[int, ...]
    planned_bytes: tuple[int, ...]  # weights + search state per device

    @property
    def devices(self) -> tuple[str, ...]:
        seen: list[str] = []
        for device in self.device_map.values():
            if device not in seen:
                seen.append(device)
        return tuple(seen)

    @property
    def split(self) -> bool:
        return len(self.devices) > 1


def _layer_bytes(shape: ModelShape) -> int:
    per_layer_linear = shape.lm_linear_params // shape.layers
    return int(BF16 * per_layer_linear * (1 + SEARCH_STATE_PER_LM_BYTE))


def place(shape: ModelShape, devices: Sequence[str], *, budget_bytes: int | None = None) -> Placement:
    """Split ``shape`` over ``devices`` (in order); with ``budget_bytes`` per device, refuse a split that cannot fit.

    The layers are balanced so every device holds about the same bytes; a device the balance would push over
    ``budget_bytes`` gets fewer layers, and a model that cannot fit at all is refused.
    """
    if not devices:
        raise ResourceError("No device to place the model on; pass at least one (e.g. cuda:0).")
    if len(devices) == 1:
        return Placement({"": devices[0]}, (shape.layers,), (BF16 * shape.total_params,))
    layer = _layer_bytes(shape)
    first_fixed = BF16 * (shape.vision_params + shape.vocab * shape.hidden * (2 if shape.tied_lm_head else 1))
    last_fixed = 0 if shape.tied_lm_head else BF16 * shape.vocab * shape.hidden
    fixed = [0] * len(devices)
    fixed[0] += first_fixed
    fixed[-1] += last_fixed
    # balanced: every device about the same bytes (room left everywhere for activations) ...
    share = -(-(sum(fixed) + layer * shape.layers) // len(devices))
    room = [max(0, share - f) // layer for f in fixed]
    while sum(room) < shape.layers:  # rounding: spread the remainder
        room[sum(room) % len(room)] += 1
    if budget_bytes is not None and any(f + r * layer > budget_bytes for f, r in zip(fixed, room)):
        # ... unless a device's fixed part (vision, embeddings, lm_head) unbalances it: fill up to the budget
        room = [max(0, budget_bytes - f) // layer for f in fixed]
        if sum(room) < shape.layers:
            raise ResourceError(f"{shape.name} does not fit {len(devices)} devices of {budget_bytes / 2**30:.0f} GiB: "
                                f"room for {sum(room)} of {shape.layers} decoder layers; use more devices.")
    counts, left = [], shape.layers
    for i, r in enumerate(room):
        take = min(r, left) if i < len(room) - 1 else left
        counts.append(take)
        left -= take
    device_map: dict[str, str] = {f"{VISION}": devices[0], f"{LM}.embed_tokens": devices[0],
                                  f"{LM}.rotary_emb": devices[0]}
    index = 0
    for device, count in zip(devices, counts):
        for _ in range(count):
            device_map[f"{LM}.layers.{index}"] = device
            index += 1
    device_map[f"{LM}.norm"] = devices[-1]
    device_map["lm_head"] = devices[0] if shape.tied_lm_head else devices[-1]
    planned = tuple(f + c * layer for f, c in zip(fixed, counts))
    return Placement(device_map, tuple(counts), planned)
