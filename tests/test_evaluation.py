"""Task accuracy through lm-eval (``vlq eval``): the shipped generated task, the tiny-trained model's margin over
chance, recovery at measurement points a and b, and the controls that make the number mean something (no
quantization recovers exactly 1.0, a broken scale falls toward chance, 5 bits are no better than 8 beyond noise)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from tests.helpers import vlq_cli
from vlq import pipeline
from vlq.cli import main
from vlq.data.models import fingerprint_parameters, load_vlm
from vlq.evaluation.results import TaskAccuracy, TaskScore
from vlq.evaluation.scoring import score_tasks
from vlq.evaluation.tasks import SHIPPED_TASKS, image_of, require_tasks
from vlq.inputs.requests import TINY_TRAINED, DataRequest
from vlq.manifest.manifest import Manifest
from vlq.runtime.errors import VlqError
from vlq.search.scheme import Scheme

TASK = "vlq_sequences"
LIMIT = 100  # items per evaluation in the default lane (the shipped task has 300)


def run_vlq(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    assert code == 0, err.getvalue()[-3000:]
    return code, out.getvalue()


@pytest.fixture(scope="module")
def trained():
    loaded = load_vlm(TINY_TRAINED)
    before = fingerprint_parameters(loaded.vlm)
    yield loaded
    assert fingerprint_parameters(loaded.vlm) == before, "a test changed the shared tiny-trained model"


@pytest.fixture(scope="module")
def base(trained) -> TaskScore:
    (score,) = score_tasks(trained.vlm, trained.tokenizer, [TASK], limit=LIMIT)
    return score


# ---- the shipped task ----------------------------------------------------------------------------------


def test_shipped_task_files_are_what_their_generator_makes():
    for task in SHIPPED_TASKS.values():
        rows = [json.loads(line) for line in task.data.read_text().splitlines()]
        assert rows == task.generate() and len(rows) == task.items
        if task.kind == "text":
            assert all(len(r["choices"]) == 4 and r["choices"].count(r["choices"][r["label"]]) == 1 for r in rows)
        else:  # the answer names the background colour the image was drawn with
            assert all(r["answer"].split()[-1] in image_of(r["seed"])["text"].split()[-2] for r in rows)
        assert f"task: {task.name}" in task.yaml.read_text() and f"test: {task.data.name}" in task.yaml.read_text()


def test_shipped_tasks_use_held_out_seeds():
    from vlq.data.heldout import HELDOUT_SEED_BASE
    from vlq.evaluation import tasks

    assert tasks.HELDOUT_SEED_BASE == HELDOUT_SEED_BASE
    assert all(t.seed >= HELDOUT_SEED_BASE for t in SHIPPED_TASKS.values())


def test_unknown_task_refused_naming_the_shipped_ones(tmp_path):
    with pytest.raises(VlqError, match=rf"Unknown task 'nosuch': not shipped \({TASK}, vlq_colors\)"):
        require_tasks(["nosuch"], None)
    (tmp_path / "mine.yaml").write_text("task: my_task\ndataset_path: json\n")
    assert require_tasks(["my_task", TASK], tmp_path) == ("my_task", TASK)


def test_tiny_trained_beats_chance_by_a_margin_random_weights_do_not(base, pristine_vlm):
    chance = SHIPPED_TASKS[TASK].chance
    assert base.samples == LIMIT and base.metric == "acc"
    assert base.value - chance > 4 * base.stderr, base
    # negative control: the same task on random weights stays within noise of chance
    (random,) = score_tasks(pristine_vlm.vlm, pristine_vlm.tokenizer, [TASK], limit=LIMIT)
    assert abs(random.value - chance) < 3 * max(random.stderr, 0.02), random


# ---- points a and b on run folders -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs of tiny-trained: all FP8 (8 bits) and no quantization at all (16 bits), each evaluated."""
    root = tmp_path_factory.mktemp("eval")
    evaluated = {}
    for bits in ("8", "16"):
        folder = root / f"b{bits}"
        run_vlq("run", "--model", TINY_TRAINED, "--formats", "fp8", "--bits", bits, "--out", str(folder), "--no-serve")
        evaluated[bits] = (folder, run_vlq("eval", str(folder), "--tasks", TASK, "--limit", str(LIMIT))[1])
    return evaluated


