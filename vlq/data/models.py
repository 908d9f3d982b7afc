"""Stage 1 — load a Qwen2.5-VL and take it apart into the pieces the search needs.

One code path serves three sources:

* a local Hugging Face checkpoint folder (what real users pass);
* ``qwen2.5-vl-3b-random``: the published Qwen2.5-VL-3B architecture with random weights, for
  full-size work on a GPU without downloading weights;
* ``tiny``: a small synthetic Qwen2.5-VL (the real ``Qwen2_5_VLForConditionalGeneration`` class)
  with an offline-built tokenizer and image processor, saved with ``save_pretrained`` and loaded
  back through the local-folder path, exactly like a user's checkpoint.

No hub access happens here: every load passes ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime import compat as _compat
from ..runtime.errors import ModelSourceError
from .qwen import QWEN_CHAT_TEMPLATE
from .shipped import TINY_TRAINED_DIR
from .tiny import tiny_checkpoint_path
from ..inputs.requests import QWEN25_VL_3B_RANDOM, RANDOM_SHAPES, TINY, TINY_TRAINED, random_shape_config, validate_checkpoint_dir

_compat.apply_torchvision_schema_shim()


@dataclass(frozen=True)
class VisionInventory:
    """What the vision tower is made of, and a fingerprint of its weights as loaded.

    ``root`` is the vision tower's module name in the VLM (``model.visual``); ``linear_names``
    lists its linear layers; ``fingerprint`` hashes every vision parameter's bytes so a later
    check can prove the tower was not changed.
    """

    root: str
    module_names: tuple[str, ...]
    linear_names: tuple[str, ...]
    num_parameters: int
    dtypes: tuple[str, ...]
    fingerprint: str


@dataclass
class LoadedVLM:
    """A loaded Qwen2.5-VL and its parts.

    ``language_model`` is the extracted text model (``Qwen2_5_VLTextModel``), which returns hidden
    states only; logits need the parent's ``lm_head``.  ``lm_path`` is its module name inside
    ``vlm`` so names found in the extracted model can be mapped back to the full model.
    """

    vlm: nn.Module
    language_model: nn.Module
    lm_head: nn.Module
    lm_path: str
    vision: VisionInventory
    source: str
    path: Path | None
    tokenizer: Any = None
    processor: Any = None
    tied_lm_head: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self):
        return self.vlm.config

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def lm_module_names(self) -> list[str]:
        """Full-model names of the language model's linear layers (the searchable set)."""
        return [
            f"{self.lm_path}.{name}"
            for name, module in self.language_model.named_modules()
            if isinstance(module, nn.Linear)  # ModelOpt's QuantLinear subclasses nn.Linear
        ]


# --------------------------------------------------------------------------------------------
# Inventory helpers
# --------------------------------------------------------------------------------------------


def vision_tower_root(vlm: nn.Module) -> str:
    """Name of the vision tower inside the VLM (``model.visual`` for transformers 5.x)."""
    for name, _module in vlm.named_modules():
        if name.endswith("visual") and name.count(".") <= 1:
            return name
    raise ModelSourceError(
        "No vision tower found: expected a module named 'model.visual' in a "
        f"Qwen2_5_VLForConditionalGeneration, got top-level modules {[n for n, _ in vlm.named_children()]}."
    )


def fingerprint_parameters(module: nn.Module) -> str:
    """A SHA-256 over every parameter's name, dtype, shape and bytes (device-independent)."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        tensor = param.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.is_meta:  # shape-only models (tests of the 3B architecture) have no bytes
            continue
        digest.update(tensor.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def inventory_vision(vlm: nn.Module) -> VisionInventory:
    root = vision_tower_root(vlm)
    tower = vlm.get_submodule(root)
    module_names = tuple(f"{root}.{n}" if n else root for n, _ in tower.named_modules())
    linear_names = tuple(
        f"{root}.{n}" for n, m in tower.named_modules() if isinstance(m, nn.Linear)
    )
    params = list(tower.parameters())
    return VisionInventory(
        root=root,
        module_names=module_names,
        linear_names=linear_names,
        num_parameters=sum(p.numel() for p in params),
        dtypes=tuple(sorted({str(p.dtype) for p in params})),
        fingerprint=fingerprint_parameters(tower),
    )


def extract_language_model(vlm: nn.Module) -> tuple[nn.Module, str]:
    """The text model of a VLM through ModelOpt's own lineage helper, and its module name."""
    from modelopt.torch.export.model_utils import get_language_model_from_vl

    lineage = get_language_model_from_vl(vlm)
    if not lineage:
        raise ModelSourceError(
            f"ModelOpt's get_language_model_from_vl found no language model in {type(vlm).__name__}; "
            "vlq needs a vision-language model whose text model it can extract."
        )
    language_model = lineage[-1]
    for name, module in vlm.named_modules():
        if module is language_model:
            return language_model, name
    raise ModelSourceError("The extracted language model is not a submodule of the VLM.")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        raise ModelSourceError(f"Unknown dtype {dtype!r}; use one of {sorted(table)}.")
    return table[dtype]


