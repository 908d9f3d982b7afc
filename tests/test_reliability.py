"""Reliability and safety (issue 6): bad inputs, interrupted work, resumable searches, safe loading.

Interrupts are real: ``vlq`` runs in a subprocess with ``VLQ_TEST_KILL_AFTER`` set, and SIGKILLs
itself at the named point (right after the scored search state is saved, or right after the
checkpoint files are written to the temporary export folder).  Each protection has a negative
control showing what happens without it.
"""

from __future__ import annotations


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

from helpers import vlq_cli
from vlq import pipeline
from vlq.runtime.errors import ModelSourceError, SearchStateError
from vlq.inputs.requests import DataRequest, RunFolder
from vlq.manifest.manifest import Manifest
from vlq.pipeline import fresh_copy
from vlq.runtime.runlock import RunLock
from vlq.search.scheme import default_scheme
from vlq.search.state import load_search_state, modelopt_state_io, sidecar_path

# what `vlq search --device cpu --calib-steps 2 --score-steps 2 --seq-len 32` searches (the CLI's CPU default)
SCHEME = default_scheme("cpu").with_(num_calib_steps=2, num_score_steps=2, seq_len=32)
STEP_ARGS = ("--device", "cpu", "--calib-steps", "2", "--score-steps", "2", "--seq-len", "32")


@pytest.fixture(scope="module")
def cli_calibration(pristine_vlm):
    """The batches `vlq search` builds for SCHEME from the shipped corpus."""
    return pipeline.calibrate(pristine_vlm, SCHEME)


def _search(loaded, scheme, calibration, state_dir: Path | None = None):
    """The pipeline's search; with ``state_dir`` it saves to / resumes from ``state_dir/search_state.pth``."""
    run = RunFolder(state_dir) if state_dir is not None else None
    return pipeline.search(loaded, scheme, calibration, run=run, save_manifest=False).result


@pytest.fixture(scope="module")
def killed_search(tiny_checkpoint, tmp_path_factory):
    """A `vlq search` SIGKILLed right after ModelOpt saved the scored state."""
    run = tmp_path_factory.mktemp("killed") / "run"
    proc = vlq_cli("search", "--model", tiny_checkpoint, "--out", run, *STEP_ARGS, cwd=run.parent, kill_after="scoring")
    assert proc.returncode == -signal.SIGKILL, proc.tail()
    return run


@pytest.fixture(scope="module")
def uninterrupted(pristine_vlm, cli_calibration):
    return _search(fresh_copy(pristine_vlm), SCHEME, cli_calibration)


def _copy_state(run: Path, dest: Path) -> Path:
    """The saved state (and its settings sidecar) copied into ``dest``, a fresh run folder: the state of an
    interrupted search (``.vlq.pending/``) where there is one, else the committed one."""
    dest.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run)
    state = folder.pending_search_state if folder.pending_search_state.exists() else folder.search_state
    for src in (state, sidecar_path(state)):
        if src.exists():
            shutil.copy2(src, dest / src.name)
    return RunFolder(dest).search_state


# ---- 2. resumable search -------------------------------------------------------------------------


def test_killed_search_left_a_scored_state_and_no_manifest(killed_search):
    folder = RunFolder(killed_search)
    state = load_search_state(folder.pending_search_state)  # weights-only, as vlq reads it on resume
    assert state["candidate_stats"], "the kill came after scoring: the scores are saved"
    assert sidecar_path(folder.pending_search_state).exists()
    assert not folder.manifest.exists() and not folder.search_state.exists(), \
        "kept pending: the state becomes search_state.pth only with the manifest it produces"
    assert [p.name for p in killed_search.rglob("*") if p.name.endswith(".tmp")] == []


def test_resume_skips_scoring_and_reaches_the_same_manifest(killed_search, pristine_vlm, cli_calibration, uninterrupted, tmp_path):
    _copy_state(killed_search, tmp_path)
    resumed = _search(fresh_copy(pristine_vlm), SCHEME, cli_calibration, tmp_path)
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
    proc = vlq_cli("search", "--model", tiny_checkpoint, "--out", run, *STEP_ARGS, cwd=run.parent)
    assert proc.returncode == 0, proc.tail()
    return run, proc.stdout


