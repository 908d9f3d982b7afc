"""Generated text: sentences of a small fixed world (stories, arithmetic, counting, facts, copying) from a seeded
generator, the same on every machine; the tiny model trains on them and is measured on held-out ones."""

from __future__ import annotations

import torch

from ..runtime.errors import CalibrationDataError

from .calibration import CalibrationSet, from_token_ids, sample_token_ids
from .heldout import HELDOUT_PREFIX, HELDOUT_SEED_BASE


#: Generated training text uses this seed; held-out generated text uses HELDOUT_SEED_BASE + seed.
TRAIN_TEXT_SEED = 1
GENERATED_TEXT_SOURCE = "generated_text"
_NOUNS = (  # (singular, plural)
    ("robot", "robots"), ("cat", "cats"), ("engineer", "engineers"), ("bird", "birds"), ("student", "students"),
    ("farmer", "farmers"), ("pilot", "pilots"), ("child", "children"), ("teacher", "teachers"), ("painter", "painters"),
    ("scheduler", "schedulers"), ("network", "networks"),
)
_ADJECTIVES = ("small", "old", "curious", "tired", "happy", "quiet", "young", "clever", "tiny", "busy")
_VERBS = (  # (third person singular, plural)
    ("paints", "paint"), ("reads", "read"), ("carries", "carry"), ("watches", "watch"), ("repairs", "repair"),
    ("counts", "count"), ("finds", "find"), ("builds", "build"), ("compares", "compare"), ("describes", "describe"),
)
_OBJECTS = (
    "a wooden table", "the old bridge", "a paper map", "the blue window", "the evening news", "a long letter",
    "the red bicycle", "a list of numbers", "the hidden states", "a short caption", "the mountain path", "every token",
)
_PLACES = (
    "in the garden", "near the river", "before sunrise", "after lunch", "under a cloudy sky", "at the station",
    "in the bright room", "with great care", "at a steady pace", "for the next test",
)
_MOODS = ("happy", "tired", "busy", "quiet", "proud", "hungry")
_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_FACTS = (  # a fixed world: the same thing always has the same color / sound / corner count
    "The lemon is yellow.", "The grass is green.", "The sky is blue.", "Snow is white.", "Coal is black.",
    "The tomato is red.", "The orange is orange.", "The plum is purple.", "The dog says woof.", "The cow says moo.",
    "The cat says meow.", "The duck says quack.", "A triangle has three corners.", "A square has four corners.",
    "A circle has no corners.", "A cross has twelve corners.", "Ice is cold.", "Fire is hot.",
)
_CODE_WORDS = (
    "red", "green", "blue", "yellow", "white", "black", "orange", "purple", "circle", "square", "triangle", "cross",
    "river", "table", "bridge", "window", "map", "letter", "bicycle", "garden", "station", "token", "caption", "path",
)


def _sentence_story(rng) -> str:
    plural = bool(rng.integers(2))
    noun = _NOUNS[int(rng.integers(len(_NOUNS)))][int(plural)]
    verb = _VERBS[int(rng.integers(len(_VERBS)))][int(plural)]
    adjective = _ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]
    determiner = ("The", "Two", "Many", "Some")[int(rng.integers(4))] if plural else ("The", "A", "One")[int(rng.integers(3))]
    thing = _OBJECTS[int(rng.integers(len(_OBJECTS)))]
    place = _PLACES[int(rng.integers(len(_PLACES)))]
    mood = _MOODS[int(rng.integers(len(_MOODS)))]
    pronoun, be = ("They", "are") if plural else ("It", "is")
    return f"{determiner} {adjective} {noun} {verb} {thing} {place}. {pronoun} {be} {mood}."


def _sentence_arithmetic(rng) -> str:
    a, b = (int(x) for x in rng.integers(0, 13, size=2))
    kind = int(rng.integers(4))
    if kind == 0:
        return f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"{a} minus {b} is {a - b}."
    if kind == 2:
        return f"{a} times {b} is {a * b}."
    return f"Which is larger, {a} or {b}? {max(a, b)}." if a != b else f"{a} and {b} are equal."


