"""NVFP4 weights and activations: E2M1 values in blocks of 16 with E4M3 block scales (ModelOpt ``NVFP4_DEFAULT_CFG``)."""

from ..spec import ExportAgreement, LogprobTolerance, OnDiskSpec, QuantFormat, VllmSupport

#: NVFP4's export agreement: ModelOpt's Triton fake quant divides approximately, the export exactly, so exact
#: ties round differently (up to 2% of elements one step away: 12 x 2% = 0.24, with margin).
NVFP4_TIES = ExportAgreement(0.5, "ModelOpt's Triton fake quant divides approximately, the export exactly: exact ties "
                                  "round one step apart")

FORMAT = QuantFormat(
    name="nvfp4",
    modelopt_config="NVFP4_DEFAULT_CFG",
    export_quant_algo="NVFP4",
    needs_cuda=True,
    description="NVFP4 weights and activations, blocks of 16",
    bits=4.5,
    # the layout of an export made on CUDA is not pinned on CPU: no scale shapes to expect
    on_disk=OnDiskSpec(weight_dtypes=("U8",), required=("weight_scale", "weight_scale_2", "input_scale")),
    vllm=VllmSupport(methods=("ModelOptLinearMethod", "ModelOptNvFp4LinearMethod"), weight_dtypes=("torch.uint8",),
                     cpu_kernels=False, cuda_kernels=True, in_mixed_precision=True,
                     reference=LogprobTolerance(same_tokens=False, max_abs_logprob=0.6)),  # 4 bits may flip tokens
    export_agreement=NVFP4_TIES,
    color="#59a14f",
    order=50,
    block_size=16,
)
