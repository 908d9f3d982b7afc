"""The workflows: every lane runs somewhere, and actionlint (run by .ci/run) fails a broken workflow.

actionlint comes with the ``test`` extra (pyproject.toml); where it is absent the actionlint tests skip with
"needs actionlint, found none".
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def _actionlint() -> str:
    beside = Path(sys.executable).parent / "actionlint"  # the venv's, also when the venv is not activated
    found = str(beside) if beside.exists() else shutil.which("actionlint")
    if found is None:
        pytest.skip("needs actionlint (the test extra installs it), found none")
    return found


def _lint(*paths: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([_actionlint(), "-no-color", *map(str, paths)], cwd=cwd, capture_output=True, text=True, timeout=120)


def _steps(workflow: str) -> dict[str, list[str]]:
    """Job id -> the ``run`` scripts and ``uses`` of its steps, in order."""
    data = yaml.safe_load((WORKFLOWS / workflow).read_text())
    return {job: [step.get("run") or step.get("uses", "") for step in spec["steps"]] for job, spec in data["jobs"].items()}


def test_the_workflows_pass_actionlint():
    proc = _lint()
    assert proc.returncode == 0, proc.stdout + proc.stderr


BREAKAGES = {
    # a job without a runner
    "no-runner": (("    runs-on: ubuntu-latest\n", ""), '"runs-on" section is missing in job "cpu"'),
    # a misspelt context property (the cache key)
    "undefined-property": (("github.run_id", "github.run_idd"), 'property "run_idd" is not defined'),
    # an expression that does not parse
    "bad-expression": (("${{ !cancelled() }}", "${{ !cancelled( }}"), "unexpected end of input while parsing"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_workflow_fails_actionlint(tmp_path, breakage):
    """Negative controls: the nightly CPU workflow broken one way at a time is refused, naming the fault."""
    (old, new), message = BREAKAGES[breakage]
    text = (WORKFLOWS / "nightly-cpu.yml").read_text()
    assert old in text
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    path = tmp_path / ".github" / "workflows" / "nightly-cpu.yml"
    path.write_text(text.replace(old, new, 1))
    proc = _lint(path, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stdout, proc.stdout


def test_a_yaml_error_fails_actionlint(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("name: bad\non: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - name: a: b\n        run: true\n")
    proc = _lint(path, cwd=tmp_path)
    assert proc.returncode == 1 and "could not parse as YAML" in proc.stdout, proc.stdout + proc.stderr


def test_the_nightly_cpu_workflow_runs_every_cpu_lane():
    (steps,) = _steps("nightly-cpu.yml").values()
    script = "\n".join(steps)
    for needed in ("bash scripts/install.sh", "python -m ruff check .", ".venv/bin/actionlint",
                   "python -m pytest -m slow", "bash scripts/cpu_benchmarks.sh", "actions/upload-artifact"):
        assert needed in script, needed
    default = [s for s in steps if "python -m pytest" in s and "-m " not in s.split("pytest", 1)[1]]
    assert default, "the default lane (pytest without -m) runs"


def test_the_nightly_gpu_workflow_serves_on_a_cuda_vllm():
    jobs = _steps("nightly-gpu.yml")
    gpu, served = "\n".join(jobs["gpu"]), "\n".join(jobs["gpu-vllm"])
    assert "python3 -m pytest -m gpu" in gpu
    assert "bash scripts/gpu_vllm_env.sh .venv-vllm" in served and "vllm_skip_reason" in served
    assert '.venv-vllm/bin/python -m pytest -m "gpu and vllm"' in served
