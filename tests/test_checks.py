"""The check registry: every check once, with its stage, what it proves, a negative control that exists, and a
function that runs it; the README's table is the registry's; a run's table lists each check once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vlq.checks.check import Check
from vlq.checks.registry import CHECKS, STAGES, checks_markdown, get_check, in_registry_order, run_stage, stage_checks
from vlq.runtime.errors import CheckpointError, VlqError

ROOT = Path(__file__).resolve().parents[1]


def test_keys_and_names_are_unique_and_every_stage_has_checks():
    assert len({c.key for c in CHECKS}) == len({c.name for c in CHECKS}) == len(CHECKS)
    assert all(stage_checks(stage) for stage in STAGES)
    # registry order is the order a run reaches the stages
    assert [STAGES.index(c.stage) for c in CHECKS] == sorted(STAGES.index(c.stage) for c in CHECKS)


@pytest.mark.parametrize("spec", CHECKS, ids=lambda spec: spec.key)
def test_every_check_runs_and_has_a_negative_control_that_exists(spec):
    """Each entry's function imports and is callable, its error is a vlq error, and its negative control names a
    test function defined in that file (the test that sees it fail)."""
    assert callable(spec.run_function())
    assert issubclass(spec.error, VlqError) and spec.proves
    file, _, test = spec.negative_control.partition("::")
    tree = ast.parse((ROOT / file).read_text())
    assert test in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, spec.negative_control


def test_a_broken_entry_is_caught():
    """Negative control for the two checks above: an unknown stage is refused, a runner that names nothing fails."""
    from vlq.checks.registry import CheckSpec

    with pytest.raises(ValueError, match="unknown stage 'serving'"):
        CheckSpec("x", "x", "serving", "x", "tests/test_checks.py::x", VlqError, "serve.checks:x")
    with pytest.raises(AttributeError):
        CheckSpec("x", "x", "serve", "x", "tests/test_checks.py::x", VlqError, "serve.checks:no_such_check").run_function()


def test_readme_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| check | stage | what it proves |")
    end = readme.index("<!-- end of checks table -->")
    assert readme[start:end].strip() == checks_markdown(), "regenerate the README table with checks_markdown()"


def test_a_check_made_twice_is_listed_once_failed_first():
    """A run re-reads its checkpoint from disk before vLLM starts: the on-disk check is listed once, by its failed
    verdict when the second reading failed, in registry order before the checks of later stages."""
    disk = get_check("checkpoint_on_disk")
    passed, failed = disk.result(folder="checkpoint"), disk.result(["scale NaN"], folder="checkpoint")
    outputs = get_check("vllm_outputs").result()
    guard = get_check("vision_guard").result()
    listed = in_registry_order([outputs, passed, guard, failed, Check("unregistered")])
    assert [c.key for c in listed] == ["vision_guard", "checkpoint_on_disk", "vllm_outputs", ""]
    assert listed[1] is failed
    assert in_registry_order([passed, passed]) == (passed,)  # negative control: nothing failed, the first is kept


def test_spec_results_carry_the_registered_name_and_error():
    check = get_check("checkpoint_on_disk").result(["bad"], 3, folder="ckpt")
    assert check.name == "checkpoint on disk (ckpt)" and check.key == "checkpoint_on_disk" and not check.ok
    with pytest.raises(CheckpointError, match=r"checkpoint on disk \(ckpt\) failed"):
        check.require()


def test_a_stage_runs_its_checks_in_registry_order(tiny_checkpoint):
    """The inspect stage on an unquantized checkpoint, without a manifest: the on-disk check runs, the manifest
    comparison does not apply."""
    checks = run_stage("inspect", checkpoint=tiny_checkpoint, manifest=None)
    assert [c.key for c in checks] == ["checkpoint_on_disk"] and checks[0].ok