def test_eval_records_base_quantized_and_recovery_at_a_and_b(runs, base):
    folder, printed = runs["8"]
    manifest = Manifest.load(folder / "manifest.json")
    assert [(a.task, a.measurement_point) for a in manifest.accuracy] == [(TASK, "fake_quant"), (TASK, "checkpoint")]
    assert manifest.fidelity, "the fidelity block stays beside the accuracy"
    for a in manifest.accuracy:
        assert (a.base, a.base_stderr, a.samples) == (base.value, base.stderr, LIMIT)
        assert a.recovery == pytest.approx(a.quantized / a.base) and a.recovery_stderr > 0
        assert abs(a.recovery - 1) < 3 * a.recovery_stderr, a  # FP8 on this model: within noise of BF16
    assert "| vlq_sequences | acc      | a fake-quantized" in printed and "b checkpoint (dequantized)" in printed
    json_block = json.loads((folder / "manifest.json").read_text())["accuracy"]
    assert {"recovery", "recovery_stderr", "base_stderr", "quantized_stderr"} <= set(json_block[0])


def test_no_quantization_recovers_exactly_one(runs):
    manifest = Manifest.load(runs["16"][0] / "manifest.json")
    assert {g.chosen for g in manifest.groups} == {"none"}
    assert [a.recovery for a in manifest.accuracy] == [1.0, 1.0]


def test_a_fidelity_rerun_keeps_the_recorded_accuracy(runs):
    folder = runs["16"][0]
    before = Manifest.load(folder / "manifest.json").accuracy
    run_vlq("fidelity", str(folder), "--point", "fake")  # restores the search: the manifest is rewritten
    assert Manifest.load(folder / "manifest.json").accuracy == before


def test_a_broken_scale_falls_toward_chance(runs, trained, base, tmp_path):
    """Every weight scale of the FP8 export multiplied by 64 on disk: point b collapses to chance."""
    from safetensors.torch import load_file, save_file

    from vlq.export.dequant import dequantize_checkpoint

    broken = tmp_path / "broken"
    shutil.copytree(runs["8"][0] / "checkpoint", broken)
    tensors = load_file(broken / "model.safetensors")
    scales = [k for k in tensors if k.endswith(".weight_scale")]
    assert len(scales) == 28  # every LM linear chose FP8
    for key in scales:
        tensors[key] = (tensors[key].float() * 64).to(tensors[key].dtype)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    built = dequantize_checkpoint(broken).build_model()
    (score,) = score_tasks(built.model, trained.tokenizer, [TASK], limit=LIMIT)
    (accuracy,) = pipeline.task_accuracy([base], [score], "checkpoint")
    assert accuracy.quantized < accuracy.base - 4 * accuracy.base_stderr, accuracy
    assert abs(accuracy.quantized - SHIPPED_TASKS[TASK].chance) < 2 * accuracy.quantized_stderr, accuracy


def test_five_bits_not_above_eight_beyond_noise(trained, base):
    """fp8+int4_awq searched at 8 and at 5 bits (point a, in memory): the 5-bit model scores no better than the
    8-bit one beyond their standard errors."""
    results = {}
    for bits in (8.0, 5.0):
        loaded = pipeline.fresh_copy(trained)
        scheme = Scheme(formats=("fp8", "int4_awq"), target_bits=bits)
        calibration = pipeline.calibrate(loaded, scheme, DataRequest())
        pipeline.search(loaded, scheme, calibration)
        (results[bits],) = pipeline.task_accuracy([base], score_tasks(loaded.vlm, trained.tokenizer, [TASK], limit=LIMIT),
                                                   "fake_quant")
        del loaded
    eight, five = results[8.0], results[5.0]
    assert five.quantized <= eight.quantized + 2 * (five.quantized_stderr ** 2 + eight.quantized_stderr ** 2) ** 0.5, (five, eight)
    assert isinstance(five, TaskAccuracy) and five.measurement_point == "fake_quant"


# ---- refusals before heavy imports -----------------------------------------------------------------------


def test_cli_refuses_bad_eval_input_before_heavy_imports(tmp_path, runs):
    folder = runs["8"][0]
    cases = {
        ("eval", str(tmp_path / "none")): "has no manifest.json",
        ("eval", str(folder), "--tasks", "nosuch"): "Unknown task 'nosuch'",
        ("eval", str(folder), "--point", "sideways"): "--point takes fake, checkpoint or served",
        ("eval", str(folder), "--limit", "0"): "--limit takes a number of samples of at least 1",
    }
    for args, message in cases.items():
        refused = vlq_cli(*args, cwd=tmp_path)
        assert refused.returncode == 2 and len(refused.error_lines) == 1 and message in refused.error_lines[0], refused.tail()
        assert refused.heavy_imports == (), refused.tail()


