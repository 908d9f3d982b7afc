"""INT4 weights in blocks of 128 with AWQ smoothing, BF16 activations (ModelOpt ``INT4_AWQ_CFG``)."""

from ..spec import ExportAgreement, OnDiskSpec, QuantFormat


def int4_scale_shapes(rows: int, cols: int, group: int | None, *, fp8_second_level: bool = False):
    """Two INT4 values per byte along the output dimension: ``weight_scale`` [out, in/block]."""
    block = group or 128
    if cols % block:
        return None  # the block rule (vlq.formats.applicability) names it; no shape to expect
    shapes = {"weight_scale": (rows * 2, cols // block), "pre_quant_scale": (cols,)}
    if fp8_second_level:
        shapes.update(weight_scale_2=(), input_scale=())
    return shapes


FORMAT = QuantFormat(
    name="int4_awq",
    modelopt_config="INT4_AWQ_CFG",
    export_quant_algo="W4A16_AWQ",
    needs_cuda=False,
    description="INT4 weights in blocks of 128 (AWQ), BF16 activations",
    bits=4.0,
    on_disk=OnDiskSpec(weight_dtypes=("U8", "I8"), required=("weight_scale",), scale_shapes=int4_scale_shapes),
    export_agreement=ExportAgreement(0.25, "the export rounds folded smoothing scales to BF16, which the fake quant "
                                           "keeps in float32"),
    color="#e15759",
    order=20,
    folds_weights=True,
    block_size=128,
    out_multiple=2,
)
