"""Stage 2 — calibration and scoring batches.

Batches are plain ``{"input_ids", "attention_mask", "labels"}`` dicts of ``[batch, seq_len]`` tensors.
``labels`` equal ``input_ids`` with padding set to -100; the gradient method shifts them inside its
loss.  Text comes from local files through ``datasets`` (never the hub) or is generated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..runtime.errors import CalibrationDataError
from .shipped import CALIBRATION_CORPUS, DATA_DIR, LONG_TEXT_CORPUS

IGNORE_INDEX = -100


@dataclass(frozen=True)
class CalibrationSet:
    """Token batches for calibration and scoring, with what made them."""

    batches: tuple[dict[str, torch.Tensor], ...]
    source: str
    batch_size: int
    seq_len: int
    vocab_size: int
    kind: str = "text"

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    @property
    def num_samples(self) -> int:
        return len(self.batches) * self.batch_size

    def to(self, device: str | torch.device) -> "CalibrationSet":
        moved = tuple(
            {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            for batch in self.batches
        )
        return CalibrationSet(moved, self.source, self.batch_size, self.seq_len, self.vocab_size, self.kind)

    def require_steps(self, num_calib_steps: int, num_score_steps: int) -> None:
        """Refuse step counts the data cannot feed (ModelOpt would silently run fewer)."""
        for label, steps in (("num_calib_steps", num_calib_steps), ("num_score_steps", num_score_steps)):
            if steps < 1:
                raise CalibrationDataError(f"{label} must be at least 1, got {steps}.")
            if steps > len(self.batches):
                raise CalibrationDataError(
                    f"{label}={steps} but the calibration data has only {len(self.batches)} batches "
                    f"({self.num_samples} samples of {self.seq_len} tokens from {self.source}). "
                    f"Lower {label} to at most {len(self.batches)} or supply more text."
                )


def _validate_ids(ids: torch.Tensor, vocab_size: int, source: str) -> None:
    if ids.numel() == 0:
        raise CalibrationDataError(f"Calibration data from {source} is empty; supply text with at least one sample.")
    top = int(ids.max())
    low = int(ids.min())
    if low < 0 or top >= vocab_size:
        raise CalibrationDataError(
            f"Calibration data from {source} has token ids in [{low}, {top}] but the model's vocabulary "
            f"has {vocab_size} entries. The data was tokenized for another model; tokenize it with "
            "this checkpoint's tokenizer."
        )


def _batches_from_ids(ids: torch.Tensor, batch_size: int, pad_id: int | None = None):
    batches = []
    for start in range(0, ids.shape[0] - batch_size + 1, batch_size):
        chunk = ids[start : start + batch_size].clone()
        mask = torch.ones_like(chunk)
        if pad_id is not None:
            mask = (chunk != pad_id).long()
        labels = chunk.clone()
        labels[mask == 0] = IGNORE_INDEX
        batches.append({"input_ids": chunk, "attention_mask": mask, "labels": labels})
    return tuple(batches)


def synthetic_batches(
    *, vocab_size: int, num_batches: int, batch_size: int = 1, seq_len: int = 64, seed: int = 0,
    max_token_id: int | None = None,
) -> CalibrationSet:
    """Uniform random tokens: enough for timing and full-size smoke runs, meaningless for accuracy."""
    if num_batches < 1 or batch_size < 1 or seq_len < 2:
        raise CalibrationDataError(
            f"synthetic data needs num_batches>=1, batch_size>=1, seq_len>=2; got "
            f"{num_batches}, {batch_size}, {seq_len}."
        )
    high = vocab_size if max_token_id is None else min(vocab_size, max_token_id + 1)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, high, (num_batches * batch_size, seq_len), generator=generator)
    return CalibrationSet(_batches_from_ids(ids, batch_size), f"synthetic(seed={seed})", batch_size, seq_len, vocab_size, "synthetic")


def vision_token_cap(config) -> int:
    """The highest token id plain synthetic text may use: just below Qwen's first vision marker.

    Random tokens that happen to be ``<|image_pad|>`` or ``<|vision_start|>`` make the VLM's forward
    look for image features that do not exist; text-only synthetic data stays below them.
    """
    markers = [getattr(config, name, None) for name in ("image_token_id", "video_token_id", "vision_start_token_id")]
    markers = [int(m) for m in markers if m is not None]
    return min(markers) - 1 if markers else int(config.get_text_config().vocab_size) - 1


def synthetic_text_calibration(
    config, *, vocab_size: int, num_batches: int, batch_size: int = 1, seq_len: int = 64, seed: int = 0,
) -> CalibrationSet:
    """Seeded random text tokens for a model without a tokenizer, capped below the vision markers."""
    return synthetic_batches(vocab_size=vocab_size, num_batches=num_batches, batch_size=batch_size, seq_len=seq_len,
                             seed=seed, max_token_id=vision_token_cap(config))


def load_text_samples(path: str | os.PathLike | None = None, *, text_field: str = "text") -> list[str]:
    """Read text samples from a local .txt (one sample per line) or .jsonl/.json file via ``datasets``."""
    import datasets

    path = Path(path) if path is not None else CALIBRATION_CORPUS
    if not path.exists():
        raise CalibrationDataError(f"Calibration file {path} does not exist; pass a local .txt or .jsonl file.")
    suffix = path.suffix.lower()
    builder = {"txt": "text", "text": "text", "jsonl": "json", "json": "json"}.get(suffix.lstrip("."))
    if builder is None:
        raise CalibrationDataError(f"Calibration file {path} must end in .txt, .jsonl or .json, got {suffix!r}.")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as exc:  # datasets raises many types for broken files
        raise CalibrationDataError(f"Could not read calibration file {path}: {exc}") from exc
    if text_field not in dataset.column_names:
        raise CalibrationDataError(
            f"Calibration file {path} has columns {dataset.column_names}; expected a {text_field!r} column "
            "(pass text_field= to name another)."
        )
    samples = [s for s in dataset[text_field] if isinstance(s, str) and s.strip()]
    if not samples:
        raise CalibrationDataError(f"Calibration file {path} holds no non-empty {text_field!r} samples.")
    return samples


def text_source(path: str | os.PathLike | None) -> str:
    """How calibration and held-out data name a text file (the shipped corpus when ``path`` is None); shipped
    files are named ``vlq/data/NAME`` wherever vlq is installed."""
    if path is None:
        path = CALIBRATION_CORPUS
    if Path(path).expanduser().resolve().parent == DATA_DIR.resolve():
        return f"vlq/data/{Path(path).name}"
    return str(path)


def shipped_text(source: str) -> Path | None:
    """The shipped file a :func:`text_source` name ``vlq/data/NAME`` stands for (None for a user's file)."""
    prefix = "vlq/data/"
    if source.startswith(prefix) and (DATA_DIR / source[len(prefix):]).is_file():
        return DATA_DIR / source[len(prefix):]
    return None


def default_text_path(model_source: str) -> Path:
    """The shipped text a model is calibrated and measured on without ``--data``: the tiny models' own corpus
    (their tokenizer was trained on it, and ``tiny-trained`` never saw its last lines), else the long
    generated corpus, which holds a full-size model's 512-token calibration and held-out rows."""
    from ..inputs.requests import TINY, TINY_TRAINED

    return CALIBRATION_CORPUS if str(model_source) in (TINY, TINY_TRAINED) else LONG_TEXT_CORPUS


def sample_token_ids(tokenizer, sample: str) -> list[int]:
    """One text sample's token ids followed by the separator packing puts between samples (EOS, else pad)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    ids = list(tokenizer(sample, add_special_tokens=False)["input_ids"])
    return ids + [eos] if eos is not None else ids


def text_batches(
    tokenizer,
    *,
    vocab_size: int,
    num_batches: int,
    batch_size: int = 1,
    seq_len: int = 64,
    path: str | os.PathLike | None = None,
    text_field: str = "text",
) -> CalibrationSet:
    """Pack tokenized local text into ``num_batches`` batches of ``batch_size`` x ``seq_len`` tokens.

    Samples are concatenated with the tokenizer's EOS between them and cut into equal rows, the
    usual packing for calibration; no padding is needed.
    """
    if seq_len < 2:
        raise CalibrationDataError(f"seq_len must be at least 2 (the loss predicts the next token), got {seq_len}.")
    source = text_source(path)
    samples = load_text_samples(path, text_field=text_field)
    stream: list[int] = []
    rows_needed = num_batches * batch_size
    for sample in samples:
        stream.extend(sample_token_ids(tokenizer, sample))
        if len(stream) >= rows_needed * seq_len:
            break
    available_rows = len(stream) // seq_len
    if available_rows == 0:
        raise CalibrationDataError(
            f"Calibration text from {source} has {len(stream)} tokens, fewer than one row of "
            f"seq_len={seq_len}. Supply more text or lower seq_len."
        )
    if available_rows < rows_needed:
        raise CalibrationDataError(
            f"Calibration text from {source} gives {available_rows} rows of {seq_len} tokens but "
            f"{num_batches} batches x {batch_size} = {rows_needed} rows were asked. Supply more text, "
            "or lower num_batches, batch_size or seq_len."
        )
    ids = torch.tensor(stream[: rows_needed * seq_len], dtype=torch.long).view(rows_needed, seq_len)
    _validate_ids(ids, vocab_size, source)
    return CalibrationSet(_batches_from_ids(ids, batch_size), source, batch_size, seq_len, vocab_size, "text")


def from_token_ids(ids: torch.Tensor, *, vocab_size: int, batch_size: int = 1, source: str = "token ids") -> CalibrationSet:
    """Wrap pre-tokenized ``[rows, seq_len]`` ids, checking them against the model's vocabulary."""
    if ids.dim() != 2:
        raise CalibrationDataError(f"token ids must be [rows, seq_len], got shape {tuple(ids.shape)}.")
    _validate_ids(ids, vocab_size, source)
    if ids.shape[1] < 2:
        raise CalibrationDataError(f"{source}: rows of {ids.shape[1]} tokens are too short; need at least 2.")
    if ids.shape[0] < batch_size:
        raise CalibrationDataError(f"{source}: {ids.shape[0]} rows cannot fill one batch of {batch_size}.")
    return CalibrationSet(_batches_from_ids(ids.long(), batch_size), source, batch_size, ids.shape[1], vocab_size, "text")


# ------------------------------------------------------------------------------------------------
# Image+text calibration (issue 7)
# ------------------------------------------------------------------------------------------------
#
# Batches carry what the VLM forward needs: ``input_ids``, ``attention_mask``, ``labels`` (image-pad
# positions and padding set to -100, so the loss is on text only), ``pixel_values``,
# ``image_grid_thw`` and ``mm_token_type_ids`` (0 text, 1 image; the 3-D mrope positions are built
# from it).  The vision tower that turns ``pixel_values`` into features is never searched.

IMAGE_TEXT = "image_text"
TEXT_FIELDS = ("text", "caption", "question", "prompt")
_SHAPES = ("circle", "square", "triangle", "cross")
_COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "white": (245, 245, 245), "black": (15, 15, 15), "orange": (240, 140, 30), "purple": (140, 60, 190),
}
_IMAGE_SIDES = (56, 84, 112)  # the tiny processor's range: 4..16 merged visual tokens per image


