"""What each exported ``quant_algo`` holds on disk, as this dequantizer reads it, and how close its decoding
must come to ModelOpt's fake quant (the why of every bound; the measured shares are in reports/README.md).

These tables are the dequantizer's own on purpose: it checks exports independently of vlq's format registry
(a test holds :data:`SUPPORTED_ALGOS` equal to the registry's algos).

On-disk layouts (ModelOpt 0.47 unified HF export; ``W`` is the weight ``[out, in]``, scales float32 unless
said otherwise, names in hub layout ``model.layers.N...`` / ``visual...``):

=========================  ==================================================================  ===============================================
quant_algo                 tensors next to ``weight``                                           weight = ...
=========================  ==================================================================  ===============================================
FP8                        weight F8_E4M3 ``[out, in]``; weight_scale ``[]``; input_scale ``[]``  ``fp8 * weight_scale``
FP8_PER_CHANNEL_PER_TOKEN  weight F8_E4M3; weight_scale ``[out, 1]``; no input_scale (dynamic)  ``fp8 * weight_scale[row]``
FP8_PB_WO                  weight F8_E4M3; weight_scale ``[ceil(out/128), ceil(in/128)]``       ``fp8 * weight_scale[row // 128, col // 128]``
W4A16_AWQ                  weight U8 ``[out/2, in]``: two signed int4 of *rows* 2j (low nibble)  ``int4 * weight_scale[:, col // group]``
(vlq ``int4_awq``)         and 2j+1 (high); weight_scale ``[out, in/group]`` (= amax/7);
                           pre_quant_scale BF16 ``[in]`` (o_proj, down_proj only)
W4A8_AWQ                   as W4A16_AWQ plus weight_scale_2 ``[]`` (= amax/448) and input_scale  ``e4m3(bf16(int4*weight_scale)/ws2) * ws2``
W8A8_SQ_PER_CHANNEL        weight I8 ``[out, in]``; weight_scale ``[out]`` (= amax/127);           ``int8 * weight_scale[:, None]``
(vlq ``int8_sq``)          input_scale ``[]``; pre_quant_scale BF16 ``[in]`` on every layer
NVFP4                      weight U8 ``[out, in/2]``: two E2M1 codes of *columns* 2i (low) and    ``e2m1 * weight_scale[:, col // 16] * ws2``
                           2i+1 (high); weight_scale F8_E4M3 ``[out, in/16]``; weight_scale_2
                           ``[]`` (= amax/(6*448)); input_scale ``[]`` (same form)
W4A16_NVFP4                as NVFP4 without input_scale                                          as NVFP4
MXFP8                      weight F8_E4M3 ``[out, in]``; weight_scale U8 ``[out, in/32]`` (E8M0)  ``fp8 * 2**(weight_scale - 127)``
MIXED_PRECISION            ``quantized_layers`` names each layer's quant_algo (one of the above)  per layer
=========================  ==================================================================  ===============================================

Tolerances: the decoded weight ``b`` against the live model's fake-quantized weight ``a`` =
``module.weight_quantizer(module.weight)``, and :meth:`ActivationQuant.apply` against ``module.input_quantizer(x)``.
An element *agrees* when ``|a - b|`` is within one BF16 ulp.  ``off_grid_share`` bounds the share of elements
that do not agree, ``max_steps`` every difference in steps of the format's grid there.  Every disagreement is one
rounding decided the other way, so one step is the derived bound; each share bound is about twice the largest
share measured on the tiny model (CPU) and the 3B shape (H200).
"""

from __future__ import annotations

from dataclasses import dataclass


HF_QUANT_CONFIG = "hf_quant_config.json"

# Activation kinds (ActivationQuant.kind).
ACT_NONE = "none"
ACT_FP8 = "fp8_e4m3_per_tensor_static"
ACT_INT8 = "int8_per_tensor_static"
ACT_NVFP4 = "nvfp4_dynamic_block"
ACT_MXFP8 = "mxfp8_dynamic_block"
ACT_FP8_TOKEN = "fp8_e4m3_per_token_dynamic"
ACTIVATION_KINDS = (ACT_NONE, ACT_FP8, ACT_INT8, ACT_NVFP4, ACT_MXFP8, ACT_FP8_TOKEN)

# Tensors a quantized layer may carry besides ``weight``; everything else next to a quantized weight
# (except ``bias``) is refused, because the dequantizer would silently ignore it.
COMPANIONS = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
KV_SCALES = ("k_scale", "v_scale")


