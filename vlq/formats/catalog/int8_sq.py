"""INT8 SmoothQuant: per-channel INT8 weights, static per-tensor INT8 activations (ModelOpt ``INT8_SMOOTHQUANT_CFG``)."""

from ..spec import ExportAgreement, OnDiskSpec, QuantFormat

FORMAT = QuantFormat(
    name="int8_sq",
    modelopt_config="INT8_SMOOTHQUANT_CFG",
    export_quant_algo="W8A8_SQ_PER_CHANNEL",
    needs_cuda=False,
    description="INT8 SmoothQuant, per-channel weights",
    bits=8.0,
    on_disk=OnDiskSpec(weight_dtypes=("I8",), required=("weight_scale", "input_scale"),
                       scale_shapes=lambda rows, cols, group: {"weight_scale": (rows,), "input_scale": (), "pre_quant_scale": (cols,)}),
    export_agreement=ExportAgreement(0.5, "the export rounds folded smoothing scales to BF16, which the fake quant "
                                          "keeps in float32"),
    color="#76b7b2",
    order=40,
    folds_weights=True,
)