def generated_image_text_samples(num_samples: int, *, seed: int = 0) -> list[dict]:
    """Deterministic images (a colored shape on a noisy background) with a caption or a question.

    Every sample is ``{"image": PIL.Image, "text": str, "answer": str | None}``; the same seed gives
    the same pixels and words on every machine (numpy's PCG64 generator).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    if num_samples < 1:
        raise CalibrationDataError(f"num_samples must be at least 1, got {num_samples}.")
    rng = np.random.default_rng(seed)
    names = sorted(_COLORS)
    samples = []
    for i in range(num_samples):
        w, h = (int(rng.choice(_IMAGE_SIDES)) for _ in range(2))
        bg_name, fg_name = (names[j] for j in rng.choice(len(names), size=2, replace=False))
        shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
        noise = rng.integers(-30, 31, size=(h, w, 3))
        pixels = np.clip(np.array(_COLORS[bg_name])[None, None, :] + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        size = int(rng.integers(min(w, h) // 3, min(w, h) - 8))
        x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        box, fill = (x0, y0, x0 + size, y0 + size), _COLORS[fg_name]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(x0, y0 + size), (x0 + size // 2, y0), (x0 + size, y0 + size)], fill=fill)
        else:
            third = size // 3
            draw.rectangle((x0 + third, y0, x0 + 2 * third, y0 + size), fill=fill)
            draw.rectangle((x0, y0 + third, x0 + size, y0 + 2 * third), fill=fill)
        if i % 2 == 0:
            text, answer = f"A {fg_name} {shape} on a {bg_name} background.", None
        else:
            text = ("What shape is in the picture?", "What color is the shape?", "What color is the background?")[i // 2 % 3]
            answer = {0: f"A {shape}.", 1: f"It is {fg_name}.", 2: f"The background is {bg_name}."}[i // 2 % 3]
        samples.append({"image": image, "text": text, "answer": answer})
    return samples


def _pick_text_field(columns: list[str], text_field: str | None, source: str) -> str:
    if text_field is not None:
        if text_field not in columns:
            raise CalibrationDataError(f"{source} has columns {columns}; expected a {text_field!r} column.")
        return text_field
    for name in TEXT_FIELDS:
        if name in columns:
            return name
    raise CalibrationDataError(
        f"{source} has columns {columns}; expected one of {list(TEXT_FIELDS)} holding each image's caption "
        "or question (pass text_field= to name another)."
    )


def load_image_text_samples(
    path: str | os.PathLike, *, text_field: str | None = None, image_field: str = "image", answer_field: str = "answer"
) -> list[dict]:
    """Read local images with captions or questions through ``datasets`` (never the hub).

    ``path`` is either a folder in ``imagefolder`` layout (images plus a ``metadata.jsonl`` whose rows
    name a ``file_name`` and a text column) or a ``.jsonl``/``.json`` file whose rows hold an image path
    (``image_field``, relative to the file's folder or absolute) and a text column.  The text column is
    ``text_field`` or the first of ``text``, ``caption``, ``question``, ``prompt``; an ``answer`` column,
    when present, becomes the assistant's reply.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(
            f"Image calibration data {path} does not exist; pass an imagefolder folder (images + metadata.jsonl) "
            "or a .jsonl file with image paths and text."
        )
    try:
        if path.is_dir():
            if not any(path.glob("metadata.*")) and not any(path.glob("*/metadata.*")):
                raise CalibrationDataError(
                    f"{path} is a folder without metadata.jsonl: imagefolder needs one row per image with "
                    "'file_name' and a caption/question column."
                )
            dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split="train", keep_in_memory=True)
            image_field = "image"
        else:
            if path.suffix.lower() not in (".jsonl", ".json"):
                raise CalibrationDataError(f"Image calibration file {path} must be a folder or end in .jsonl/.json.")
            dataset = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
            if image_field not in dataset.column_names:
                raise CalibrationDataError(
                    f"{path} has columns {dataset.column_names}; expected an {image_field!r} column with image paths."
                )
            base = path.parent
            missing = [p for p in dataset[image_field] if not (base / p).exists()]
            if missing:
                raise CalibrationDataError(f"{path} names {len(missing)} image files that do not exist (first: {base / missing[0]}).")
            dataset = dataset.map(lambda row: {image_field: str((base / row[image_field]).resolve())})
            dataset = dataset.cast_column(image_field, datasets.Image())
    except CalibrationDataError:
        raise
    except Exception as exc:  # datasets raises many types for broken folders/files
        raise CalibrationDataError(f"Could not read image calibration data {path}: {exc}") from exc
    field = _pick_text_field(dataset.column_names, text_field, str(path))
    has_answer = answer_field in dataset.column_names
    samples = []
    for row in dataset:
        text = row[field]
        if not isinstance(text, str) or not text.strip():
            continue
        answer = row[answer_field] if has_answer and isinstance(row[answer_field], str) else None
        samples.append({"image": row[image_field].convert("RGB"), "text": text, "answer": answer})
    if not samples:
        raise CalibrationDataError(f"{path} holds no image with a non-empty {field!r}.")
    return samples