def test_cli_resume_after_kill(resumed_cli_run, uninterrupted):
    run, stdout = resumed_cli_run
    assert "no scoring step ran" in stdout
    manifest = Manifest.load(run / "manifest.json")
    expected = Manifest.from_search(uninterrupted)
    assert [(g.name, g.chosen) for g in manifest.groups] == [(g.name, g.chosen) for g in expected.groups]
    folder = RunFolder(run)
    assert load_search_state(folder.search_state)["candidate_stats"] and not folder.pending_search_state.exists(), \
        "the resumed state was committed with its manifest"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(formats=("fp8", "int4_awq"), target_bits=6.0), r"formats: saved fp8, now fp8\+int4_awq"),
        (dict(method="kl_div"), r"method: saved 'gradient', now 'kl_div'"),
        (dict(strategy="mask"), r"strategy: saved 'extract', now 'mask'"),
        (dict(num_score_steps=1), r"num_score_steps: saved 2, now 1"),
    ],
    ids=["formats", "method", "strategy", "score-steps"],
)
def test_state_from_other_scheme_is_refused_by_name(killed_search, pristine_vlm, cli_calibration, tmp_path, change, message):
    _copy_state(killed_search, tmp_path)
    with pytest.raises(SearchStateError, match=message):
        _search(fresh_copy(pristine_vlm), SCHEME.with_(**change), cli_calibration, tmp_path)


def _other_weights(pristine_vlm):
    other = fresh_copy(pristine_vlm)
    with torch.no_grad():
        other.language_model.layers[0].mlp.down_proj.weight.mul_(1.5)
    return other


def test_state_from_another_model_is_refused(killed_search, pristine_vlm, cli_calibration, tmp_path):
    _copy_state(killed_search, tmp_path)
    with pytest.raises(SearchStateError, match=r"model: saved from 'tiny'.*weights differ \(parameter model\.language_model\.layers\.0\.mlp\.down_proj\.weight"):
        _search(_other_weights(pristine_vlm), SCHEME, cli_calibration, tmp_path)


def test_without_the_settings_record_another_model_silently_reuses_scores(killed_search, pristine_vlm, cli_calibration, tmp_path):
    """Negative control: ModelOpt alone checks formats/method/groups, not weights or data."""
    state = _copy_state(killed_search, tmp_path)
    sidecar_path(state).unlink()
    result = _search(_other_weights(pristine_vlm), SCHEME, cli_calibration, tmp_path)
    assert result.restored_from_checkpoint and result.score_calls == 0


def test_state_from_other_calibration_data_is_refused(killed_search, pristine_vlm, tmp_path):
    _copy_state(killed_search, tmp_path)
    text = tmp_path / "other.txt"
    text.write_text("A different calibration text about red squares and blue circles.\n" * 40)
    other = pipeline.calibrate(pristine_vlm, SCHEME, DataRequest(text=str(text)))
    with pytest.raises(SearchStateError, match=r"calibration data: saved from .*calibration_corpus.txt', now .*other.txt'"):
        _search(fresh_copy(pristine_vlm), SCHEME, other, tmp_path)


def test_other_target_bits_resolve_from_the_saved_scores(killed_search, pristine_vlm, cli_calibration, tmp_path):
    _copy_state(killed_search, tmp_path)
    result = _search(fresh_copy(pristine_vlm), SCHEME.with_(target_bits=10.0), cli_calibration, tmp_path)
    assert result.score_calls == 0 and result.achieved_bits <= 10.0 + 1e-9


def test_corrupt_state_gives_a_clear_error(killed_search, pristine_vlm, cli_calibration, tmp_path):
    from modelopt.torch.utils import safe_load

    state = _copy_state(killed_search, tmp_path)
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(SearchStateError, match=r"search_state.pth cannot be read .*truncated or corrupt. Delete it"):
        _search(fresh_copy(pristine_vlm), SCHEME, cli_calibration, tmp_path)
    with pytest.raises(Exception) as raw:  # negative control: ModelOpt's own reader gives a raw torch error
        safe_load(state)
    assert not isinstance(raw.value, SearchStateError)


# ---- 3. no partial outputs -----------------------------------------------------------------------


