"""The tiny synthetic Qwen2.5-VL (the real ``Qwen2_5_VLForConditionalGeneration`` class, seconds on a CPU) with
an offline-built tokenizer and image processor, saved with ``save_pretrained`` and loaded back like a user's
checkpoint; and checkpoint folders in a published model's layout (for the prerequisite checks)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.cache import default_cache_dir
from ..runtime.errors import ModelSourceError
from .qwen import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS
from .shipped import CALIBRATION_CORPUS

#: Bump when the tiny model's recipe changes so cached builds are not reused.
TINY_RECIPE_VERSION = 1

TINY_SEED = 0

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


#: Where a checkpoint folder keeps its chat template: ``own`` (``chat_template.json``, as the published
#: Qwen2.5-VL folders do), ``tokenizer`` (only in ``tokenizer_config.json``, as older transformers saved it),
#: ``none`` (nowhere).
CHAT_TEMPLATE_PLACES = ("own", "tokenizer", "none")


def flat_config(nested: dict[str, Any]) -> dict[str, Any]:
    """A transformers-5 ``Qwen2_5_VLConfig`` dict (``text_config`` nested) in the published flat layout:
    text fields at the top level, ``rope_scaling``/``rope_theta`` as the hub's config.json spells them."""
    config = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested.get("text_config") or {})
    text.pop("model_type", None)
    text.pop("layer_types", None)
    rope = text.pop("rope_parameters", None) or {}
    for key, value in text.items():
        config.setdefault(key, value)
    if rope:
        config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta"))
        config["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
    config["model_type"] = "qwen2_5_vl"
    return config


def build_published_layout_checkpoint(
    dest: str | os.PathLike,
    *,
    chat_template: str = "own",
    image_processor_config: bool = True,
    head_dim: int = 32,
    max_shard_size: str = "2MB",
    seed: int = TINY_SEED,
) -> Path:
    """A small Qwen2.5-VL folder laid out as the published checkpoints are, for the path a user's checkpoint takes.

    Written by ``save_pretrained``, then arranged as on the hub: flat ``config.json``, several safetensors
    shards with their index, an untied ``lm_head``, ``preprocessor_config.json`` (unless
    ``image_processor_config`` is False: then the folder has no image-processor config at all), the chat
    template where ``chat_template`` says (:data:`CHAT_TEMPLATE_PLACES`), and ``head_dim``-sized attention
    heads (the tiny model's hidden size split into ``256 // head_dim`` heads).  Not marked as the tiny model:
    vlq treats it as any checkpoint folder (full-size defaults: 512-token rows).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    if chat_template not in CHAT_TEMPLATE_PLACES:
        raise ModelSourceError(f"chat_template must be one of {CHAT_TEMPLATE_PLACES}, got {chat_template!r}.")
    hidden = TINY_TEXT_CONFIG["hidden_size"]
    if head_dim < 2 or hidden % head_dim:
        raise ModelSourceError(f"head_dim {head_dim} must divide the hidden size {hidden}.")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ModelSourceError(f"Refusing to build a checkpoint into non-empty folder {dest}.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer)
    shape = odd_text_shape(hidden, TINY_TEXT_CONFIG["intermediate_size"], num_attention_heads=hidden // head_dim)
    config = tiny_config(tokenizer, shape, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _init_weights_deterministically(model, seed)
    model = model.to(torch.bfloat16).eval()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.chat_template = None
        tokenizer.save_pretrained(tmp)
        if chat_template == "tokenizer":  # where transformers < 4.43 kept it; 5.x writes chat_template.jinja instead
            tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text())
            tokenizer_config["chat_template"] = QWEN_CHAT_TEMPLATE
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(flat_config(json.loads((tmp / "config.json").read_text())), indent=2) + "\n")
        for name in ("chat_template.jinja", "chat_template.json", "processor_config.json"):
            (tmp / name).unlink(missing_ok=True)
        if chat_template == "own":
            (tmp / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}, indent=2) + "\n")
        if image_processor_config:
            image = processor.image_processor
            (tmp / "preprocessor_config.json").write_text(json.dumps({
                "min_pixels": TINY_IMAGE_MIN_PIXELS, "max_pixels": TINY_IMAGE_MAX_PIXELS,
                "patch_size": image.patch_size, "temporal_patch_size": image.temporal_patch_size, "merge_size": image.merge_size,
                "image_mean": list(image.image_mean), "image_std": list(image.image_std),
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            }, indent=2) + "\n")
        if not any(tmp.glob("*.safetensors.index.json")):
            raise ModelSourceError(f"save_pretrained wrote one shard; lower max_shard_size (got {max_shard_size}).")
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
