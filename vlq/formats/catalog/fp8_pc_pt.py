"""FP8 E4M3 weights with one static scale per output channel, activations quantized per token at run time
(ModelOpt ``FP8_PER_CHANNEL_PER_TOKEN_CFG``)."""

from ..spec import ExportAgreement, LogprobTolerance, OnDiskSpec, QuantFormat, VllmSupport

FORMAT = QuantFormat(
    name="fp8_pc_pt",
    modelopt_config="FP8_PER_CHANNEL_PER_TOKEN_CFG",
    export_quant_algo="FP8_PER_CHANNEL_PER_TOKEN",
    needs_cuda=False,
    description="FP8 E4M3 weights per output channel, activations per token (dynamic)",
    bits=8.0,
    # no input_scale: each token's scale is computed at run time
    on_disk=OnDiskSpec(weight_dtypes=("F8_E4M3",), required=("weight_scale",),
                       scale_shapes=lambda rows, cols, group: {"weight_scale": (rows,)}),
    vllm=VllmSupport(methods=("ModelOptLinearMethod",), weight_dtypes=("torch.float8_e4m3fn",),
                     cpu_kernels=True, cuda_kernels=True, in_mixed_precision=True,
                     # per-token scales follow each row's range: closer to BF16 than per-tensor FP8
                     reference=LogprobTolerance(same_tokens=True, max_abs_logprob=0.25)),
    export_agreement=ExportAgreement(1.5, "the export divides each row by its scale in BF16 before the E4M3 cast, "
                                          "where the fake quant divides once in float32: elements at E4M3 midpoints "
                                          "land one step away, as for per-tensor FP8"),
    color="#2f5d8a",
    order=12,
)
