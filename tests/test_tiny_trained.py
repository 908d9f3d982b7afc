"""The tiny Qwen2.5-VL with learned weights (``tiny-trained``): it loads through the local-checkpoint path,
has learned its text and its images (measured here, each with the random-weight ``tiny`` as negative
control), was trained on data disjoint from the held-out data, and is reproducible (``-m slow``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlq.data.calibration import from_token_ids, generated_image_text_samples, load_text_samples, text_batches
from vlq.fidelity.metrics import logits_forward, measure_fidelity
from vlq.data.heldout import HELDOUT_SEED_BASE, find_overlap, heldout_image_text_batches, heldout_text_batches, require_disjoint
from vlq.inputs.requests import TINY_TRAINED, ModelRequest, resolve_model_source
from vlq.data.shipped import TINY_TRAINED_DIR
from vlq.data.models import fingerprint_parameters, load_vlm
from vlq.data.training import (
    EVAL_IMAGES, EVAL_TEXT, HELDOUT_CORPUS_SAMPLES, TRAIN_IMAGE_SEED, TRAINING_RECORD, TrainingRecipe, image_conditioning, mean_nll,
    train_tiny, training_image_set, training_text_set,
)
from vlq.data.generated_text import TRAIN_TEXT_SEED, generated_text_samples, heldout_generated_text_batches


@pytest.fixture(scope="module")
def trained():
    """The shipped weights, loaded by name. Read-only."""
    loaded = load_vlm(TINY_TRAINED)
    before = fingerprint_parameters(loaded.vlm)
    yield loaded
    assert fingerprint_parameters(loaded.vlm) == before, "a test changed the shared tiny-trained model"


@pytest.fixture(scope="module")
def record():
    return json.loads((TINY_TRAINED_DIR / TRAINING_RECORD).read_text())


@pytest.fixture(scope="module")
def heldout_text(trained):
    tokenizer, vocab = trained.tokenizer, trained.vocab_size
    return {
        "corpus_text": heldout_text_batches(tokenizer, vocab_size=vocab, **EVAL_TEXT),
        "generated_text": heldout_generated_text_batches(tokenizer, vocab_size=vocab, **EVAL_TEXT),
    }


@pytest.fixture(scope="module")
def heldout_images(trained):
    return heldout_image_text_batches(trained, num_batches=EVAL_IMAGES, batch_size=1)


# ---- loading ----------------------------------------------------------------------------------------


def test_shipped_weights_load_as_tiny_trained(trained, record, pristine_vlm):
    assert resolve_model_source(TINY_TRAINED) == TINY_TRAINED and ModelRequest(TINY_TRAINED).source == TINY_TRAINED
    assert trained.source == TINY_TRAINED and trained.path == TINY_TRAINED_DIR.resolve()
    assert {p.dtype for p in trained.vlm.parameters()} == {torch.bfloat16}
    assert trained.processor is not None and trained.tied_lm_head
    # the weights on disk are the ones the recorded training run produced ...
    assert fingerprint_parameters(trained.vlm) == record["fingerprint"]
    assert TrainingRecipe.from_dict(record["recipe"]) == TrainingRecipe()  # ... with today's default recipe
    # ... and they are the tiny model's architecture and tokenizer, with other weights
    config, tiny_config = trained.config.to_dict(), pristine_vlm.config.to_dict()
    assert {k: v for k, v in config.items() if k != "_name_or_path"} == {k: v for k, v in tiny_config.items() if k != "_name_or_path"}
    assert trained.tokenizer.get_vocab() == pristine_vlm.tokenizer.get_vocab()
    assert trained.vision.linear_names == pristine_vlm.vision.linear_names
    assert trained.vision.fingerprint != pristine_vlm.vision.fingerprint  # the vision tower was trained too
    assert fingerprint_parameters(pristine_vlm.vlm) != record["fingerprint"]


def test_training_recipe_validates_and_round_trips():
    recipe = TrainingRecipe()
    assert TrainingRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    with pytest.raises(ValueError, match=r"TrainingRecipe.steps must be an int >= 1, got 0"):
        TrainingRecipe(steps=0)
    with pytest.raises(ValueError, match=r"image_samples=4 cannot fill one image batch of 8"):
        TrainingRecipe(image_samples=4)
    with pytest.raises(ValueError, match=r"Unknown training recipe keys \['lr'\]"):
        TrainingRecipe.from_dict({"lr": 1.0})
    with pytest.raises(ValueError, match=r"version 2 is not supported"):
        TrainingRecipe(version=2)


# ---- what it has learned -------------------------------------------------------------------------------


@pytest.mark.parametrize("data", ["corpus_text", "generated_text"])
def test_heldout_text_nll_is_below_half_of_uniform(trained, pristine_vlm, record, heldout_text, data):
    batches = heldout_text[data]
    uniform = math.log(trained.vocab_size)
    nll, tokens = mean_nll(trained.vlm, batches)
    assert tokens == EVAL_TEXT["num_batches"] * EVAL_TEXT["batch_size"] * (EVAL_TEXT["seq_len"] - 1)
    assert nll <= 0.5 * uniform, f"{data}: held-out NLL {nll:.3f} > {0.5 * uniform:.3f}"
    assert nll == pytest.approx(record["heldout"][data]["nll"], rel=0.02)  # the record tells the truth
    # vlq.fidelity.metrics scores the same positions and finds the same NLL
    forward = logits_forward(trained.vlm)
    same = measure_fidelity(forward, forward, batches, measurement_point="fake_quant")
    assert same.tokens == tokens and same.kld_max == 0.0 and same.nll_base == pytest.approx(nll, rel=1e-4)
    # negative control: the random-weight tiny model is near uniform on the same held-out tokens
    random_nll, _ = mean_nll(pristine_vlm.vlm, batches)
    assert random_nll > 0.9 * uniform


def test_the_right_image_lowers_caption_nll(trained, pristine_vlm, record, heldout_images):
    learned = image_conditioning(trained.vlm, heldout_images)
    assert learned.pairs >= EVAL_IMAGES - 4 and learned.tokens > 20 * learned.pairs
    assert learned.gap >= 0.1, learned  # nats per token of text after the image (most of it does not depend on it)
    assert learned.wrong_nll >= 1.5 * learned.right_nll, learned
    recorded = record["heldout"]["image_text"]
    assert (learned.pairs, learned.tokens, learned.data_source) == (recorded["pairs"], recorded["tokens"], recorded["data_source"])
    assert (learned.right_nll, learned.wrong_nll) == pytest.approx((recorded["right_nll"], recorded["wrong_nll"]), rel=0.02)
    # negative control: with random weights the image hardly matters (it fails the same criterion)
    control = image_conditioning(pristine_vlm.vlm, heldout_images)
    assert control.pairs == learned.pairs and control.tokens == learned.tokens
    assert control.wrong_nll < 1.5 * control.right_nll and abs(control.wrong_nll / control.right_nll - 1) < 0.01, control
    assert control.right_nll > 0.9 * math.log(pristine_vlm.vocab_size)


# ---- training data vs held-out data --------------------------------------------------------------------


def test_training_text_is_disjoint_from_heldout_text(trained, heldout_text):
    tokenizer, vocab = trained.tokenizer, trained.vocab_size
    training = training_text_set(tokenizer, vocab_size=vocab)
    assert training.source.startswith("training:vlq/data/calibration_corpus.txt(samples 0-99 of 140)+generated_text(seed=1")
    for batches in heldout_text.values():
        assert require_disjoint(batches, training).checked == len(batches) * EVAL_TEXT["batch_size"]
    # the largest held-out corpus text the reserve allows (every token of the last lines) is disjoint too
    samples = load_text_samples()
    reserve = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1 for s in samples[-HELDOUT_CORPUS_SAMPLES:])
    largest = heldout_text_batches(tokenizer, vocab_size=vocab, num_batches=reserve // 64, seq_len=64)
    assert largest.source.endswith(f"(samples {len(samples) - HELDOUT_CORPUS_SAMPLES}-{len(samples) - 1} of {len(samples)})")
    require_disjoint(largest, training)
    # negative control: text packed from the whole corpus (front to back) contains the held-out rows
    everything = text_batches(tokenizer, vocab_size=vocab, num_batches=_corpus_rows(tokenizer, 64), seq_len=64)
    assert find_overlap(heldout_text["corpus_text"], everything).shared > 0
    # negative control: rows generated from the training seed are found in the training text
    eos = tokenizer.eos_token_id
    stream = [t for line in generated_text_samples(16, seed=TRAIN_TEXT_SEED)
              for t in tokenizer(line, add_special_tokens=False)["input_ids"] + [eos]]
    same_seed = from_token_ids(torch.tensor(stream[: 16 * 64]).view(16, 64), vocab_size=vocab, source="training seed")
    assert find_overlap(same_seed, training).shared == 16


def _corpus_rows(tokenizer, seq_len: int) -> int:
    return sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1 for s in load_text_samples()) // seq_len


def test_training_images_are_disjoint_from_heldout_images(trained, heldout_images):
    prefix = training_image_set(trained.processor, vocab_size=trained.vocab_size, num_samples=192)
    assert prefix.source == "image_text:generated(seed=2147483648, n=192)"
    assert require_disjoint(heldout_images, prefix).checked == EVAL_IMAGES
    # negative control: the same comparison finds images that are shared
    assert find_overlap(prefix, prefix).shared == prefix.num_samples
    # every training image (not only the prefix), compared pixel by pixel before processing
    recipe = TrainingRecipe()
    training_pixels = {s["image"].tobytes() for s in generated_image_text_samples(recipe.image_samples, seed=TRAIN_IMAGE_SEED)}
    heldout_pixels = [s["image"].tobytes() for s in generated_image_text_samples(EVAL_IMAGES, seed=HELDOUT_SEED_BASE)]
    assert len(training_pixels) == recipe.image_samples and not training_pixels.intersection(heldout_pixels)


# ---- reproducibility -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_twice_gives_identical_weights():
    recipe = TrainingRecipe(steps=4, generated_text_lines=64, image_samples=32)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    first, second = train_tiny(recipe), train_tiny(recipe)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    assert first.fingerprint_fp32 == second.fingerprint_fp32 and first.fingerprint == second.fingerprint
    assert first.losses == second.losses
    assert fingerprint_parameters(first.vlm) == first.fingerprint
    # negative control: another data order gives other weights
    assert train_tiny(recipe.replace(seed=1)).fingerprint != first.fingerprint
