"""A model split over devices (``device_map`` from :mod:`vlq.search.placement`): where each part goes, and the same
search on a split model — guards, manifest checks, export and on-disk checks unchanged.

On CPU the split is emulated with accelerate's disk offload: the second half of the decoder layers lives in
an offload folder and is brought in by accelerate's hooks at each forward, the same hooks that move
activations between GPUs of a real split.  The run over two GPUs is tests/test_gpu_memory.py's 72B case.
"""

from __future__ import annotations

import json

import pytest

from vlq.runtime.errors import ResourceError
from vlq.inputs.requests import ModelRequest, random_shape_config
from vlq.search.placement import LM, VISION, place
from vlq.search.plan import GIB, ModelShape
from vlq.search.scheme import Scheme

SPLIT_SCHEME = Scheme(formats=("fp8",), target_bits=12.0, num_calib_steps=2, num_score_steps=2, seq_len=32)


def _shape(name):
    return ModelShape.from_config(random_shape_config(name), name)


def test_one_device_is_a_no_op():
    placement = place(_shape("qwen2.5-vl-7b-random"), ["cuda:0"])
    assert dict(placement.device_map) == {"": "cuda:0"} and not placement.split


def test_72b_over_two_gpus_is_balanced_with_vision_first_and_lm_head_last():
    shape = _shape("qwen2.5-vl-72b-random")
    placement = place(shape, ["cuda:0", "cuda:1"], budget_bytes=130 * GIB)
    dm = placement.device_map
    assert dm[VISION] == dm[f"{LM}.embed_tokens"] == "cuda:0" and dm["lm_head"] == dm[f"{LM}.norm"] == "cuda:1"
    layers = [dm[f"{LM}.layers.{i}"] for i in range(shape.layers)]
    assert layers == sorted(layers) and sum(placement.layers_per_device) == shape.layers  # contiguous, all placed
    assert max(placement.planned_bytes) <= 130 * GIB and max(placement.planned_bytes) / min(placement.planned_bytes) < 1.1


def test_tied_lm_head_stays_with_the_embeddings():
    placement = place(_shape("qwen2.5-vl-3b-random"), ["cuda:0", "cuda:1"])
    assert placement.device_map["lm_head"] == placement.device_map[f"{LM}.embed_tokens"] == "cuda:0"


def test_a_split_that_cannot_fit_is_refused():
    with pytest.raises(ResourceError, match="does not fit 2 devices.*use more devices"):
        place(_shape("qwen2.5-vl-72b-random"), ["cuda:0", "cuda:1"], budget_bytes=60 * GIB)


@pytest.fixture(scope="module")
def split_request(tiny_checkpoint, tmp_path_factory):
    shape = ModelShape.from_config(json.loads((tiny_checkpoint / "config.json").read_text()), "tiny")
    placement = place(shape, ["cpu", "disk"])
    assert placement.split and "disk" in placement.device_map.values()
    return ModelRequest(str(tiny_checkpoint), "cpu", device_map=dict(placement.device_map),
                        offload_folder=str(tmp_path_factory.mktemp("offload")))


def test_split_search_equals_the_one_device_search(split_request, pristine_vlm, calibration, tmp_path):
    from vlq import pipeline

    split = pipeline.load_model(split_request)
    offloaded = [n for n, m in split.vlm.named_modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    assert offloaded, "the emulated split put nothing behind accelerate's offload hooks"
    searched = pipeline.search(split, SPLIT_SCHEME, calibration)  # guards and manifest checks are required
    whole = pipeline.search(pipeline.fresh_copy(pristine_vlm), SPLIT_SCHEME, calibration)
    assert {g.name: g.chosen for g in searched.manifest.groups} == {g.name: g.chosen for g in whole.manifest.groups}
    assert searched.result.achieved_bits == pytest.approx(whole.result.achieved_bits)
    exported = pipeline.export(searched, tmp_path / "checkpoint")
    assert all(c.ok for c in exported.checks), [(c.name, c.problems) for c in exported.checks if not c.ok]


def test_guards_still_catch_a_vision_quantizer_on_a_split_model(split_request, calibration):
    """Negative control: the unguarded whole-VLM search quantizes the vision tower of the split model too."""
    from vlq import pipeline
    from vlq.search.guards import VisionGuard
    from vlq.search.search import search_lm_only

    split = pipeline.load_model(split_request)
    result = search_lm_only(split, SPLIT_SCHEME.with_(strategy="mask"), calibration, disable_vision=False, exclude_cost=False)
    assert not VisionGuard(split).check(result).ok
