"""`pytest -m gpu`: ModelOpt's shipped CUDA recipe on the full-size model, and task accuracy at point a there.

``nvfp4_fp8_at_5p4bits`` (NVFP4 needs CUDA) read by vlq, searched LM-only on the 3B model (``--vlq-model`` or the
random 3B shape) with 16+16 steps instead of the recipe's 128 score samples; the decisions stay in the recipe's
formats at its target, lm_head and the vision tower BF16, and the differences are recorded.
"""

from __future__ import annotations

import gc

import pytest

from vlq import pipeline
from vlq.data.calibration import synthetic_text_calibration
from vlq.recipes.reading import read_recipe, recipe_scheme
from vlq.search.scheme import default_scheme

pytestmark = pytest.mark.gpu


def test_shipped_nvfp4_recipe_searches_lm_only_on_the_3b_model(gpu_pristine_vlm):
    import torch

    recipe = read_recipe("nvfp4_fp8_at_5p4bits")
    scheme = recipe_scheme(recipe, default_scheme("cuda", full_size=True), {"num_score_steps": 16, "num_calib_steps": 16})
    assert (scheme.formats, scheme.target_bits, scheme.num_score_steps) == (("nvfp4", "fp8"), 5.4, 16)
    assert any("lm_head searchable" in d for d in scheme.recipe.differences)
    loaded = pipeline.fresh_copy(gpu_pristine_vlm)
    try:
        calibration = synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, batch_size=scheme.batch_size,
                                                 num_batches=16, seq_len=scheme.seq_len)
        searched = pipeline.search(loaded, scheme, calibration)
        manifest = searched.manifest
        assert {g.chosen for g in manifest.groups} <= {"nvfp4", "fp8", "none"}
        assert manifest.achieved_bits <= 5.4 + 1e-6 and manifest.scheme.recipe.source == "nvfp4_fp8_at_5p4bits"
        assert all(c.ok for c in searched.checks), [c.verdict() for c in searched.checks if not c.ok]
    finally:
        del loaded
        gc.collect()
        torch.cuda.empty_cache()
