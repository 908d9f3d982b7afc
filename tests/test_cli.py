"""The CLI as users run it: a subprocess on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _vlq(*args, cwd, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "vlq.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_run_on_tiny_model(tmp_path):
    out = tmp_path / "run"
    proc = _vlq("run", "--out", str(out), "--calib-steps", "2", "--score-steps", "2", "--seq-len", "32",
                cwd=tmp_path, env_extra={"VLQ_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| layer" in proc.stdout.replace("|   layer", "| layer")
    assert "FAIL" not in proc.stdout and proc.stdout.count("PASS") == 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scheme_id"] == "fp8+int4_awq-6b-gradient-extract"
    assert (out / "checkpoint" / "config.json").exists() and (out / "search_state.pth").exists()

    # export again from the saved state, without re-scoring, into the same run folder
    proc = _vlq("export", str(out), "--overwrite", cwd=tmp_path, env_extra={"VLQ_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping scoring" in proc.stdout or "PASS" in proc.stdout


def test_bad_input_is_one_clear_line(tmp_path):
    proc = _vlq("run", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlq: error:")]
    assert len(errors) == 1 and "Model path" in errors[0] and "does not exist" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists(), "a refused run must leave nothing behind"


def test_infeasible_bits_refused_before_loading(tmp_path):
    proc = _vlq("run", "--formats", "fp8+int4_awq", "--bits", "3", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2 and "minimum achievable" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_explain_prints_live_facts(tmp_path):
    proc = _vlq("explain", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nvidia-modelopt" in proc.stdout and "*visual*" in proc.stdout and "num_score_steps" in proc.stdout