def test_scores_are_deterministic(trained, base):
    assert score_tasks(trained.vlm, trained.tokenizer, [TASK], limit=LIMIT) == (base,)
    assert torch.is_grad_enabled()


# ---- point c: vLLM (slow: an engine per checkpoint) -------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_served_point_c_recovers_and_a_broken_scale_falls_toward_chance(runs, trained, base, tmp_path):
    """vLLM's CPU build serving the FP8 export scores within noise of BF16; the same export with every weight scale
    x64 on disk, served, falls to chance (the control that c is measured on what vLLM loaded)."""
    from safetensors.torch import load_file, save_file

    from vlq.evaluation.served import served_lm

    folder, _ = runs["8"]
    evaluated = pipeline.evaluate_run(pipeline_folder(folder), pipeline.fresh_copy(trained), ["served"], [TASK], limit=LIMIT)
    (served,) = evaluated.accuracy
    assert served.measurement_point == "vllm" and abs(served.recovery - 1) < 3 * served.recovery_stderr, served
    assert ("vlq_sequences", "vllm") in {(a.task, a.measurement_point) for a in Manifest.load(folder / "manifest.json").accuracy}
    broken = tmp_path / "broken"
    shutil.copytree(folder / "checkpoint", broken)
    tensors = load_file(broken / "model.safetensors")
    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        tensors[key] = (tensors[key].float() * 64).to(tensors[key].dtype)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with served_lm(broken, trained.tokenizer, trained.vocab_size) as lm:
        (score,) = score_tasks(None, trained.tokenizer, [TASK], limit=LIMIT, lm=lm)
    assert score.value < base.value - 4 * base.stderr and abs(score.value - SHIPPED_TASKS[TASK].chance) < 2 * score.stderr, score


def pipeline_folder(path):
    from vlq.inputs.requests import RunFolder

    return RunFolder(path)


# ---- the image+text task (slow: lm-eval's multimodal model generates an answer per image) ---------------


@pytest.mark.slow
def test_image_task_beats_chance_and_needs_the_image(trained):
    """tiny-trained names the background colour of held-out generated images well above chance (1 in 8); the
    same questions with every image replaced by one grey image fall to a single answer (the control that the
    score comes from the pixels)."""
    from PIL import Image

    from vlq.evaluation import tasks as shipped

    (score,) = score_tasks(trained.vlm, trained.tokenizer, ["vlq_colors"], limit=40, processor=trained.processor)
    chance = SHIPPED_TASKS["vlq_colors"].chance
    assert score.metric == "exact_match" and score.value - chance > 4 * score.stderr, score
    grey = Image.new("RGB", (56, 56), (128, 128, 128))
    original = shipped.image_of
    shipped.image_of = lambda seed: {"image": grey, "text": original(seed)["text"]}
    try:
        (blind,) = score_tasks(trained.vlm, trained.tokenizer, ["vlq_colors"], limit=40, processor=trained.processor)
    finally:
        shipped.image_of = original
    assert blind.value < score.value - 4 * score.stderr, (blind, score)


def test_report_tabulates_and_plots_accuracy(runs, tmp_path):
    from vlq.report.document import write_report

    with_accuracy, without = runs["8"][0] / "manifest.json", tmp_path / "plain" / "manifest.json"
    without.parent.mkdir()
    manifest = Manifest.load(with_accuracy)
    import dataclasses

    dataclasses.replace(manifest, accuracy=()).save(without)
    report = write_report(tmp_path / "report", manifests=[str(with_accuracy), str(without)]).read_text()
    assert report.count("## Task accuracy") == 1 and "| b8: fp8-8b-gradient-extract | vlq_sequences | acc" in report
    assert "plain:" not in report.split("## Task accuracy")[1]  # a manifest without accuracy adds no row
    assert (tmp_path / "report" / "accuracy.png").stat().st_size > 0
    only_plain = write_report(tmp_path / "report2", manifests=[str(without)]).read_text()
    assert "## Task accuracy" not in only_plain and not (tmp_path / "report2" / "accuracy.png").exists()
