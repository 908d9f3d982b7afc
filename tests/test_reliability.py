"""Reliability and safety (issue 6): bad inputs, interrupted work, resumable searches, safe loading.

Interrupts are real: ``vlq`` runs in a subprocess with ``VLQ_TEST_KILL_AFTER`` set, and SIGKILLs
itself at the named point (right after the scored search state is saved, or right after the
checkpoint files are written to the temporary export folder).  Each protection has a negative
control showing what happens without it.
"""

from __future__ import annotations

import re

import copy
import json
import os
import shutil
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlq.calibration import text_batches
from vlq.errors import ModelSourceError, SearchStateError
from vlq.manifest import Manifest
from vlq.schemes import Scheme
from vlq.search import search_lm_only
from vlq.state import modelopt_state_io, sidecar_path

# what `vlq search --calib-steps 2 --score-steps 2 --seq-len 32` searches (the CLI's default scheme)
SCHEME = Scheme(num_calib_steps=2, num_score_steps=2, seq_len=32)
STEP_ARGS = ("--calib-steps", "2", "--score-steps", "2", "--seq-len", "32")


def _vlq(*args, cwd, kill_after=None, timeout=300):
    env = dict(os.environ)
    env.pop("VLQ_TEST_KILL_AFTER", None)
    if kill_after:
        env["VLQ_TEST_KILL_AFTER"] = kill_after
    return subprocess.run([sys.executable, "-m", "vlq.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli_calibration(pristine_vlm):
    """The batches `vlq search` builds for SCHEME from the shipped corpus."""
    return text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=2, seq_len=32)


@pytest.fixture(scope="module")
def killed_search(tiny_checkpoint, tmp_path_factory):
    """A `vlq search` SIGKILLed right after ModelOpt saved the scored state."""
    run = tmp_path_factory.mktemp("killed") / "run"
    proc = _vlq("search", "--model", str(tiny_checkpoint), "--out", str(run), *STEP_ARGS, cwd=run.parent, kill_after="scoring")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def uninterrupted(pristine_vlm, cli_calibration):
    return search_lm_only(copy.deepcopy(pristine_vlm), SCHEME, cli_calibration)


def _copy_state(run: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("search_state.pth", "search_state.pth.vlq.json"):
        if (run / name).exists():
            shutil.copy2(run / name, dest / name)
    return dest / "search_state.pth"


# ---- 2. resumable search -------------------------------------------------------------------------


def test_killed_search_left_a_scored_state_and_no_manifest(killed_search):
    state = torch.load(killed_search / "search_state.pth", weights_only=True)
    assert state["candidate_stats"], "the kill came after scoring: the scores are saved"
    assert sidecar_path(killed_search / "search_state.pth").exists()
    assert not (killed_search / "manifest.json").exists()
    assert [p.name for p in killed_search.iterdir() if p.name.endswith(".tmp")] == []


def test_resume_skips_scoring_and_reaches_the_same_manifest(killed_search, pristine_vlm, cli_calibration, uninterrupted, tmp_path):
    state = _copy_state(killed_search, tmp_path)
    resumed = search_lm_only(copy.deepcopy(pristine_vlm), SCHEME, cli_calibration, checkpoint=state)
    assert resumed.restored_from_checkpoint and resumed.score_calls == 0, "no scoring step may run on resume"
    assert uninterrupted.score_calls > 0, "negative control: a search without a saved state does score"
    a, b = Manifest.from_search(resumed), Manifest.from_search(uninterrupted)
    assert [(g.name, g.chosen) for g in a.groups] == [(g.name, g.chosen) for g in b.groups]
    assert [c.score for g in a.groups for c in g.candidates] == pytest.approx([c.score for g in b.groups for c in g.candidates], rel=1e-5)
    assert a.achieved_bits == pytest.approx(b.achieved_bits)


@pytest.fixture(scope="module")
def resumed_cli_run(killed_search, tiny_checkpoint, tmp_path_factory):
    """The killed run folder, resumed by running the same `vlq search` again."""
    run = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(killed_search, run)
    proc = _vlq("search", "--model", str(tiny_checkpoint), "--out", str(run), *STEP_ARGS, cwd=run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc.stdout


def test_cli_resume_after_kill(resumed_cli_run, uninterrupted):
    run, stdout = resumed_cli_run
    assert "no scoring step ran" in stdout
    manifest = Manifest.load(run / "manifest.json")
    expected = Manifest.from_search(uninterrupted)
    assert [(g.name, g.chosen) for g in manifest.groups] == [(g.name, g.chosen) for g in expected.groups]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(formats=("fp8",), target_bits=8.0), r"formats: saved fp8\+int4_awq, now fp8"),
        (dict(method="kl_div"), r"method: saved 'gradient', now 'kl_div'"),
        (dict(strategy="mask"), r"strategy: saved 'extract', now 'mask'"),
        (dict(num_score_steps=1), r"num_score_steps: saved 2, now 1"),
    ],
    ids=["formats", "method", "strategy", "score-steps"],
)
def test_state_from_other_scheme_is_refused_by_name(killed_search, pristine_vlm, cli_calibration, tmp_path, change, message):
    state = _copy_state(killed_search, tmp_path)
    with pytest.raises(SearchStateError, match=message):
        search_lm_only(copy.deepcopy(pristine_vlm), SCHEME.with_(**change), cli_calibration, checkpoint=state)