def _sentence_counting(rng) -> str:
    kind = int(rng.integers(3))
    if kind == 0:
        start, step, count = int(rng.integers(0, 30)), int(rng.integers(1, 6)), int(rng.integers(4, 8))
        items = ", ".join(str(start + step * k) for k in range(count))
        return f"Counting from {start} by {step}: {items}."
    if kind == 1:
        start, count = int(rng.integers(0, 15)), int(rng.integers(3, 7))
        items = ", ".join(_NUMBER_WORDS[start + k] for k in range(count))
        return f"In words: {items}."
    start, count = int(rng.integers(7)), int(rng.integers(2, 5))
    days = ", ".join(_DAYS[(start + k) % 7] for k in range(1, count + 1))
    return f"After {_DAYS[start]} come {days}."


def _sentence_fact(rng) -> str:
    return _FACTS[int(rng.integers(len(_FACTS)))]


def _sentence_copy(rng) -> str:
    words = [_CODE_WORDS[int(i)] for i in rng.integers(len(_CODE_WORDS), size=int(rng.integers(3, 6)))]
    listed = " ".join(words)
    return f"The code is {listed}. Again: {listed}."
_SENTENCE_KINDS = (_sentence_story, _sentence_story, _sentence_arithmetic, _sentence_counting, _sentence_fact, _sentence_copy)


def generated_text_samples(num_samples: int, *, seed: int = TRAIN_TEXT_SEED) -> list[str]:
    """``num_samples`` lines of 3-7 generated sentences each; the same seed gives the same lines everywhere.

    The sentences have structure a small LM can learn and quantization can disturb: subject-verb and
    pronoun agreement, sums, differences and products of numbers up to 12, arithmetic progressions,
    number words and weekdays in order, a fixed set of facts, and word lists repeated later in the line
    (which needs attention to copy).  numpy's PCG64 generator makes the text machine-independent.
    """
    import numpy as np

    if num_samples < 1:
        raise CalibrationDataError(f"num_samples must be at least 1, got {num_samples}.")
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(num_samples):
        count = int(rng.integers(3, 8))
        lines.append(" ".join(_SENTENCE_KINDS[int(rng.integers(len(_SENTENCE_KINDS)))](rng) for _ in range(count)))
    return lines


def heldout_generated_text_batches(
    tokenizer, *, vocab_size: int, num_batches: int, batch_size: int = 1, seq_len: int = 64, seed: int = 0,
) -> CalibrationSet:
    """Generated text from seed ``HELDOUT_SEED_BASE + seed`` (training text uses ``TRAIN_TEXT_SEED``).

    Lines are packed like ``vlq.data.calibration.text_batches`` (EOS between them) into
    ``num_batches`` x ``batch_size`` rows of ``seq_len`` tokens.
    """
    if not 0 <= seed < HELDOUT_SEED_BASE:
        raise CalibrationDataError(f"held-out seed must lie in [0, 2**32) (it is offset by 2**32), got {seed}.")
    if num_batches < 1 or batch_size < 1 or seq_len < 2:
        raise CalibrationDataError(
            f"held-out generated text needs num_batches>=1, batch_size>=1, seq_len>=2; got {num_batches}, {batch_size}, {seq_len}."
        )
    needed = num_batches * batch_size * seq_len
    lines = max(2, needed // 64)
    while True:  # the first k lines of a seed do not depend on how many are generated
        stream = pack(tokenizer, generated_text_samples(lines, seed=HELDOUT_SEED_BASE + seed))
        if len(stream) >= needed:
            break
        lines *= 2
    ids = torch.tensor(stream[:needed], dtype=torch.long).view(num_batches * batch_size, seq_len)
    source = f"{HELDOUT_PREFIX}{GENERATED_TEXT_SOURCE}(seed={HELDOUT_SEED_BASE + seed}, lines={lines})"
    return from_token_ids(ids, vocab_size=vocab_size, batch_size=batch_size, source=source)


def pack(tokenizer, samples: list[str]) -> list[int]:
    """Token ids of ``samples`` with EOS after each, as ``vlq.data.calibration.text_batches`` packs them."""
    return [token for sample in samples for token in sample_token_ids(tokenizer, sample)]
