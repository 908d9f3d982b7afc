"""MXFP8 weights and activations: E4M3 values in blocks of 32 with E8M0 (power-of-two) block scales
(ModelOpt ``MXFP8_DEFAULT_CFG``)."""

from ..spec import ExportAgreement, LogprobTolerance, OnDiskSpec, QuantFormat, VllmSupport

FORMAT = QuantFormat(
    name="mxfp8",
    modelopt_config="MXFP8_DEFAULT_CFG",
    export_quant_algo="MXFP8",
    needs_cuda=True,
    description="MXFP8 weights and activations, blocks of 32",
    bits=8.0,
    on_disk=OnDiskSpec(weight_dtypes=("F8_E4M3",), required=("weight_scale",)),
    # vLLM 0.32 routes MXFP8 inside MIXED_PRECISION too; vlq has not served such an export, so it stays refused
    vllm=VllmSupport(methods=("ModelOptLinearMethod", "ModelOptMxFp8LinearMethod"), weight_dtypes=("torch.float8_e4m3fn",),
                     cpu_kernels=False, cuda_kernels=True, in_mixed_precision=False,
                     reference=LogprobTolerance(same_tokens=True, max_abs_logprob=0.3)),
    export_agreement=ExportAgreement(0.5, "the same E8M0 scale rule on both sides; ties may round apart"),
    color="#b07aa1",
    order=70,
    block_size=32,
)