def test_state_saves_are_atomic(tmp_path):
    from modelopt.torch.opt import searcher
    from modelopt.torch.utils import safe_save

    good = {"candidate_stats": {"a": torch.ones(3)}}
    unpicklable = {"candidate_stats": {"a": lambda: 0}}
    # a local lambda: PicklingError on newer Pythons, AttributeError on 3.11; both say "Can't pickle"
    cannot_pickle = dict(expected_exception=(pickle.PicklingError, AttributeError), match="Can't pickle")
    ours, theirs = tmp_path / "ours.pth", tmp_path / "theirs.pth"
    for path in (ours, theirs):
        torch.save(good, path)
    with modelopt_state_io(), pytest.raises(**cannot_pickle):
        searcher.safe_save(unpicklable, ours)  # what ModelOpt's searcher calls while vlq runs it
    assert torch.equal(torch.load(ours, weights_only=True)["candidate_stats"]["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.pth", "theirs.pth"], "no temporary file left"
    # negative control: ModelOpt's own save writes in place and destroys the previous state
    with pytest.raises(**cannot_pickle):
        safe_save(unpicklable, theirs)
    with pytest.raises(RuntimeError):  # the half-written zip
        torch.load(theirs, weights_only=True)


def test_export_killed_midway_leaves_the_previous_checkpoint(resumed_cli_run, tiny_checkpoint, tmp_path):
    from vlq.runtime.files import check_export_dir

    run = tmp_path / "run"
    shutil.copytree(resumed_cli_run[0], run)
    dest = run / "checkpoint"
    dest.mkdir()
    (dest / "config.json").write_text('{"previous": true}')
    (dest / "model.safetensors").write_bytes(b"previous weights")
    proc = vlq_cli("export", run, "--model", tiny_checkpoint, "--device", "cpu", "--overwrite", cwd=tmp_path, kill_after="export")
    assert proc.returncode == -signal.SIGKILL, proc.tail()
    partial = list(run.glob(".vlq.staging-*/.checkpoint.partial-*"))  # exported into the command's staging folder
    assert partial and (partial[0] / "config.json").exists(), "the kill landed after the new files were written"
    assert (dest / "config.json").read_text() == '{"previous": true}'
    assert (dest / "model.safetensors").read_bytes() == b"previous weights"
    # the next command on the folder (here: its lock, then its first check) clears what the killed one left
    with RunLock(run) as lock:
        check_export_dir(dest, overwrite=True)
    assert any("removed the unfinished files of pid" in note for note in lock.notes), lock.notes
    assert not [p for p in run.iterdir() if p.name.startswith((".checkpoint.", ".vlq."))]
    assert (dest / "config.json").read_text() == '{"previous": true}'


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_kill_between_the_two_renames_restores_the_previous_checkpoint(tmp_path):
    from vlq.runtime.files import check_export_dir

    backup = tmp_path / f".checkpoint.old-{_dead_pid()}"  # the previous checkpoint, swapped out
    backup.mkdir()
    (backup / "config.json").write_text('{"previous": true}')
    with pytest.raises(Exception, match="already holds a checkpoint"):
        check_export_dir(tmp_path / "checkpoint", overwrite=False)
    assert (tmp_path / "checkpoint" / "config.json").read_text() == '{"previous": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_a_live_exports_folders_are_left_alone(tmp_path):
    from vlq.runtime.files import recover_interrupted_export

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
    state = RunFolder(tmp_path).search_state
    torch.save({"candidate_stats": {}, "quantizer_states": {}, "x": _Payload(marker)}, state)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SearchStateError, match="weights-only load refuses"):
        _search(fresh_copy(pristine_vlm), SCHEME, cli_calibration, tmp_path)
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
    from vlq.data.models import load_vlm

    ckpt, marker = _remote_code_checkpoint(tiny_checkpoint, tmp_path)
    loaded = load_vlm(ckpt)
    assert not marker.exists(), "code shipped with the checkpoint ran without --trust-remote-code"
    assert type(loaded.processor).__name__ == "Qwen2_5_VLProcessor"
    load_vlm(ckpt, trust_remote_code=True)  # negative control: with the flag, the shipped code runs
    assert marker.exists()


# ---- 1. bad inputs -------------------------------------------------------------------------------


def test_unreadable_config_is_refused(tmp_path):
    from vlq.inputs.requests import resolve_model_source

    (tmp_path / "config.json").mkdir()  # exists, but cannot be read as a file (we run as root)
    with pytest.raises(ModelSourceError, match="config.json cannot be read"):
        resolve_model_source(tmp_path)


def test_cuda_only_format_refused_before_the_run_folder_exists(tmp_path):
    proc = vlq_cli("run", "--formats", "fp8+nvfp4", "--device", "cpu", "--out", tmp_path / "run", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.error_lines) == 1 and "nvfp4 need a CUDA GPU" in proc.error_lines[0], proc.tail()
    assert not (tmp_path / "run").exists()


# ---- 5. resource limits --------------------------------------------------------------------------