def _image_messages(sample: dict) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["text"]}]}]
    if sample.get("answer"):
        messages.append({"role": "assistant", "content": sample["answer"]})
    return messages


def _pad_right(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if tensor.shape[1] == length:
        return tensor
    pad = torch.full((tensor.shape[0], length - tensor.shape[1]), value, dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=1)


def _image_text_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE_INDEX
    labels[input_ids == image_token_id] = IGNORE_INDEX
    return labels


def image_text_batches(
    processor,
    *,
    num_batches: int,
    batch_size: int = 1,
    seq_len: int | None = None,
    path: str | os.PathLike | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    text_field: str | None = None,
) -> CalibrationSet:
    """Processor-built image+text batches: generated images (``path=None``) or a local folder/JSON lines.

    Each sample becomes a chat (user: image + caption/question, assistant: answer when there is one)
    rendered by the processor's chat template, which emits ``<|vision_start|><|image_pad|><|vision_end|>``
    and expands the pad to the image's visual-token count.  Rows are right-padded to ``seq_len``
    (refused when a sample is longer: cutting it would split an image's tokens) or, without
    ``seq_len``, to the longest row of each batch.
    """
    if processor is None or not hasattr(processor, "image_processor"):
        raise CalibrationDataError(
            "Image+text calibration needs the checkpoint's image processor (Qwen2_5_VLProcessor); this model "
            "has none. Save the processor with the checkpoint, or use synthetic_image_text_batches."
        )
    if num_batches < 1 or batch_size < 1:
        raise CalibrationDataError(f"need num_batches>=1 and batch_size>=1, got {num_batches}, {batch_size}.")
    rows_needed = num_batches * batch_size
    if path is None:
        samples = generated_image_text_samples(rows_needed, seed=seed)
        source = f"{IMAGE_TEXT}:generated(seed={seed}, n={rows_needed})"
    else:
        samples = load_image_text_samples(path, text_field=text_field)
        source = f"{IMAGE_TEXT}:{path}"
        if len(samples) < rows_needed:
            raise CalibrationDataError(
                f"{path} holds {len(samples)} image samples but {num_batches} batches x {batch_size} = "
                f"{rows_needed} were asked. Add images, or lower num_batches or batch_size."
            )
        samples = samples[:rows_needed]
    tokenizer = processor.tokenizer
    image_token_id = int(processor.image_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if vocab_size is None:
        vocab_size = len(tokenizer)
    batches = []
    longest = 0
    for start in range(0, rows_needed, batch_size):
        chunk = samples[start : start + batch_size]
        texts = [processor.apply_chat_template(_image_messages(s), tokenize=False) for s in chunk]
        out = processor(text=texts, images=[s["image"] for s in chunk], return_tensors="pt", padding=True)
        ids, mask = out["input_ids"].long(), out["attention_mask"].long()
        types = out.get("mm_token_type_ids")
        types = (ids == image_token_id).long() if types is None else types.long()
        length = ids.shape[1]
        longest = max(longest, length)
        if seq_len is not None:
            if length > seq_len:
                raise CalibrationDataError(
                    f"An image+text sample from {source} is {length} tokens long (with its visual tokens) but "
                    f"seq_len={seq_len}; raise seq_len (cutting would split an image's tokens) or use smaller images."
                )
            ids, mask, types = _pad_right(ids, seq_len, pad_id), _pad_right(mask, seq_len, 0), _pad_right(types, seq_len, 0)
        _validate_ids(ids, vocab_size, source)
        batches.append({
            "input_ids": ids,
            "attention_mask": mask,
            "labels": _image_text_labels(ids, mask, image_token_id),
            "pixel_values": out["pixel_values"],
            "image_grid_thw": out["image_grid_thw"].long(),
            "mm_token_type_ids": types,
        })
    return CalibrationSet(tuple(batches), source, batch_size, seq_len or longest, vocab_size, IMAGE_TEXT)


def synthetic_image_text_batches(
    config,
    *,
    vocab_size: int,
    num_batches: int,
    batch_size: int = 1,
    seq_len: int = 64,
    image_grid: tuple[int, int, int] = (1, 8, 8),
    seed: int = 0,
) -> CalibrationSet:
    """Image+text batches built without a processor (the 3B architecture with random weights).

    ``config`` is the VLM's config: its vision geometry fixes ``pixel_values``' row width
    (channels x temporal patch x patch²) and its token ids the layout.  Each row is random text
    (ids below the lowest special id), then ``<|vision_start|>``, one image's run of ``<|image_pad|>``
    (grid t·h·w / merge²), ``<|vision_end|>``, and random text up to ``seq_len``.
    """
    vision = config.vision_config
    merge = int(vision.spatial_merge_size)
    t, h, w = (int(x) for x in image_grid)
    if h % merge or w % merge:
        raise CalibrationDataError(f"image_grid {image_grid}: h and w must be multiples of spatial_merge_size={merge}.")
    n_image_tokens = t * h * w // merge**2
    if seq_len < n_image_tokens + 4:
        raise CalibrationDataError(f"seq_len={seq_len} cannot hold an image of {n_image_tokens} tokens plus text.")
    specials = [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]
    high = min(int(s) for s in specials if s is not None)
    channels = int(getattr(vision, "in_chans", getattr(vision, "in_channels", 3)))
    width = channels * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(0, high, (batch_size, seq_len), generator=generator)
        start = int(torch.randint(1, seq_len - n_image_tokens - 2, (1,), generator=generator))
        ids[:, start] = config.vision_start_token_id
        ids[:, start + 1 : start + 1 + n_image_tokens] = config.image_token_id
        ids[:, start + 1 + n_image_tokens] = config.vision_end_token_id
        mask = torch.ones_like(ids)
        types = (ids == config.image_token_id).long()
        batches.append({
            "input_ids": ids,
            "attention_mask": mask,
            "labels": _image_text_labels(ids, mask, config.image_token_id),
            "pixel_values": torch.randn(batch_size * t * h * w, width, generator=generator),
            "image_grid_thw": torch.tensor([[t, h, w]] * batch_size),
            "mm_token_type_ids": types,
        })
    source = f"{IMAGE_TEXT}:synthetic(seed={seed}, grid={t}x{h}x{w})"
    return CalibrationSet(tuple(batches), source, batch_size, seq_len, vocab_size, IMAGE_TEXT)


def image_text_calibration(
    loaded, images: str | os.PathLike = "generated", *, num_batches: int, batch_size: int = 1,
    seq_len: int | None = None, seed: int = 0, text_field: str | None = None,
) -> CalibrationSet:
    """Image+text calibration for ``loaded``: ``images`` is ``"generated"`` or a local folder/.jsonl.

    Generated images go through the checkpoint's processor when it has one; a model without one
    (the random-weight 3B architecture) gets :func:`synthetic_image_text_batches` instead.
    """
    if str(images) == "generated":
        if loaded.processor is not None:
            return image_text_batches(loaded.processor, num_batches=num_batches, batch_size=batch_size,
                                      seq_len=seq_len, seed=seed, vocab_size=loaded.vocab_size)
        return synthetic_image_text_batches(loaded.config, vocab_size=loaded.vocab_size, num_batches=num_batches,
                                            batch_size=batch_size, seq_len=seq_len or 64, seed=seed)
    if loaded.processor is None:
        raise CalibrationDataError(
            f"{loaded.source} has no image processor, so the images in {images} cannot be turned into "
            "pixel_values; load a checkpoint folder that includes its processor, or use --images generated."
        )
    return image_text_batches(loaded.processor, num_batches=num_batches, batch_size=batch_size, seq_len=seq_len,
                              path=images, vocab_size=loaded.vocab_size, text_field=text_field)


def images_option_from_source(source: str) -> tuple[str | None, int]:
    """``(images, seed)`` that rebuild the image+text calibration a ``CalibrationSet.source`` names.

    ``(None, 0)`` for text calibration.  ``vlq export`` uses it to restore an image+text search with
    the same batches it was scored on.
    """
    import re

    if not source.startswith(IMAGE_TEXT + ":"):
        return None, 0
    rest = source[len(IMAGE_TEXT) + 1 :]
    generated = re.fullmatch(r"(?:generated|synthetic)\(seed=(-?\d+),.*\)", rest)
    if generated:
        return "generated", int(generated.group(1))
    return rest, 0
