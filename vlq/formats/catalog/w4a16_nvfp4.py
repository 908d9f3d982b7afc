"""NVFP4 weights, BF16 activations (ModelOpt ``W4A16_NVFP4_CFG``)."""

from ..spec import LogprobTolerance, OnDiskSpec, QuantFormat, VllmSupport
from .nvfp4 import NVFP4_TIES

FORMAT = QuantFormat(
    name="w4a16_nvfp4",
    modelopt_config="W4A16_NVFP4_CFG",
    export_quant_algo="W4A16_NVFP4",
    needs_cuda=True,
    description="NVFP4 weights, BF16 activations",
    bits=4.5,
    on_disk=OnDiskSpec(weight_dtypes=("U8",), required=("weight_scale", "weight_scale_2")),
    vllm=VllmSupport(methods=("ModelOptLinearMethod", "ModelOptNvFp4LinearMethod"), weight_dtypes=("torch.uint8",),
                     cpu_kernels=False, cuda_kernels=True, in_mixed_precision=True,
                     reference=LogprobTolerance(same_tokens=False, max_abs_logprob=0.6)),
    export_agreement=NVFP4_TIES,
    color="#edc948",
    order=60,
    block_size=16,
)