@dataclass(frozen=True)
class AlgoSpec:
    weight_dtype: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    activation: str
    weight_block: int | None  # fixed block of the weight scales (None: per-tensor/channel or from group_size)


SPECS: dict[str, AlgoSpec] = {
    "FP8": AlgoSpec("F8_E4M3", ("weight_scale", "input_scale"), (), ACT_FP8, None),
    "W4A16_AWQ": AlgoSpec("U8", ("weight_scale",), ("pre_quant_scale",), ACT_NONE, None),
    "W4A8_AWQ": AlgoSpec("U8", ("weight_scale", "weight_scale_2", "input_scale"), ("pre_quant_scale",), ACT_FP8, None),
    "W8A8_SQ_PER_CHANNEL": AlgoSpec("I8", ("weight_scale", "input_scale"), ("pre_quant_scale",), ACT_INT8, None),
    "NVFP4": AlgoSpec("U8", ("weight_scale", "weight_scale_2", "input_scale"), (), ACT_NVFP4, 16),
    "W4A16_NVFP4": AlgoSpec("U8", ("weight_scale", "weight_scale_2"), (), ACT_NONE, 16),
    "MXFP8": AlgoSpec("F8_E4M3", ("weight_scale",), (), ACT_MXFP8, 32),
    "FP8_PER_CHANNEL_PER_TOKEN": AlgoSpec("F8_E4M3", ("weight_scale",), (), ACT_FP8_TOKEN, None),
    "fp8_pb_wo": AlgoSpec("F8_E4M3", ("weight_scale",), (), ACT_NONE, 128),  # ModelOpt 0.47 writes it lowercase
}
SUPPORTED_ALGOS = tuple(SPECS)
QUANTIZED_DTYPES = frozenset({"F8_E4M3", "U8", "I8"})


@dataclass(frozen=True)
class Tolerance:
    """How far a dequantized weight may sit from the fake-quantized one (see the module docstring)."""

    off_grid_share: float  # largest share of elements that may differ by more than one BF16 ulp
    max_steps: float  # largest difference of any element, in steps of the format's grid there
    why: str


_DOUBLE_ROUNDING = "export divides in BF16 by a 0-dim scale, then casts to E4M3: ties at E4M3 midpoints go to even"
_QUOTIENT_ULP = "w/(amax/q) vs w*(q/amax): float32 quotients an ulp apart move .5 ties only"
_TRITON_DIV = "ModelOpt's Triton fake quant divides approximately: exact ties round down there, to even here"
WEIGHT_TOLERANCES: dict[str, Tolerance] = {
    "FP8": Tolerance(0.125, 1.0, _DOUBLE_ROUNDING),
    "W4A16_AWQ": Tolerance(0.001, 1.0, _QUOTIENT_ULP),
    "W4A8_AWQ": Tolerance(0.001, 1.0, _QUOTIENT_ULP + "; then the same BF16 -> E4M3 rounding on both sides"),
    "W8A8_SQ_PER_CHANNEL": Tolerance(0.001, 1.0, _QUOTIENT_ULP),
    "NVFP4": Tolerance(0.02, 1.0, _TRITON_DIV),
    "W4A16_NVFP4": Tolerance(0.02, 1.0, _TRITON_DIV),
    "MXFP8": Tolerance(0.001, 1.0, "same E8M0 scale rule"),
    "FP8_PER_CHANNEL_PER_TOKEN": Tolerance(0.125, 1.0, _DOUBLE_ROUNDING.replace("a 0-dim scale", "its row's scale")),
    "fp8_pb_wo": Tolerance(0.125, 1.0, _DOUBLE_ROUNDING.replace("a 0-dim scale", "its block's scale")),
}
_AMAX_ULP = "input_scale*maxbound can miss ModelOpt's float32 amax by an ulp, which moves ties"
ACTIVATION_TOLERANCES: dict[str, Tolerance] = {
    ACT_NONE: Tolerance(0.0, 0.0, "pre_quant_scale only, multiplied in the input dtype as ModelOpt does"),
    ACT_FP8: Tolerance(0.05, 1.0, _AMAX_ULP),
    ACT_INT8: Tolerance(0.01, 1.0, _AMAX_ULP),
    ACT_NVFP4: Tolerance(0.02, 1.0, _TRITON_DIV),
    ACT_MXFP8: Tolerance(0.001, 1.0, "same E8M0 scale rule"),
    ACT_FP8_TOKEN: Tolerance(0.001, 1.0, "the same float32 row amax and multiply on both sides"),
}
