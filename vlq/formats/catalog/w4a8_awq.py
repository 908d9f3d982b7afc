"""INT4 AWQ weights with a second FP8 level, FP8 activations (ModelOpt ``W4A8_AWQ_BETA_CFG``)."""

from ..spec import ExportAgreement, OnDiskSpec, QuantFormat
from .int4_awq import int4_scale_shapes

FORMAT = QuantFormat(
    name="w4a8_awq",
    modelopt_config="W4A8_AWQ_BETA_CFG",
    export_quant_algo="W4A8_AWQ",
    needs_cuda=False,
    description="INT4 AWQ weights, FP8 activations",
    bits=4.0,
    on_disk=OnDiskSpec(weight_dtypes=("U8", "I8"), required=("weight_scale", "weight_scale_2", "input_scale"),
                       scale_shapes=lambda rows, cols, group: int4_scale_shapes(rows, cols, group, fp8_second_level=True)),
    export_agreement=ExportAgreement(0.5, "the export rounds folded smoothing scales to BF16, which the fake quant "
                                          "keeps in float32"),
    color="#f28e2b",
    order=30,
    folds_weights=True,
    block_size=128,
    out_multiple=2,
)
