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
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _compat
from .errors import ModelSourceError
from .cache import default_cache_dir
from .inputs import (
    QWEN25_VL_3B_RANDOM,
    RANDOM_SHAPES,
    TINY,
    TINY_TRAINED,
    random_shape_config,
    validate_checkpoint_dir,
)

_compat.apply_torchvision_schema_shim()

DATA_DIR = Path(__file__).resolve().parent / "data"
QWEN25_VL_3B_CONFIG = DATA_DIR / "qwen2_5_vl_3b_config.json"
CALIBRATION_CORPUS = DATA_DIR / "calibration_corpus.txt"
#: The tiny model with learned weights (model source ``tiny-trained``), written by scripts/train_tiny.py.
TINY_TRAINED_DIR = DATA_DIR / "tiny_trained"


#: Bump when the tiny model's recipe changes so cached builds are not reused.
TINY_RECIPE_VERSION = 1
TINY_SEED = 0

# Qwen's chat and vision markers; the tiny tokenizer carries them so the real processor works.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VOCAB_SIZE = 1024
TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    # head_dim 64 -> mrope sections must sum to 32, same proportions as the 3B model
    "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
}
TINY_VISION_CONFIG: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 4,
    "out_hidden_size": 256,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
}
# 56x56 .. 112x112 pixels: an image becomes 4..16 merged visual tokens.
TINY_IMAGE_MIN_PIXELS = 56 * 56
TINY_IMAGE_MAX_PIXELS = 112 * 112


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
# The tiny synthetic model
# --------------------------------------------------------------------------------------------


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained offline on the shipped corpus, with Qwen's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - 24,  # leaves room below the model's vocab for specials
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CALIBRATION_CORPUS.read_text().splitlines()
    bpe.train_from_iterator(lines, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=TINY_TEXT_CONFIG["max_position_embeddings"],
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_tiny_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    geometry = dict(
        min_pixels=TINY_IMAGE_MIN_PIXELS,
        max_pixels=TINY_IMAGE_MAX_PIXELS,
        patch_size=TINY_VISION_CONFIG["patch_size"],
        temporal_patch_size=TINY_VISION_CONFIG["temporal_patch_size"],
        merge_size=TINY_VISION_CONFIG["spatial_merge_size"],
    )
    image_processor = Qwen2VLImageProcessor(**geometry)
    try:  # transformers 5 refuses a Qwen2.5-VL processor without a video processor
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(**geometry)
    except (ImportError, ValueError, TypeError):
        video_processor = None
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def odd_text_shape(hidden_size: int, intermediate_size: int, *, num_hidden_layers: int = TINY_TEXT_CONFIG["num_hidden_layers"],
                   num_attention_heads: int = TINY_TEXT_CONFIG["num_attention_heads"]) -> dict[str, Any]:
    """Text-config overrides for a tiny model of other LM shapes (layer sizes outside a format's blocks).

    The mrope sections are rescaled to the head size (they must sum to ``head_dim / 2``).
    """
    if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 2:
        raise ModelSourceError(f"hidden_size {hidden_size} must split into {num_attention_heads} heads of an even size.")
    half = hidden_size // num_attention_heads // 2
    side = half * 3 // 8
    return {"hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads, "num_key_value_heads": min(2, num_attention_heads),
            "rope_scaling": {"type": "mrope", "mrope_section": [half - 2 * side, side, side]}}


def tiny_config(tokenizer, text_overrides: dict[str, Any] | None = None, *, tie_word_embeddings: bool = True):
    from transformers import Qwen2_5_VLConfig

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    text = {**TINY_TEXT_CONFIG, **(text_overrides or {})}
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    text["pad_token_id"] = ids["<|endoftext|>"]
    # the merger projects vision features to the LM's hidden size
    vision = {**TINY_VISION_CONFIG, "out_hidden_size": text["hidden_size"]}
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,  # True like the 3B model, so tied-lm_head handling is exercised
    )
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    return config


def _init_weights_deterministically(model: nn.Module, seed: int) -> None:
    """Weights drawn from one seeded generator in parameter order: same bytes on every machine."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif param.dim() == 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            else:
                fan_in = int(torch.tensor(param.shape[1:]).prod())
                std = 1.0 / (fan_in**0.5)
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def build_tiny_checkpoint(dest: str | os.PathLike, seed: int = TINY_SEED, *, text_overrides: dict[str, Any] | None = None,
                          tie_word_embeddings: bool = True) -> Path:
    """Build the tiny Qwen2.5-VL and save it (model, tokenizer, processor) to ``dest``.

    ``text_overrides`` changes the language model's shape (:func:`odd_text_shape`), and
    ``tie_word_embeddings=False`` gives it its own ``lm_head``.  The folder appears complete or not at
    all: everything is written to a sibling temporary folder and renamed into place.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ModelSourceError(f"Refusing to build the tiny model into non-empty folder {dest}.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer)
    config = tiny_config(tokenizer, text_overrides, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _init_weights_deterministically(model, seed)
    model = model.to(torch.bfloat16).eval()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if text_overrides is None and tie_word_embeddings:  # other shapes load as a user's checkpoint, named by path
            (tmp / "vlq_tiny.json").write_text(
                json.dumps({"recipe_version": TINY_RECIPE_VERSION, "seed": seed}, indent=2) + "\n"
            )
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def tiny_checkpoint_path(cache_dir: str | os.PathLike | None = None, seed: int = TINY_SEED) -> Path:
    """The cached tiny checkpoint, built on first use."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = base / f"tiny-qwen2.5-vl-v{TINY_RECIPE_VERSION}-seed{seed}"
    if not (path / "config.json").exists():
        if path.exists() and not any(path.iterdir()):
            path.rmdir()
        try:
            build_tiny_checkpoint(path, seed=seed)
        except (ModelSourceError, OSError):
            # another process (a pytest-xdist worker) built it first: its rename is complete or absent
            if not (path / "config.json").exists():
                raise
    return path


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
    (:func:`vlq.placement.place`; accelerate's hooks move activations between the parts)."""
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
    source = str(path)
    if (path / "vlq_tiny.json").exists():
        source = TINY
    return _finish(vlm, source, path, tokenizer, processor)


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
        from .hardware import use_extension_cache

        use_extension_cache()  # before ModelOpt first builds or loads its CUDA extensions
    split = dict(device_map=device_map, offload_folder=offload_folder) if device_map and len(set(device_map.values())) > 1 else {}
    if str(source) == TINY:
        return load_checkpoint(tiny_checkpoint_path(cache_dir), dtype=dtype, device=device, **split)
    if str(source) == TINY_TRAINED:  # shipped weights (vlq.training); loaded like a user's checkpoint
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