def _finish(vlm: nn.Module, source: str, path: Path | None, tokenizer=None, processor=None) -> LoadedVLM:
    vlm.eval()
    language_model, lm_path = extract_language_model(vlm)
    lm_head = vlm.get_output_embeddings()
    embed = language_model.get_input_embeddings()
    return LoadedVLM(
        vlm=vlm,
        language_model=language_model,
        lm_head=lm_head,
        lm_path=lm_path,
        vision=inventory_vision(vlm),
        source=source,
        path=path,
        tokenizer=tokenizer,
        processor=processor,
        tied_lm_head=lm_head.weight is embed.weight,
    )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    with_processor: bool = True,
    device_map: dict[str, str] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedVLM:
    """Load a local Qwen2.5-VL checkpoint folder (never the hub); split over devices with ``device_map``
    (:func:`vlq.search.placement.place`; accelerate's hooks move activations between the parts)."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = Path(path).expanduser().resolve()
    validate_checkpoint_dir(path)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path,
        dtype=_dtype(dtype),
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        device_map=dict(device_map) if device_map else ({"": str(device)} if str(device) != "cpu" else None),
        offload_folder=str(offload_folder) if offload_folder else None,
    )
    tokenizer = processor = None
    if with_processor:
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
            tokenizer = processor.tokenizer
        except (OSError, ValueError, TypeError, KeyError):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    template = use_chat_template_fallback(processor, tokenizer)
    source = str(path)
    if (path / "vlq_tiny.json").exists():
        source = TINY
    loaded = _finish(vlm, source, path, tokenizer, processor)
    loaded.info["chat_template"] = template
    return loaded


def use_chat_template_fallback(processor, tokenizer) -> str:
    """Give a processor without a chat template of its own the tokenizer's (older checkpoints keep it only in
    tokenizer_config.json), else vlq's Qwen2.5-VL template; returns where the template came from."""
    from ..inputs.prerequisites import TEMPLATE_BUILT_IN, TEMPLATE_PROCESSOR, TEMPLATE_TOKENIZER

    if processor is None and tokenizer is None:
        return TEMPLATE_BUILT_IN
    if getattr(processor, "chat_template", None):
        return TEMPLATE_PROCESSOR
    own = getattr(tokenizer, "chat_template", None)
    if processor is not None:
        processor.chat_template = own or QWEN_CHAT_TEMPLATE
    if tokenizer is not None and not own:
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return TEMPLATE_TOKENIZER if own else TEMPLATE_BUILT_IN


def build_3b_random(
    *, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu", seed: int = 0
) -> LoadedVLM:
    """The published Qwen2.5-VL-3B architecture with random weights, built directly on ``device``."""
    return build_random_shape(QWEN25_VL_3B_RANDOM, dtype=dtype, device=device, seed=seed)


def build_random_shape(
    name: str, *, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu", seed: int = 0
) -> LoadedVLM:
    """A published Qwen2.5-VL shape (``qwen2.5-vl-{3b,7b,32b,72b}-random``) with random weights, built
    directly on ``device`` (no host copy: 32B is 67 GB of bf16)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(**random_shape_config(name))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(_dtype(dtype))
    try:
        with torch.device(device):
            vlm = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return _finish(to_dtype_like_from_pretrained(vlm, _dtype(dtype)), name, None)


def to_dtype_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, except the float32 buffers that are not saved (rotary ``inv_freq``, text and
    vision), which ``from_pretrained`` leaves in float32 as the model computed them.

    Cast to bf16, RoPE's cos/sin moved by up to 0.58 at 512 positions (3B, H200): a random-shape model then
    disagreed with the same weights rebuilt from its checkpoint (KLD 0.057 on random 3B weights with every
    quantized linear equal) and with how a real checkpoint runs in transformers and vLLM.
    """
    kept = {(module, name): buffer for module in model.modules() for name, buffer in module._buffers.items()
            if buffer is not None and name in module._non_persistent_buffers_set and buffer.dtype == torch.float32}
    model = model.to(dtype)
    for (module, name), buffer in kept.items():
        module._buffers[name] = buffer
    return model


def load_vlm(
    source: str | os.PathLike = TINY,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    device_map: dict[str, str] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedVLM:
    """Load a Qwen2.5-VL from a local folder, ``'tiny'``, ``'tiny-trained'`` or a ``'qwen2.5-vl-*-random'`` shape."""
    if str(device).startswith("cuda"):
        from ..runtime.hardware import use_extension_cache

        use_extension_cache()  # before ModelOpt first builds or loads its CUDA extensions
    split = dict(device_map=device_map, offload_folder=offload_folder) if device_map and len(set(device_map.values())) > 1 else {}
    if str(source) == TINY:
        return load_checkpoint(tiny_checkpoint_path(cache_dir), dtype=dtype, device=device, **split)
    if str(source) == TINY_TRAINED:  # shipped weights (vlq.data.training); loaded like a user's checkpoint
        loaded = load_checkpoint(TINY_TRAINED_DIR, dtype=dtype, device=device, **split)
        loaded.source = TINY_TRAINED
        return loaded
    if str(source) in RANDOM_SHAPES:
        if not split:
            return build_random_shape(str(source), dtype=dtype, device=device)
        # random weights have no files to load part by part: built in host memory, then dispatched
        from accelerate import dispatch_model

        loaded = build_random_shape(str(source), dtype=dtype, device="cpu")
        dispatch_model(loaded.vlm, device_map=dict(device_map), offload_dir=str(offload_folder) if offload_folder else None)
        return _finish(loaded.vlm, str(source), None)
    return load_checkpoint(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code, **split)
