"""Stage 3b — which candidate formats can apply to which language-model layers, from shapes alone.

Block formats quantize weights in blocks of input features (INT4 AWQ / W4A8 AWQ: 128, NVFP4: 16,
MXFP8: 32, :attr:`vlq.formats.spec.QuantFormat.block_size`), and INT4 packs two output channels per byte.
ModelOpt fake-quantizes a partial block during the search without complaint, then its export refuses
to pack it ("Cannot pack weight with input dimension 192 and block size 128: partial blocks are not
supported"), and vLLM's NVFP4/MXFP8 kernels refuse such layers at load.  So before any search,
:func:`plan_formats` checks every LM linear against every candidate format, per decision group
(q/k/v and gate/up share one format, so a format applies to a group only if it applies to every
member):

* a format that does not fit a group is removed from that group's candidates (ModelOpt's
  ``module_search_spaces``), and the manifest records it with the reason (:class:`FormatExclusion`);
* a group no candidate fits is searched as BF16 only (``disabled_layers``);
* the scheme is refused up front, naming the layers, when a format fits no layer at all or the bit
  target cannot be reached without the removed candidates.

Pure arithmetic over :class:`LayerShape`: no torch, testable for every format (CUDA-only ones too) on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..runtime.errors import SchemeError
from .registry import FORMATS, fused_group_key
from .spec import QuantFormat

if TYPE_CHECKING:
    from ..search.scheme import Scheme

#: Layers listed by name in a refusal before "... and N more".
SHOWN_LAYERS = 6


@dataclass(frozen=True)
class LayerShape:
    """One linear layer of the language model: full-VLM name, input and output features."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class FormatExclusion:
    """A candidate format removed from one decision group before the search, and why."""

    group: str  # the group's first member (full-VLM name), as the manifest names groups
    members: tuple[str, ...]
    format: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "members": list(self.members), "format": self.format, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FormatExclusion":
        return cls(data["group"], tuple(data["members"]), data["format"], data["reason"])


def shape_problem(fmt: QuantFormat, layer: LayerShape) -> str | None:
    """Why ``fmt`` cannot quantize ``layer`` (one clause naming the numbers), or None when it can."""
    if fmt.block_size and layer.in_features % fmt.block_size:
        return (f"{fmt.name} quantizes in blocks of {fmt.block_size} input features and {layer.name} has {layer.in_features} "
                f"({layer.in_features} % {fmt.block_size} = {layer.in_features % fmt.block_size}); partial blocks cannot be "
                "exported or served")
    if fmt.out_multiple > 1 and layer.out_features % fmt.out_multiple:
        return (f"{fmt.name} packs {fmt.out_multiple} output channels per byte and {layer.name} has {layer.out_features} "
                "output features")
    return None


@dataclass(frozen=True)
class FormatPlan:
    """Every decision group's candidate formats after the shape rules, and what was removed."""

    formats: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]  # members (full-VLM names) of each decision group
    allowed: tuple[tuple[str, ...], ...]  # per group, the candidate formats that fit every member
    weights: tuple[int, ...]  # per group, weight elements (AutoQuant's cost is proportional to them)
    exclusions: tuple[FormatExclusion, ...]

    @property
    def restricted(self) -> bool:
        return bool(self.exclusions)

    def minimum_bits(self) -> float:
        """The lowest effective bits over the LM reachable with the remaining candidates."""
        total = sum(self.weights)
        if not total:
            return 16.0
        bits = sum(w * min((FORMATS[f].bits for f in allowed), default=16.0) for w, allowed in zip(self.weights, self.allowed))
        return bits / total

    def unfit_everywhere(self) -> list[str]:
        """Candidate formats that fit no group at all."""
        return [f for f in self.formats if not any(f in allowed for allowed in self.allowed)]

    def require(self, scheme: Scheme) -> "FormatPlan":
        """Refuse the scheme when a format fits no layer, or its target needs the removed candidates."""
        for fmt in self.unfit_everywhere():
            reasons = [e.reason for e in self.exclusions if e.format == fmt]
            raise SchemeError(
                f"Format {fmt} fits none of the language model's {len(self.groups)} decision groups: {reasons[0]}"
                + (f" (and {len(reasons) - 1} more groups)" if len(reasons) > 1 else "")
                + f". Drop {fmt} from --formats (keep {'+'.join(f for f in self.formats if f != fmt) or 'another format'})."
            )
        minimum = self.minimum_bits()
        if scheme.target_bits < minimum - 1e-9:
            layers = [e.group for e in self.exclusions]
            shown = ", ".join(layers[:SHOWN_LAYERS]) + (f" ... and {len(layers) - SHOWN_LAYERS} more" if len(layers) > SHOWN_LAYERS else "")
            raise SchemeError(
                f"target_bits={scheme.target_bits:g} is infeasible for this model: {len(layers)} decision groups cannot use "
                f"{', '.join(sorted({e.format for e in self.exclusions}))} ({self.exclusions[0].reason}; groups: {shown}), so the "
                f"minimum over the language model is {minimum:.4f}. Raise --bits to at least {minimum:.4f}."
            )
        return self

    def search_spaces(self, searched_name) -> tuple[list[dict[str, Any]], list[str]]:
        """ModelOpt ``module_search_spaces`` entries for the restricted groups, and the members of groups
        no format fits (for ``disabled_layers``); ``searched_name`` maps full-VLM names to searched-model names."""
        spaces, disabled = [], []
        for members, allowed in zip(self.groups, self.allowed):
            if tuple(allowed) == tuple(self.formats):
                continue
            names = [searched_name(m) for m in members]
            if allowed:
                spaces.append({"module_name_patterns": names,
                               "quantization_formats": [FORMATS[f].modelopt_config for f in allowed]})
            else:
                disabled += names
        return spaces, disabled

    def summary(self) -> str:
        """One line for the terminal: what was removed where."""
        by_format: dict[str, int] = {}
        for e in self.exclusions:
            by_format[e.format] = by_format.get(e.format, 0) + 1
        return "; ".join(f"{fmt} removed from {n} of {len(self.groups)} decision groups (layer sizes outside its blocks)"
                         for fmt, n in sorted(by_format.items()))