def _other_weights(pristine_vlm):
    other = copy.deepcopy(pristine_vlm)
    with torch.no_grad():
        other.language_model.layers[0].mlp.down_proj.weight.mul_(1.5)
    return other


def test_state_from_another_model_is_refused(killed_search, pristine_vlm, cli_calibration, tmp_path):
    state = _copy_state(killed_search, tmp_path)
    with pytest.raises(SearchStateError, match=r"model: saved from 'tiny'.*weights differ \(parameter model\.language_model\.layers\.0\.mlp\.down_proj\.weight"):
        search_lm_only(_other_weights(pristine_vlm), SCHEME, cli_calibration, checkpoint=state)


def test_without_the_settings_record_another_model_silently_reuses_scores(killed_search, pristine_vlm, cli_calibration, tmp_path):
    """Negative control: ModelOpt alone checks formats/method/groups, not weights or data."""
    state = _copy_state(killed_search, tmp_path)
    sidecar_path(state).unlink()
    result = search_lm_only(_other_weights(pristine_vlm), SCHEME, cli_calibration, checkpoint=state)
    assert result.restored_from_checkpoint and result.score_calls == 0


def test_state_from_other_calibration_data_is_refused(killed_search, pristine_vlm, tmp_path):
    state = _copy_state(killed_search, tmp_path)
    text = tmp_path / "other.txt"
    text.write_text("A different calibration text about red squares and blue circles.\n" * 40)
    other = text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=2, seq_len=32, path=text)
    with pytest.raises(SearchStateError, match=r"calibration data: saved from .*calibration_corpus.txt', now .*other.txt'"):
        search_lm_only(copy.deepcopy(pristine_vlm), SCHEME, other, checkpoint=state)


def test_other_target_bits_resolve_from_the_saved_scores(killed_search, pristine_vlm, cli_calibration, tmp_path):
    state = _copy_state(killed_search, tmp_path)
    result = search_lm_only(copy.deepcopy(pristine_vlm), SCHEME.with_(target_bits=7.0), cli_calibration, checkpoint=state)
    assert result.score_calls == 0 and result.achieved_bits <= 7.0 + 1e-9


def test_corrupt_state_gives_a_clear_error(killed_search, pristine_vlm, cli_calibration, tmp_path):
    from modelopt.torch.utils import safe_load

    state = _copy_state(killed_search, tmp_path)
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(SearchStateError, match=r"search_state.pth cannot be read .*truncated or corrupt. Delete it"):
        search_lm_only(copy.deepcopy(pristine_vlm), SCHEME, cli_calibration, checkpoint=state)
    with pytest.raises(Exception) as raw:  # negative control: ModelOpt's own reader gives a raw torch error
        safe_load(state)
    assert not isinstance(raw.value, SearchStateError)


