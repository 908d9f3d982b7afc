"""FP8 E4M3 weights and activations, one static scale per tensor (ModelOpt ``FP8_DEFAULT_CFG``)."""

from ..spec import ExportAgreement, LogprobTolerance, OnDiskSpec, QuantFormat, VllmSupport

FORMAT = QuantFormat(
    name="fp8",
    modelopt_config="FP8_DEFAULT_CFG",
    export_quant_algo="FP8",
    needs_cuda=False,
    description="FP8 E4M3 weights and activations, per-tensor scales",
    bits=8.0,
    on_disk=OnDiskSpec(weight_dtypes=("F8_E4M3",), required=("weight_scale", "input_scale"),
                       scale_shapes=lambda rows, cols, group: {"weight_scale": (), "input_scale": ()}),
    vllm=VllmSupport(methods=("ModelOptLinearMethod", "ModelOptFp8LinearMethod"), weight_dtypes=("torch.float8_e4m3fn",),
                     cpu_kernels=True, cuda_kernels=True, in_mixed_precision=True,
                     # static activation scales calibrated on text only move image prompts most; greedy tokens flip
                     # only at near-ties
                     reference=LogprobTolerance(same_tokens=True, max_abs_logprob=0.25)),
    export_agreement=ExportAgreement(1.5, "the export divides the weight by its scale in BF16 before the E4M3 cast, where "
                                          "the fake quant divides once in float32: up to 12.5% of elements one step "
                                          "away (12 x 12.5%)"),
    color="#4e79a7",
    order=10,
)
