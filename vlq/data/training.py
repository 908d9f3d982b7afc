"""A tiny Qwen2.5-VL that has learned something: deterministic CPU training of the whole VLM (issue 11).

The random-weight tiny model (``vlq.data.models.build_tiny_checkpoint``) predicts nearly uniform
distributions and ignores its images, so no fidelity number measured on it means anything.  This
module trains that same model — same tokenizer, processor, config and initial weights — on

* text: the *front* of the shipped corpus (all but its last ``HELDOUT_CORPUS_SAMPLES`` lines, which
  ``vlq.data.heldout.heldout_text_batches`` reads) plus a generated corpus with real structure
  (:func:`generated_text_samples`: sentences with subject-verb and pronoun agreement, arithmetic,
  counting, fixed facts, lists repeated later in the same line);
* image+text: ``vlq.data.calibration.generated_image_text_samples`` from seed ``TRAIN_IMAGE_SEED``
  (held-out images use seeds >= 2**32), whose captions and answers name the shape and the colors, so
  the text can only be predicted from the image.

Every parameter is trained (vision tower included).  The result ships as ``vlq/data/tiny_trained``
(model source ``tiny-trained``), written by ``scripts/train_tiny.py`` with a ``training.json`` that
records the recipe, the fingerprint of the saved weights, the held-out measurements and the same
measurements on the random-weight tiny model (negative control).  Training the default recipe takes
about 16 minutes on a 2-core CPU shared with other work, too long for build time, so the weights ship.

What it learns: held-out next-token NLL about a quarter of ln(1024) on the corpus end and about a
tenth on generated text; images change the NLL of the text after them (mostly through the colors of
the shape and the background; the small two-block tower barely tells the four shapes apart).

Reproducibility: the same recipe on the same machine type (torch version, CPU, ``num_threads``)
gives bit-identical weights; training runs with ``torch.use_deterministic_algorithms(True)``, a fixed
thread count and seeded generators for the data order.  Generated data (numpy PCG64) and the
tokenizer are identical on every machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .calibration import IGNORE_INDEX, CalibrationSet, from_token_ids, image_text_batches, load_text_samples
from .generated_text import GENERATED_TEXT_SOURCE, TRAIN_TEXT_SEED, generated_text_samples, heldout_generated_text_batches, pack
from ..runtime.errors import CalibrationDataError
from .heldout import heldout_image_text_batches, heldout_text_batches
from .shipped import CALIBRATION_CORPUS, TINY_TRAINED_DIR
from .tiny import TINY_SEED, build_tiny_checkpoint
from .models import LoadedVLM, fingerprint_parameters, load_checkpoint

__all__ = [
    "EVAL_IMAGES",
    "EVAL_TEXT",
    "HELDOUT_CORPUS_SAMPLES",
    "RECIPE_VERSION",
    "TRAINING_RECORD",
    "TRAIN_IMAGE_SEED",
    "ImageConditioning",
    "TrainedTiny",
    "TrainingRecipe",
    "evaluate_tiny",
    "image_conditioning",
    "mean_nll",
    "save_trained",
    "train_tiny",
    "training_corpus_samples",
    "training_image_set",
    "training_text_set",
]

RECIPE_VERSION = 1
TRAINING_RECORD = "training.json"
#: The shipped corpus's last lines are never trained on: held-out text is packed from them.
HELDOUT_CORPUS_SAMPLES = 40
#: Generated training images: one stream from this seed, in the calibration range [0, 2**32) but far
#: from the small seeds calibration uses; held-out images use seeds >= 2**32.
TRAIN_IMAGE_SEED = 2**31


# ------------------------------------------------------------------------------------------------
# Generated text with structure
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# The recipe and the training data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that determines the trained weights (with the torch version and the machine type).

    Each step takes ``text_batch_size`` rows of ``text_seq_len`` tokens (generated text, and the
    corpus front repeated ``corpus_repeats`` times per epoch) and ``image_batch_size`` generated
    image+text samples, and sums their next-token losses (the image loss weighted by
    ``image_loss_weight``).  AdamW, linear warm-up then cosine decay to ``min_lr_ratio`` of the peak.
    """

    steps: int = 400
    text_batch_size: int = 8
    text_seq_len: int = 128
    image_batch_size: int = 8
    image_loss_weight: float = 1.0
    generated_text_lines: int = 2500
    corpus_repeats: int = 8
    image_samples: int = 1600
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    init_seed: int = TINY_SEED
    num_threads: int = 2
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if self.version != RECIPE_VERSION:
            raise ValueError(f"Training recipe version {self.version!r} is not supported; this vlq reads version {RECIPE_VERSION}.")
        positive = ("steps", "text_batch_size", "image_batch_size", "generated_text_lines", "image_samples", "num_threads")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingRecipe.{name} must be an int >= 1, got {value!r}.")
        if self.text_seq_len < 2:
            raise ValueError(f"TrainingRecipe.text_seq_len must be at least 2, got {self.text_seq_len!r}.")
        if self.image_samples < self.image_batch_size:
            raise ValueError(
                f"TrainingRecipe.image_samples={self.image_samples} cannot fill one image batch of {self.image_batch_size}."
            )
        if self.corpus_repeats < 0 or self.warmup_steps < 0:
            raise ValueError(f"corpus_repeats and warmup_steps must be >= 0, got {self.corpus_repeats}, {self.warmup_steps}.")
        if not self.learning_rate > 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ValueError(
                "TrainingRecipe needs learning_rate > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0 and grad_clip > 0; got "
                f"{self.learning_rate}, {self.min_lr_ratio}, {self.weight_decay}, {self.grad_clip}."
            )
        if self.image_loss_weight < 0:
            raise ValueError(f"image_loss_weight must be >= 0, got {self.image_loss_weight}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingRecipe":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown training recipe keys {unknown}; known: {sorted(known)}.")
        return cls(**data)

    def replace(self, **changes) -> "TrainingRecipe":
        return replace(self, **changes)


def training_corpus_samples(path: str | os.PathLike | None = None) -> list[str]:
    """The lines of the shipped corpus that training reads: all but the last ``HELDOUT_CORPUS_SAMPLES``."""
    samples = load_text_samples(path)
    if len(samples) <= HELDOUT_CORPUS_SAMPLES:
        raise CalibrationDataError(
            f"The corpus has {len(samples)} samples; training keeps the last {HELDOUT_CORPUS_SAMPLES} for held-out text "
            "and needs at least one more."
        )
    return samples[:-HELDOUT_CORPUS_SAMPLES]


def _rows(stream: list[int], seq_len: int) -> torch.Tensor:
    count = len(stream) // seq_len
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def _training_rows(tokenizer, recipe: TrainingRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(corpus-front rows, generated-text rows) of ``recipe.text_seq_len`` tokens."""
    corpus = _rows(pack(tokenizer, training_corpus_samples()), recipe.text_seq_len)
    generated = _rows(pack(tokenizer, generated_text_samples(recipe.generated_text_lines, seed=TRAIN_TEXT_SEED)),
                      recipe.text_seq_len)
    return corpus, generated


def training_text_set(tokenizer, recipe: TrainingRecipe | None = None, *, vocab_size: int) -> CalibrationSet:
    """Every row of text the recipe trains on (each once, one row per batch), for disjointness checks."""
    recipe = recipe or TrainingRecipe()
    corpus, generated = _training_rows(tokenizer, recipe)
    total = len(load_text_samples())
    source = (
        f"training:vlq/data/{CALIBRATION_CORPUS.name}(samples 0-{total - HELDOUT_CORPUS_SAMPLES - 1} of {total})"
        f"+{GENERATED_TEXT_SOURCE}(seed={TRAIN_TEXT_SEED}, lines={recipe.generated_text_lines})"
    )
    return from_token_ids(torch.cat([corpus, generated]), vocab_size=vocab_size, batch_size=1, source=source)


def training_image_set(processor, recipe: TrainingRecipe | None = None, *, vocab_size: int,
                       num_samples: int | None = None) -> CalibrationSet:
    """The generated image+text batches the recipe trains on (seed ``TRAIN_IMAGE_SEED``).

    ``num_samples`` (a multiple of the image batch size) takes only the first samples of the same
    stream: a prefix of the training images, for checks that need not process all of them.
    """
    recipe = recipe or TrainingRecipe()
    count = recipe.image_samples if num_samples is None else min(num_samples, recipe.image_samples)
    num_batches = count // recipe.image_batch_size
    if num_batches < 1:
        raise CalibrationDataError(f"{count} image samples cannot fill one batch of {recipe.image_batch_size}.")
    return image_text_batches(processor, num_batches=num_batches, batch_size=recipe.image_batch_size,
                              seed=TRAIN_IMAGE_SEED, vocab_size=vocab_size)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainedTiny:
    """The trained model (BF16, eval mode) with its tokenizer/processor and how it was made."""

    vlm: torch.nn.Module
    tokenizer: Any
    processor: Any
    recipe: TrainingRecipe
    fingerprint: str  # vlq.data.models.fingerprint_parameters of the BF16 weights (what is saved)
    fingerprint_fp32: str  # of the float32 weights at the end of training (stricter)
    wall_s: float  # building the initial model, the data, and every step
    setup_s: float  # the part of wall_s before the first step
    losses: list[dict[str, float]]  # every 25th step and the last: step, text, image, lr
    load_average: tuple[float, ...] = ()  # 1-minute load average at the start and the end (a shared machine is slower)


def _learning_rate(recipe: TrainingRecipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    span = max(recipe.steps - recipe.warmup_steps, 1)
    progress = min((step - recipe.warmup_steps) / span, 1.0)
    ratio = recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return recipe.learning_rate * ratio


def _epochs(count: int, generator: torch.Generator):
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def train_tiny(recipe: TrainingRecipe | None = None, *, log: Callable[[str], None] | None = None) -> TrainedTiny:
    """Train the tiny Qwen2.5-VL (all parameters, float32, CPU) with ``recipe``; deterministic.

    Starts from exactly the weights ``build_tiny_checkpoint(seed=recipe.init_seed)`` writes, with its
    tokenizer and processor.  Runs with ``recipe.num_threads`` threads and deterministic algorithms;
    both settings are restored afterwards.
    """
    recipe = recipe or TrainingRecipe()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(recipe, log or (lambda _message: None))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(recipe: TrainingRecipe, log: Callable[[str], None]) -> TrainedTiny:
    started = time.perf_counter()  # wall time covers building the initial model and the data too
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vlq-train-") as tmp:
        loaded = load_checkpoint(build_tiny_checkpoint(Path(tmp) / "tiny", seed=recipe.init_seed), dtype=torch.float32)
    model, vocab = loaded.vlm, loaded.vocab_size
    corpus, generated = _training_rows(loaded.tokenizer, recipe)
    rows = torch.cat([corpus.repeat(recipe.corpus_repeats, 1), generated])
    images = training_image_set(loaded.processor, recipe, vocab_size=vocab)
    log(f"data: {generated.shape[0]} generated + {corpus.shape[0]}x{recipe.corpus_repeats} corpus rows of "
        f"{recipe.text_seq_len} tokens, {len(images)} image batches of {recipe.image_batch_size}")

    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    text_order, image_order = _epochs(rows.shape[0], generator), _epochs(len(images), generator)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate, betas=(0.9, 0.95), foreach=False,
    )
    model.train()
    losses: list[dict[str, float]] = []
    setup_s = time.perf_counter() - started
    for step in range(recipe.steps):
        lr = _learning_rate(recipe, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = rows[[next(text_order) for _ in range(recipe.text_batch_size)]]
        text_loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss
        image_loss = model(**images.batches[next(image_order)], use_cache=False).loss
        (text_loss + recipe.image_loss_weight * image_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == recipe.steps - 1:
            losses.append({"step": step, "text": round(text_loss.item(), 4), "image": round(image_loss.item(), 4), "lr": lr})
            log(f"step {step:4d}/{recipe.steps}: text loss {text_loss.item():.3f}, image+text loss {image_loss.item():.3f}, "
                f"lr {lr:.2e} ({time.perf_counter() - started:.0f} s)")
    wall_s = time.perf_counter() - started
    model.eval()
    fingerprint_fp32 = fingerprint_parameters(model)
    model = model.to(torch.bfloat16)
    return TrainedTiny(model, loaded.tokenizer, loaded.processor, recipe, fingerprint_parameters(model),
                       fingerprint_fp32, wall_s, setup_s, losses, (load_start, os.getloadavg()[0]))


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------

#: Held-out sets the shipped record is measured on: 1024 tokens of corpus end / generated text,
#: and 48 generated image+text samples (seed 2**32).
EVAL_TEXT = {"num_batches": 8, "batch_size": 2, "seq_len": 64}
EVAL_IMAGES = 48


@torch.no_grad()
def mean_nll(model: torch.nn.Module, batches, *, after_image: bool = False) -> tuple[float, int]:
    """Mean next-token NLL (nats) of ``model`` over the labelled positions of ``batches``, and their count.

    Positions are scored as ``vlq.fidelity.metrics`` scores them (logits at ``t`` predict the label at
    ``t + 1``; -100 labels and padding are skipped).  ``after_image`` keeps only predictions of tokens
    after the row's last ``<|image_pad|>``: the text that can depend on the image.
    """
    from ..fidelity.metrics import logits_forward

    forward = logits_forward(model)
    image_token = getattr(model.config, "image_token_id", None)
    total, count = 0.0, 0
    for batch in batches:
        logits = forward(batch).float()
        labels = batch["labels"].to(logits.device)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        mask = batch.get("attention_mask")
        if mask is not None:
            attended = mask.to(logits.device) != 0
            keep &= attended[:, :-1] & attended[:, 1:]
        if after_image:
            if image_token is None:
                raise ValueError("after_image needs a model whose config names image_token_id.")
            is_image = (batch["input_ids"].to(logits.device) == image_token).long()
            later_images = is_image.flip(1).cumsum(1).flip(1)  # image tokens at or after each position
            keep &= (later_images[:, 1:] == 0) & (is_image.sum(1, keepdim=True) > 0)
        logp = logits[:, :-1].log_softmax(-1)
        nll = -logp.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
        total += float(nll[keep].double().sum())
        count += int(keep.sum())
    if count == 0:
        raise CalibrationDataError("No position was scored: every label is -100 or masked (or no row has an image).")
    return total / count, count


@dataclass(frozen=True)
class ImageConditioning:
    """NLL of the text after each image with the right image and with another image of the same size.

    Each held-out sample is paired with the next sample of the same image grid (so the token layout
    is unchanged and only the pixels differ); samples alone in their grid are left out.
    """

    right_nll: float
    wrong_nll: float
    tokens: int
    pairs: int
    data_source: str

    @property
    def gap(self) -> float:
        return self.wrong_nll - self.right_nll

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gap": self.gap}


def _swap_images(batches) -> tuple[list[dict], list[dict]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, batch in enumerate(batches):
        grid = batch.get("image_grid_thw")
        if grid is None or grid.shape[0] != 1 or batch["input_ids"].shape[0] != 1:
            raise CalibrationDataError("image conditioning needs image+text batches of one sample with one image each.")
        groups.setdefault(tuple(grid.flatten().tolist()), []).append(index)
    right, wrong = [], []
    for members in groups.values():
        if len(members) < 2:
            continue
        for k, index in enumerate(members):
            other = members[(k + 1) % len(members)]
            right.append(batches[index])
            wrong.append({**batches[index], "pixel_values": batches[other]["pixel_values"]})
    if not right:
        raise CalibrationDataError("No two held-out images share a grid size; use more samples.")
    return right, wrong


def image_conditioning(model: torch.nn.Module, batches: CalibrationSet) -> ImageConditioning:
    """How much the right image lowers the NLL of its caption/answer, versus another image."""
    right, wrong = _swap_images(batches.batches)
    right_nll, tokens = mean_nll(model, right, after_image=True)
    wrong_nll, _ = mean_nll(model, wrong, after_image=True)
    return ImageConditioning(right_nll, wrong_nll, tokens, len(right), batches.source)


def evaluate_tiny(loaded: LoadedVLM) -> dict[str, Any]:
    """The held-out measurements ``training.json`` records (``EVAL_TEXT``, ``EVAL_IMAGES``)."""
    tokenizer, vocab = loaded.tokenizer, loaded.vocab_size
    corpus = heldout_text_batches(tokenizer, vocab_size=vocab, **EVAL_TEXT)
    generated = heldout_generated_text_batches(tokenizer, vocab_size=vocab, **EVAL_TEXT)
    images = heldout_image_text_batches(loaded, num_batches=EVAL_IMAGES, batch_size=1)
    result: dict[str, Any] = {"uniform_nll": math.log(vocab), "target_nll": 0.5 * math.log(vocab)}
    for name, batches in (("corpus_text", corpus), ("generated_text", generated)):
        nll, tokens = mean_nll(loaded.vlm, batches)
        result[name] = {"nll": nll, "tokens": tokens, "source": batches.source}
    result["image_text"] = image_conditioning(loaded.vlm, images).to_dict()
    return result


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------


def _evaluate_random_tiny(seed: int) -> dict[str, Any]:
    """The same measurements on the random-weight tiny model the training started from."""
    with tempfile.TemporaryDirectory(prefix="vlq-tiny-") as tmp:
        return evaluate_tiny(load_checkpoint(build_tiny_checkpoint(Path(tmp) / "tiny", seed=seed)))


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def save_trained(trained: TrainedTiny, dest: str | os.PathLike = TINY_TRAINED_DIR, *, overwrite: bool = False) -> Path:
    """Write the trained checkpoint (BF16 safetensors, config, tokenizer, processor) and ``training.json``.

    The held-out measurements are taken on the checkpoint as re-read from disk.  The folder appears
    complete or not at all (written to a temporary sibling, then renamed); an existing non-empty
    ``dest`` is replaced only with ``overwrite=True``.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise CalibrationDataError(f"Refusing to overwrite the non-empty folder {dest}; pass overwrite=True (--force).")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        trained.vlm.save_pretrained(tmp)
        trained.processor.save_pretrained(tmp)
        trained.tokenizer.save_pretrained(tmp)
        reloaded = load_checkpoint(tmp)
        if fingerprint_parameters(reloaded.vlm) != trained.fingerprint:
            raise CalibrationDataError(f"The checkpoint written to {tmp} does not read back as the trained weights.")
        record = {
            "version": RECIPE_VERSION,
            "model": "tiny-trained",
            "recipe": trained.recipe.to_dict(),
            "fingerprint": trained.fingerprint,
            "fingerprint_fp32": trained.fingerprint_fp32,
            "train_wall_s": round(trained.wall_s, 1),
            "train_setup_s": round(trained.setup_s, 1),
            "machine": {**_machine(), "num_threads": trained.recipe.num_threads,
                        "load_average_1min": [round(x, 2) for x in trained.load_average]},
            "data": {
                "corpus": f"vlq/data/{CALIBRATION_CORPUS.name}: all but the last {HELDOUT_CORPUS_SAMPLES} lines",
                "generated_text": {"seed": TRAIN_TEXT_SEED, "lines": trained.recipe.generated_text_lines},
                "images": {"seed": TRAIN_IMAGE_SEED, "samples": trained.recipe.image_samples},
                "heldout": f"corpus end (last {HELDOUT_CORPUS_SAMPLES} lines), generated text and images from seeds >= 2**32",
            },
            "losses": trained.losses,
            "heldout": evaluate_tiny(reloaded),
            "heldout_random_tiny": _evaluate_random_tiny(trained.recipe.init_seed),  # negative control
        }
        (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors make owner-only files; ship them readable
            path.chmod(0o755 if path.is_dir() else 0o644)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
