"""Loader: one code path for local checkpoints, the tiny model and the 3B architecture."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from vlq.runtime.errors import ModelSourceError
from vlq.data.shipped import QWEN25_VL_3B_CONFIG
from vlq.data.models import build_3b_random, fingerprint_parameters, load_vlm
from vlq.data.tiny import build_tiny_checkpoint
from vlq.inputs.requests import resolve_model_source


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_checkpoint_is_deterministic(tiny_checkpoint, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again")
    assert _sha(again / "model.safetensors") == _sha(tiny_checkpoint / "model.safetensors")
    assert _sha(again / "tokenizer.json") == _sha(tiny_checkpoint / "tokenizer.json")


def test_tiny_checkpoint_is_a_real_qwen25_vl(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert (tiny_checkpoint / "model.safetensors").exists()


def test_loader_returns_the_parts(pristine_vlm, vlm, language_model, vision_modules):
    assert type(vlm).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(language_model).__name__ == "Qwen2_5_VLTextModel"
    assert pristine_vlm.lm_path == "model.language_model"
    assert vlm.get_submodule(pristine_vlm.lm_path) is language_model
    assert vision_modules.root == "model.visual"
    assert vision_modules.linear_names and all(n.startswith("model.visual.") for n in vision_modules.linear_names)
    assert vision_modules.dtypes == ("torch.bfloat16",)
    assert pristine_vlm.tied_lm_head, "the tiny model ties lm_head to the embeddings, like the 3B model"
    assert pristine_vlm.source == "tiny" and pristine_vlm.processor is not None


def test_extracted_language_model_returns_hidden_states_only(pristine_vlm, calibration):
    batch = calibration.batches[0]
    with torch.no_grad():
        out = pristine_vlm.language_model(input_ids=batch["input_ids"])
        logits = pristine_vlm.vlm(input_ids=batch["input_ids"]).logits
    assert not hasattr(out, "logits") or getattr(out, "logits", None) is None
    hidden = out.last_hidden_state
    assert hidden.shape[-1] == pristine_vlm.config.text_config.hidden_size
    torch.testing.assert_close(pristine_vlm.lm_head(hidden), logits)


def test_processor_runs_image_and_text(pristine_vlm):
    from PIL import Image

    image = Image.new("RGB", (84, 84), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the image?"}]}]
    text = pristine_vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = pristine_vlm.processor(text=[text], images=[image], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == pristine_vlm.config.image_token_id).sum())
    assert n_image_tokens == inputs["image_grid_thw"].prod().item() // 4 > 0
    with torch.no_grad():
        logits = pristine_vlm.vlm(**inputs).logits
    assert torch.isfinite(logits).all()


def test_3b_architecture_matches_published_config():
    loaded = build_3b_random(device="meta")
    n_params = sum(p.numel() for p in loaded.vlm.parameters())
    assert 3.7e9 < n_params < 3.8e9
    text = loaded.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (2048, 36, 2, 151936)
    assert loaded.config.vision_config.depth == 32
    assert loaded.tied_lm_head
    assert json.loads(QWEN25_VL_3B_CONFIG.read_text())["model_type"] == "qwen2_5_vl"


def _float32_buffers(model) -> dict[str, torch.dtype]:
    return {name: b.dtype for name, b in model.named_buffers() if name.endswith("inv_freq")}


def test_random_shapes_keep_rope_in_float32_like_from_pretrained(pristine_vlm):
    """A checkpoint loaded by from_pretrained keeps rotary inv_freq (text and vision) in float32; the random
    3B shape must too, or its BF16 reference and point a run a coarser RoPE than the checkpoint rebuilt from
    disk.  Negative control: the plain ``.to(bfloat16)`` the builder used to apply casts them."""
    loaded = _float32_buffers(pristine_vlm.vlm)
    assert len(loaded) == 4 and set(loaded.values()) == {torch.float32}, loaded  # inv_freq, original_inv_freq
    built = build_3b_random(device="meta").vlm
    assert _float32_buffers(built) == loaded
    assert set(_float32_buffers(built.to(torch.bfloat16)).values()) == {torch.bfloat16}


def test_rope_cast_to_bf16_moves_cos_sin_at_long_positions(pristine_vlm):
    """Why it matters, measured on the tiny model: float32 inv_freq (what vlq keeps) vs bf16 (the old cast)."""
    rotary = pristine_vlm.language_model.rotary_emb
    x = torch.zeros(1, 512, 1, dtype=torch.bfloat16)
    positions = torch.arange(512)[None, None, :].expand(3, 1, -1)
    cos32, _ = rotary(x, positions)
    saved = rotary.inv_freq
    try:
        rotary.inv_freq = saved.to(torch.bfloat16)
        cos16, _ = rotary(x, positions)
    finally:
        rotary.inv_freq = saved
    assert (cos32.float() - cos16.float()).abs().max() > 0.1


def test_fingerprint_sees_one_changed_weight(fresh_vlm):
    before = fingerprint_parameters(fresh_vlm.vlm)
    with torch.no_grad():
        fresh_vlm.lm_head.weight[0, 0] += 1
    assert fingerprint_parameters(fresh_vlm.vlm) != before


# ---- bad inputs ----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist.*'tiny'"):
        load_vlm(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve_model_source(f)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_source(tmp_path)


def test_broken_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="not valid JSON"):
        resolve_model_source(tmp_path)


def test_text_only_llm_is_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match=r"model_type='qwen2' \(a text-only LLM\)"):
        load_vlm(tmp_path)


def test_other_vlm_family_is_refused(tiny_checkpoint, tmp_path):
    other = tmp_path / "llava"
    shutil.copytree(tiny_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llava"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="another vision-language family"):
        load_vlm(other)


def test_already_quantized_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    other = tmp_path / "quantized"
    shutil.copytree(tiny_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="already quantized"):
        load_vlm(other)


def test_build_refuses_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ModelSourceError, match="non-empty"):
        build_tiny_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
