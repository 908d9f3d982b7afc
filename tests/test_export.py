"""Export safety: refusing to overwrite, atomic replacement, nothing half-written."""

from __future__ import annotations

import pytest

from vlq import pipeline
from vlq.runtime.errors import CheckpointError
from vlq.export.inspect import CheckpointQuantConfig, checkpoint_module_name, inspect_checkpoint
from vlq.export.export import export_checkpoint
from vlq.search.scheme import Scheme
from vlq.search.search import search_lm_only

FP8 = Scheme(formats=("fp8",), target_bits=8.0, num_calib_steps=1, num_score_steps=1, seq_len=32)


@pytest.fixture
def searched_fp8(fresh_vlm, calibration):
    """The tiny model after the pipeline's FP8 search (guards and manifest checked), ready to export."""
    return pipeline.search(fresh_vlm, FP8, calibration).loaded


def test_names_map_to_checkpoint_layout():
    assert checkpoint_module_name("model.language_model.layers.3.mlp.up_proj") == "model.layers.3.mlp.up_proj"
    assert checkpoint_module_name("model.visual.blocks.0.attn.qkv") == "visual.blocks.0.attn.qkv"
    assert checkpoint_module_name("lm_head") == "lm_head"


def test_fp8_export_layout(searched_fp8, tmp_path):
    result = export_checkpoint(searched_fp8, tmp_path / "ckpt")
    config = result.report.quant_config
    assert config.quant_algo == "FP8"
    assert {"lm_head", "visual*"} <= set(config.exclude_modules)
    assert set(result.marked_unquantized) == {"model.visual", "lm_head"}
    q = {l.name: l for l in result.report.quantized_layers()}
    assert q["model.layers.0.self_attn.q_proj"].weight_dtype == "F8_E4M3"
    assert {"weight_scale", "input_scale"} <= set(q["model.layers.0.self_attn.q_proj"].tensors)
    assert len(result.unified_groups) == 2 * searched_fp8.config.text_config.num_hidden_layers
    assert (tmp_path / "ckpt" / "tokenizer.json").exists(), "the export must serve on its own"


def test_export_refuses_non_empty_folder(searched_fp8, tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="already holds a checkpoint.*--overwrite"):
        export_checkpoint(searched_fp8, dest)
    assert (dest / "config.json").read_text() == "{}"


def test_failed_export_leaves_previous_checkpoint_intact(searched_fp8, tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "config.json").write_text('{"previous": true}')
    # the silent-garbage export (vision not excluded) fails its on-disk check before replacing anything
    with pytest.raises(CheckpointError, match="does not exclude the vision tower"):
        export_checkpoint(searched_fp8, dest, overwrite=True, exclude_unsearched=False)
    assert (dest / "config.json").read_text() == '{"previous": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no partial folder may be left behind"


def test_overwrite_replaces_atomically(searched_fp8, tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "stale.bin").write_text("old")
    export_checkpoint(searched_fp8, dest, overwrite=True)
    assert not (dest / "stale.bin").exists()
    assert CheckpointQuantConfig.read(dest).quant_algo == "FP8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unquantized_checkpoint_has_no_quantized_layers(tiny_checkpoint):
    """Negative control for the inspector: a BF16 checkpoint reports zero quantized layers."""
    report = inspect_checkpoint(tiny_checkpoint)
    assert report.quant_config.quant_algo is None
    assert report.quantized_layers() == ()
    assert report.check.ok


def test_inspector_catches_unshared_fused_scales(searched_fp8, tmp_path):
    from safetensors.torch import load_file, save_file

    dest = export_checkpoint(searched_fp8, tmp_path / "ckpt").path
    tensors = load_file(dest / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight_scale"] = tensors["model.layers.0.self_attn.k_proj.weight_scale"] * 2
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    check = inspect_checkpoint(dest).check
    assert not check.ok
    assert any("different weight_scale" in p and "layers.0.self_attn" in p for p in check.problems)


def test_inspector_catches_quantized_vision_tensor(searched_fp8, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    dest = export_checkpoint(searched_fp8, tmp_path / "ckpt").path
    tensors = load_file(dest / "model.safetensors")
    tensors["visual.blocks.0.attn.qkv.weight_scale"] = torch.tensor(1.0)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="visual.blocks.0.attn.qkv.weight_scale is a quantization scale"):
        inspect_checkpoint(dest).check.require()


def test_export_of_a_search_that_quantized_vision_and_lm_head_is_refused(fresh_vlm, calibration, tmp_path, monkeypatch):
    """Negative control: the unguarded mask search quantizes the tied lm_head and the vision tower;
    the export's on-disk check refuses it and leaves nothing behind."""
    import vlq.checks.check

    scheme = Scheme(formats=("fp8",), target_bits=8.0, strategy="mask", num_calib_steps=1, num_score_steps=1, seq_len=32)
    search_lm_only(fresh_vlm, scheme, calibration, disable_vision=False, exclude_cost=False)
    # the message lists the first SHOWN_PROBLEMS problems; list them all here to pin both causes
    monkeypatch.setattr(vlq.checks.check, "SHOWN_PROBLEMS", 1000)
    with pytest.raises(CheckpointError, match=r"(?s)checkpoint on disk \(ckpt\) failed \(\d+ problems\).*vision tensor "
                       r"visual\.blocks\.0\.attn\.qkv\.weight has dtype F8_E4M3.*does not exclude lm_head"):
        export_checkpoint(fresh_vlm, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