def plan_formats(formats: Sequence[str], layers: Iterable[LayerShape], group_of) -> FormatPlan:
    """Check every candidate format against every layer; ``group_of(name)`` gives a layer's decision group key."""
    fmts = [FORMATS[f] for f in formats]
    grouped: dict[str, list[LayerShape]] = {}
    for layer in layers:
        grouped.setdefault(group_of(layer.name), []).append(layer)
    groups, allowed, weights, exclusions = [], [], [], []
    for members in grouped.values():
        names = tuple(m.name for m in members)
        fits = []
        for fmt in fmts:
            problem = next((p for p in (shape_problem(fmt, m) for m in members) if p), None)
            if problem is None:
                fits.append(fmt.name)
            else:
                exclusions.append(FormatExclusion(names[0], names, fmt.name, problem))
        groups.append(names)
        allowed.append(tuple(fits))
        weights.append(sum(m.in_features * m.out_features for m in members))
    return FormatPlan(tuple(formats), tuple(groups), tuple(allowed), tuple(weights), tuple(exclusions))


def lm_layer_shapes(loaded) -> list[LayerShape]:
    """Shapes of the language model's linears (full-VLM names) of a loaded model."""
    modules = dict(loaded.vlm.named_modules())
    return [LayerShape(name, int(modules[name].in_features), int(modules[name].out_features)) for name in loaded.lm_module_names()]


# ------------------------------------------------------------------------------------------------
# From config.json alone: refuse before anything heavy is imported
# ------------------------------------------------------------------------------------------------

def text_head_dim(config: Mapping[str, Any]) -> int:
    """The language model's attention head size in a Qwen2.5-VL ``config.json``."""
    text = config.get("text_config") or config
    return int(text.get("head_dim") or int(text["hidden_size"]) // int(text["num_attention_heads"]))


def lm_shapes_from_config(config: Mapping[str, Any], lm_path: str = "model.language_model") -> list[LayerShape]:
    """The language model's linear shapes of a Qwen2.5-VL ``config.json`` (q/k/v, o, gate/up, down per layer)."""
    text = config.get("text_config") or config
    hidden, inter = int(text["hidden_size"]), int(text["intermediate_size"])
    heads = int(text["num_attention_heads"])
    kv = int(text.get("num_key_value_heads") or heads)
    head_dim = text_head_dim(config)
    shapes = []
    for i in range(int(text["num_hidden_layers"])):
        p = f"{lm_path}.layers.{i}"
        shapes += [LayerShape(f"{p}.self_attn.q_proj", hidden, heads * head_dim), LayerShape(f"{p}.self_attn.k_proj", hidden, kv * head_dim),
                   LayerShape(f"{p}.self_attn.v_proj", hidden, kv * head_dim), LayerShape(f"{p}.self_attn.o_proj", heads * head_dim, hidden),
                   LayerShape(f"{p}.mlp.gate_proj", hidden, inter), LayerShape(f"{p}.mlp.up_proj", hidden, inter),
                   LayerShape(f"{p}.mlp.down_proj", inter, hidden)]
    return shapes


def require_fits_config(config_file, scheme: Scheme) -> FormatPlan | None:
    """Refuse ``scheme`` for the checkpoint whose ``config.json`` is ``config_file`` (see :meth:`FormatPlan.require`);
    None when the config does not describe the shapes (the search plans from the loaded model then)."""
    import json
    from pathlib import Path

    try:
        shapes = lm_shapes_from_config(json.loads(Path(config_file).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return plan_formats(scheme.formats, shapes, fused_group_key).require(scheme)
