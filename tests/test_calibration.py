"""Calibration batches: local text through datasets, synthetic ids, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from vlq.data.calibration import IGNORE_INDEX, from_token_ids, synthetic_batches, synthetic_text_calibration, text_batches, vision_token_cap
from vlq.runtime.errors import CalibrationDataError


def test_text_batches_shape_and_labels(calibration, pristine_vlm):
    assert len(calibration) == 4 and calibration.seq_len == 32
    for batch in calibration:
        assert batch["input_ids"].shape == (1, 32)
        assert torch.equal(batch["labels"], batch["input_ids"])  # packed text: no padding
        assert int(batch["input_ids"].max()) < pristine_vlm.vocab_size


def test_text_batches_are_deterministic(pristine_vlm, calibration):
    again = text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=4, seq_len=32)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, calibration))


def test_jsonl_with_text_field(pristine_vlm, tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": "The model reads the image with great care. " * 4}) for _ in range(8)))
    cal = text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=2, seq_len=16, path=path)
    assert len(cal) == 2 and cal.source == str(path)


def test_jsonl_without_text_field(pristine_vlm, tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"caption": "hello"}) + "\n")
    with pytest.raises(CalibrationDataError, match="expected a 'text' column"):
        text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=1, path=path)


def test_empty_file(pristine_vlm, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    with pytest.raises(CalibrationDataError, match="empty|no non-empty"):
        text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=1, path=path)


def test_text_too_short(pristine_vlm, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a cat\n")
    with pytest.raises(CalibrationDataError, match="fewer than one row"):
        text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=1, seq_len=64, path=path)


def test_not_enough_text_for_the_batches(pristine_vlm, tmp_path):
    path = tmp_path / "some.txt"
    path.write_text("The model reads the image. " * 20 + "\n")
    with pytest.raises(CalibrationDataError, match="rows were asked"):
        text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=50, seq_len=64, path=path)


def test_wrong_vocabulary(pristine_vlm):
    ids = torch.full((2, 8), pristine_vlm.vocab_size + 5)
    with pytest.raises(CalibrationDataError, match="tokenized for another model"):
        from_token_ids(ids, vocab_size=pristine_vlm.vocab_size)


def test_missing_file(pristine_vlm, tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=1, path=tmp_path / "x.txt")


def test_steps_larger_than_data(calibration):
    with pytest.raises(CalibrationDataError, match="num_score_steps=9 but the calibration data has only 4 batches"):
        calibration.require_steps(2, 9)


def test_synthetic_batches_are_seeded():
    a = synthetic_batches(vocab_size=100, num_batches=3, seq_len=8, seed=1)
    b = synthetic_batches(vocab_size=100, num_batches=3, seq_len=8, seed=1)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert int(max(x["input_ids"].max() for x in a)) < 100
    assert IGNORE_INDEX not in a.batches[0]["labels"]


def test_synthetic_text_stays_below_the_vision_markers(pristine_vlm):
    """What models without a tokenizer calibrate on: no image/video pad or vision-start id ever appears."""
    config = pristine_vlm.config
    markers = {config.image_token_id, config.video_token_id, config.vision_start_token_id}
    capped = synthetic_text_calibration(config, vocab_size=pristine_vlm.vocab_size, num_batches=32, seq_len=128)
    assert capped.kind == "synthetic" and len(capped) == 32
    ids = set(torch.cat([b["input_ids"] for b in capped]).unique().tolist())
    assert max(ids) <= vision_token_cap(config) == min(markers) - 1
    # negative control: the same draw without the cap does hit the markers
    raw = synthetic_batches(vocab_size=pristine_vlm.vocab_size, num_batches=32, seq_len=128)
    assert markers & set(torch.cat([b["input_ids"] for b in raw]).unique().tolist())