# ---- 3. no partial outputs -----------------------------------------------------------------------


def test_state_saves_are_atomic(tmp_path):
    from modelopt.torch.opt import searcher
    from modelopt.torch.utils import safe_save

    good = {"candidate_stats": {"a": torch.ones(3)}}
    unpicklable = {"candidate_stats": {"a": lambda: 0}}
    ours, theirs = tmp_path / "ours.pth", tmp_path / "theirs.pth"
    for path in (ours, theirs):
        torch.save(good, path)
    with modelopt_state_io(), pytest.raises(pickle.PicklingError):
        searcher.safe_save(unpicklable, ours)  # what ModelOpt's searcher calls while vlq runs it
    assert torch.equal(torch.load(ours, weights_only=True)["candidate_stats"]["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.pth", "theirs.pth"], "no temporary file left"
    # negative control: ModelOpt's own save writes in place and destroys the previous state
    with pytest.raises(pickle.PicklingError):
        safe_save(unpicklable, theirs)
    with pytest.raises(RuntimeError):  # the half-written zip
        torch.load(theirs, weights_only=True)


def test_export_killed_midway_leaves_the_previous_checkpoint(resumed_cli_run, tiny_checkpoint, tmp_path):
    from vlq.files import check_export_dir

    run = tmp_path / "run"
    shutil.copytree(resumed_cli_run[0], run)
    dest = run / "checkpoint"
    dest.mkdir()
    (dest / "config.json").write_text('{"previous": true}')
    (dest / "model.safetensors").write_bytes(b"previous weights")
    proc = _vlq("export", str(run), "--model", str(tiny_checkpoint), "--overwrite", cwd=tmp_path, kill_after="export")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = [p for p in run.iterdir() if p.name.startswith(".checkpoint.partial-")]
    assert partial and (partial[0] / "config.json").exists(), "the kill landed after the new files were written"
    assert (dest / "config.json").read_text() == '{"previous": true}'
    assert (dest / "model.safetensors").read_bytes() == b"previous weights"
    # the next export (here: its first check) clears what the killed one left
    check_export_dir(dest, overwrite=True)
    assert not [p for p in run.iterdir() if p.name.startswith(".checkpoint.")]
    assert (dest / "config.json").read_text() == '{"previous": true}'


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_kill_between_the_two_renames_restores_the_previous_checkpoint(tmp_path):
    from vlq.files import check_export_dir

    backup = tmp_path / f".checkpoint.old-{_dead_pid()}"  # the previous checkpoint, swapped out
    backup.mkdir()
    (backup / "config.json").write_text('{"previous": true}')
    with pytest.raises(Exception, match="already holds a checkpoint"):
        check_export_dir(tmp_path / "checkpoint", overwrite=False)
    assert (tmp_path / "checkpoint" / "config.json").read_text() == '{"previous": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_a_live_exports_folders_are_left_alone(tmp_path):
    from vlq.files import recover_interrupted_export

    mine = tmp_path / f".checkpoint.partial-{os.getpid()}-abc"
    mine.mkdir()
    assert recover_interrupted_export(tmp_path / "checkpoint") == [] and mine.exists()


# ---- 4. safe loading -----------------------------------------------------------------------------


class _Payload:
    """A pickle that creates a file when unpickled: what a tampered state file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_state_is_read_weights_only_even_when_torch_is_told_otherwise(pristine_vlm, cli_calibration, tmp_path, monkeypatch):
    from modelopt.torch.utils import safe_load

    marker = tmp_path / "pwned"
    state = tmp_path / "search_state.pth"
    torch.save({"candidate_stats": {}, "quantizer_states": {}, "x": _Payload(marker)}, state)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SearchStateError, match="weights-only load refuses"):
        search_lm_only(copy.deepcopy(pristine_vlm), SCHEME, cli_calibration, checkpoint=state)
    assert not marker.exists()
    safe_load(state)  # negative control: ModelOpt's reader honours the variable and runs the payload
    assert marker.exists()


def _remote_code_checkpoint(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "remote"
    shutil.copytree(tiny_checkpoint, ckpt)
    marker = tmp_path / "remote_code_ran"
    (ckpt / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import Qwen2_5_VLProcessor\n"
        "class EvilProcessor(Qwen2_5_VLProcessor):\n    pass\n"
    )
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = ckpt / name
        if path.exists():
            data = json.loads(path.read_text())
            data["auto_map"] = {"AutoProcessor": "evil.EvilProcessor"}
            path.write_text(json.dumps(data))
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoProcessor": "evil.EvilProcessor"}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt, marker


def test_checkpoint_code_does_not_run_without_the_flag(tiny_checkpoint, tmp_path):
    from vlq.models import load_vlm

    ckpt, marker = _remote_code_checkpoint(tiny_checkpoint, tmp_path)
    loaded = load_vlm(ckpt)
    assert not marker.exists(), "code shipped with the checkpoint ran without --trust-remote-code"
    assert type(loaded.processor).__name__ == "Qwen2_5_VLProcessor"
    load_vlm(ckpt, trust_remote_code=True)  # negative control: with the flag, the shipped code runs
    assert marker.exists()


# ---- 1. bad inputs -------------------------------------------------------------------------------


def test_unreadable_config_is_refused(tmp_path):
    from vlq.inputs import resolve_model_source

    (tmp_path / "config.json").mkdir()  # exists, but cannot be read as a file (we run as root)
    with pytest.raises(ModelSourceError, match="config.json cannot be read"):
        resolve_model_source(tmp_path)


def test_unservable_scheme_refused_before_loading_when_serving_is_asked(tmp_path):
    proc = _vlq("run", "--check-serving", "--formats", "fp8+int4_awq", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "vLLM cannot serve format(s) int4_awq" in proc.stderr and "Traceback" not in proc.stderr
    assert "loading" not in proc.stdout and not (tmp_path / "run").exists()


def test_cuda_only_format_refused_before_the_run_folder_exists(tmp_path):
    proc = _vlq("run", "--formats", "fp8+nvfp4", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2 and "nvfp4 need a CUDA GPU" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


# ---- 5. resource limits --------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_oom_names_the_setting_and_frees_the_memory(gpu_pristine_vlm):
    """A real CUDA OOM on the 3B model (64 rows x 32k tokens) -> ResourceError; memory comes back."""
    import gc

    from vlq.calibration import synthetic_batches
    from vlq.errors import ResourceError

    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    calibration = synthetic_batches(vocab_size=gpu_pristine_vlm.vocab_size, num_batches=1, batch_size=64, seq_len=32768,
                                    max_token_id=gpu_pristine_vlm.config.vision_start_token_id - 1)
    scheme = Scheme(formats=("fp8",), target_bits=12.0, num_calib_steps=1, num_score_steps=1, batch_size=64, seq_len=32768)
    loaded = copy.deepcopy(gpu_pristine_vlm)
    # catch it by hand: pytest's ExceptionInfo would keep the traceback, whose frames hold the model
    try:
        search_lm_only(loaded, scheme, calibration)
    except ResourceError as exc:
        message, pinned = str(exc), (exc.__cause__, exc.__context__)
    else:
        pytest.fail("a 64 x 32k-token search did not run out of GPU memory")
    assert re.search(r"GPU out of memory.*batch_size=64, seq_len=32768.*Lower batch_size or seq_len", message, re.S), message
    assert pinned == (None, None), "the error must not pin activations"
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    leaked = torch.cuda.memory_allocated() - before
    assert leaked < 256 * 2**20, f"{leaked / 2**30:.2f} GiB still allocated after the OOM"
