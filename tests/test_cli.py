"""The CLI as users run it: ``vlq`` in a subprocess on the tiny model (:func:`helpers.vlq_cli`).

Small steps everywhere (``--calib-steps 2 --score-steps 2 --seq-len 32``): these tests are about
what the command does and prints, not about the search.
"""

from __future__ import annotations

import json
import math

import pytest

from helpers import vlq_cli
from vlq.search.guards import VisionGuard
from vlq.checks.registry import CHECK_NAMES, CHECKS

VISION_AND_HEAD_CHECK = CHECK_NAMES["vllm_vision_and_head"]
LM_LAYERS_CHECK = CHECK_NAMES["vllm_lm_layers"]
OUTPUTS_CHECK = CHECK_NAMES["vllm_outputs"]

STEPS = ("--calib-steps", "2", "--score-steps", "2", "--seq-len", "32")
#: ModelOpt prints this while inserting quantizers ("Inserted 903 quantizers"): third-party output.
MODELOPT_PRINT = "Inserted"


@pytest.mark.vllm
def test_run_defaults_end_with_vllms_per_layer_table(tmp_path):
    """`vlq run` with no scheme options: a scheme vLLM serves on CPU, exported, served, checked per layer."""
    out = tmp_path / "run"
    run = vlq_cli("run", "--out", out, *STEPS, cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scheme_id"] == "fp8-12b-gradient-extract", "the CPU default is FP8 vs BF16 per group at 12 bits"
    # the default model has learned weights, and the run says so (random weights make every distribution flat)
    assert manifest["model"]["source"] == "tiny-trained", manifest["model"]
    assert any("] loading tiny-trained (" in line and "learned weights" in line for line in run.stdout.splitlines()), run.tail()
    text = next(m for m in manifest["fidelity"] if m["measurement_point"] == "fake_quant" and m["data_kind"] == "text")
    assert text["nll_base"] < 0.5 * math.log(1024), f"learned weights predict far better than chance: {text['nll_base']}"

    stdout = run.stdout
    rows = dict(run.check_results)
    for check in (VISION_AND_HEAD_CHECK, LM_LAYERS_CHECK, OUTPUTS_CHECK, VisionGuard.name, "manifest == exported checkpoint"):
        assert rows.get(check) == "PASS", f"{check}: {rows.get(check)}\n{run.tail()}"
    assert "FAIL" not in stdout, run.tail()
    # each check once, in registry order (the on-disk checks run again before vLLM starts)
    names = [name for name, _ in run.check_results]
    registered = [spec.name.format(folder="checkpoint") for spec in CHECKS]
    assert names == [n for n in registered if n in names] and len(names) == len(set(names)) >= 10, names
    # it ends with vLLM's per-layer table (then the engine note and where the run folder is)
    table = stdout[stdout.index("| layer (vLLM)"):]
    assert "visual.blocks.0.attn.qkv" in table and "language_model.model.layers.0.self_attn.qkv_proj" in table
    assert "ModelOptLinearMethod" in table and "torch.float8_e4m3fn" in table and "UnquantizedLinearMethod" in table
    assert "| check" not in table, "the per-layer table is the last table printed"
    assert stdout.rstrip().splitlines()[-1].startswith(f"run folder {out}")

    # the run folder, and third-party output in its log instead of on the terminal
    assert {"manifest.json", "checkpoint", "search_state.pth", "log.txt"} <= {p.name for p in out.iterdir()}
    assert (out / "checkpoint" / "config.json").exists()
    log = (out / "log.txt").read_text()
    assert MODELOPT_PRINT in log and "quantizers" in log, log[-2000:]
    assert MODELOPT_PRINT not in run.stdout + run.stderr, run.tail()


@pytest.mark.slow  # two more CLI runs (~40 s); the quiet default run is checked in the default lane
def test_verbose_run_shows_third_party_output_then_export_logs_it(tmp_path):
    """A scheme vLLM cannot serve is flagged before loading; `--verbose` puts ModelOpt's output on the
    terminal (the negative control for the log redirect); `vlq export` restores the saved search
    without scoring and logs that output to log.txt instead."""
    out = tmp_path / "run"
    run = vlq_cli("run", "--formats", "fp8+int8_sq", "--bits", "8", "--no-serve", "--verbose", "--out", out, *STEPS, cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    note = next((i for i, line in enumerate(run.stdout.splitlines()) if "vLLM cannot serve" in line and "int8_sq" in line), None)
    loading = next((i for i, line in enumerate(run.stdout.splitlines()) if "] loading " in line), None)
    assert note is not None and loading is not None and note < loading, f"unservable formats flagged before loading\n{run.tail()}"
    assert MODELOPT_PRINT in run.stdout + run.stderr, f"--verbose shows third-party output\n{run.tail()}"
    assert not (out / "log.txt").exists()
    assert "vLLM check skipped: --no-serve" in run.stdout
    assert json.loads((out / "manifest.json").read_text())["scheme_id"] == "fp8+int8_sq-8b-gradient-extract"

    export = vlq_cli("export", out, "--overwrite", cwd=tmp_path)
    assert export.returncode == 0, export.tail()
    assert "no scoring step ran" in export.stdout, export.tail()
    assert "FAIL" not in export.stdout and "| manifest == exported checkpoint" in export.stdout
    assert MODELOPT_PRINT not in export.stdout + export.stderr, export.tail()
    assert MODELOPT_PRINT in (out / "log.txt").read_text()


def test_bad_model_path_is_one_line_before_torch(tmp_path, record_property):
    run = vlq_cli("run", "--model", "/no/such/path", "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode == 2, run.tail()
    assert run.stderr.splitlines() == run.error_lines and len(run.error_lines) == 1, run.tail()
    assert "Model path /no/such/path does not exist" in run.error_lines[0]
    assert run.stdout == "" and "Traceback" not in run.stderr
    assert run.heavy_imports == (), f"refused after importing {run.heavy_imports}"
    assert not (tmp_path / "run").exists(), "a refused run must leave nothing behind"
    # fast because nothing heavy is imported (asserted above); the time is recorded, never asserted (goal <= 2 s)
    record_property("refusal_s", round(run.seconds, 3))


def test_infeasible_bits_refused_before_torch(tmp_path):
    run = vlq_cli("run", "--formats", "fp8+int4_awq", "--bits", "3", "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode == 2 and len(run.error_lines) == 1 and "minimum achievable" in run.error_lines[0], run.tail()
    assert run.heavy_imports == (), f"refused after importing {run.heavy_imports}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (("run", "--formats", "fp9"), "Unknown format 'fp9'"),
    (("run", "--data", "/no/such/calib.txt"), "Calibration file /no/such/calib.txt does not exist"),
    (("run", "--images", "/no/such/images"), "Image data /no/such/images does not exist"),
    (("sweep", "--targets", "8,x"), "--targets takes comma-separated numbers"),
    (("sweep", "--targets", "8,6", "--export", "7"), "--export 7 is not among --targets"),
    (("sweep", "--targets", "8,6", "--fidelity-rows", "0"), "--fidelity-rows takes a whole number of at least 1"),
    (("export", "/no/such/run"), "has no manifest.json"),
    (("check", "/no/such/checkpoint"), "does not exist"),
    (("fidelity", "/no/such/run"), "has no manifest.json"),
    (("fidelity", "/no/such/run", "--point", "sideways"), "--point takes fake, checkpoint or served"),
    (("compare-methods", "--methods", "gradient,newton"), "--methods takes two of gradient, kl_div"),
    (("compare-methods", "--method", "kl_div"), "drop --method"),
], ids=["unknown-format", "missing-data", "missing-images", "bad-targets", "export-not-a-target", "sweep-no-fidelity-rows", "export-no-run", "check-no-checkpoint",
        "fidelity-no-run", "fidelity-unknown-point", "compare-methods-unknown-method", "compare-methods-one-method"])
def test_bad_inputs_are_one_line_before_torch(tmp_path, args, message):
    out = () if args[0] in ("export", "check", "fidelity") else ("--out", tmp_path / "out")
    run = vlq_cli(*args, *out, cwd=tmp_path)
    assert run.returncode == 2 and len(run.error_lines) == 1 and message in run.error_lines[0], run.tail()
    assert run.stderr.splitlines() == run.error_lines and "Traceback" not in run.stderr
    assert run.heavy_imports == (), f"refused after importing {run.heavy_imports}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("point, message", [
    ("checkpoint", "has no exported checkpoint (checkpoint/config.json) to measure"),
    ("served", "has no exported checkpoint (checkpoint/config.json) to measure"),
    ("fake", "has no search_state.pth to restore the fake-quantized model"),
], ids=["checkpoint-without-export", "served-without-export", "fake-without-search-state"])
def test_fidelity_refuses_a_point_the_run_folder_cannot_give(tmp_path, point, message):
    """`vlq fidelity` names what the folder lacks for that measurement point, before torch, writing nothing."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text("{}")
    run = vlq_cli("fidelity", run_dir, "--point", point, cwd=tmp_path)
    assert run.returncode == 2 and len(run.error_lines) == 1 and message in run.error_lines[0], run.tail()
    assert run.heavy_imports == (), f"refused after importing {run.heavy_imports}"
    assert sorted(p.name for p in run_dir.iterdir()) == ["manifest.json"] and (run_dir / "manifest.json").read_text() == "{}"


def test_heavy_import_probe_sees_torch(tmp_path):
    """Negative control for the import probe above: a command that needs ModelOpt does report it (and torch)."""
    run = vlq_cli("explain", cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    assert "nvidia-modelopt" in run.stdout and "*visual*" in run.stdout and "num_score_steps" in run.stdout
    assert run.heavy_imports is not None and {"torch", "modelopt"} <= set(run.heavy_imports)


def test_log_handlers_made_during_a_session_write_to_stderr_after_it(tmp_path, capfd):
    """A library that creates its logging handler while output goes to log.txt (transformers does, and binds
    sys.stderr.flush) logs to stderr after the session, instead of failing on the closed log file."""
    import logging
    import sys

    from vlq.runtime.console import third_party_to_log

    logger = logging.getLogger("vlq-test-late-handler")
    with third_party_to_log(tmp_path / "log.txt"):
        handler = logging.StreamHandler()  # binds sys.stderr, which is the log file now
        handler.flush = sys.stderr.flush
        logger.addHandler(handler)
        logger.warning("during the session")
    try:
        logger.warning("after the session")
    finally:
        logger.removeHandler(handler)
    err = capfd.readouterr().err
    assert "during the session" in (tmp_path / "log.txt").read_text() and "during the session" not in err
    assert "after the session" in err and "Logging error" not in err, err
