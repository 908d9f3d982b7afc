"""Every failure is a verdict (issue 12): each fault is made to really happen, and ends as one clear line
or a failed verdict, the documented exit code, no traceback on the terminal, and nothing half-written.

* Format applicability: layer shapes outside a format's blocks are searched without that format (the
  manifest says why) or refused before any search — never a crash in the export.
* ``vlq check`` pre-flight: a copy of one real FP8 export, corrupted one way per case, is refused from
  disk with the layers named, before vLLM starts (the CLI imports neither torch nor vLLM to do it).
* Stage boundaries, signals, a full disk: real subprocesses, a real SIGTERM at a kill point, a real
  file-size limit (``RLIMIT_FSIZE``), a real ModelOpt exception.
* Two writers on one run folder (issue 22): two real ``vlq run`` processes at once — the second is
  refused, the first's manifest describes its checkpoint — with the unlocked race as negative control;
  a run SIGKILLed between its writes, and a commit SIGKILLed between its renames.

The README's "What can go wrong" table counts the cases tried here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from helpers import start_vlq_cli, vlq_cli
from vlq import pipeline
from vlq.formats.applicability import LayerShape, lm_layer_shapes, lm_shapes_from_config, plan_formats
from vlq.formats.registry import fused_group_key
from vlq.export.inspect import SHARD_INDEX, checkpoint_verdict, expected_scale_shapes, inspect_checkpoint
from vlq.runtime.errors import CheckpointError, SchemeError, stage_boundary
from vlq.runtime.files import KILL_ENV
from vlq.inputs.requests import ModelRequest, RunFolder
from vlq.manifest.manifest import Manifest
from vlq.data.tiny import build_tiny_checkpoint, odd_text_shape
from vlq.pipeline import fresh_copy
from vlq.formats.registry import FORMATS
from vlq.search.scheme import Scheme
from vlq.search.search import modelopt_group_key, plan_lm_formats

FP8 = Scheme(formats=("fp8",), target_bits=8.0, num_calib_steps=1, num_score_steps=1, seq_len=32)
# what `vlq export RUN` restores for FP8 (the CLI's step flags of the search that wrote RUN)
FP8_CLI = ("--formats", "fp8", "--bits", "8", "--calib-steps", "1", "--score-steps", "1", "--seq-len", "32", "--device", "cpu")
SHAPE_FORMATS = ("fp8", "int4_awq")  # CPU formats: one per-tensor, one block format


def _no_traceback(run) -> None:
    assert "Traceback" not in run.stdout + run.stderr, run.tail()


def _one_error_line(run, pattern: str) -> str:
    """The process said exactly one thing on stderr: a ``vlq:`` line matching ``pattern``."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlq: "), run.tail()
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    _no_traceback(run)
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    """Half-written things vlq could leave: temporary files and partial export folders."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".partial-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------------------------------------
# 1. Format applicability: shape arithmetic, then real odd-shaped models
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_block_sizes_are_modelopts(fmt):
    """vlq's block sizes (used before ModelOpt is imported) are those of ModelOpt's live configs."""
    weight = FORMATS[fmt].quantizer_signature().weight
    first = weight[0] if isinstance(weight[0], tuple) and len(weight) == 2 and isinstance(weight[1], tuple) else weight
    assert FORMATS[fmt].block_size == first[1]


def _shape_table() -> list:
    """tests/matrix/formats.yaml ``shapes``: (in_features, out_features) -> the formats whose shape rules it meets."""
    import yaml

    entries = yaml.safe_load((Path(__file__).parent / "matrix" / "formats.yaml").read_text())["shapes"]
    return [pytest.param((e["in"], e["out"]), set(e["fits"]), id=e["id"]) for e in entries]


SHAPE_TABLE = _shape_table()


def test_shape_table_names_only_registered_formats():
    """A misspelt format in the shape table would read as "does not fit" and pass; every name must be registered."""
    named = set().union(*(p.values[1] for p in SHAPE_TABLE), *(p.values[1] for p in ODD_SHAPES))
    assert named <= set(FORMATS), named - set(FORMATS)
    assert set(SHAPE_TABLE[0].values[1]) == set(FORMATS), "the first shape fits every format, so it lists them all"


@pytest.mark.parametrize("shape, fits", SHAPE_TABLE)
def test_format_rules_per_shape(shape, fits):
    plan = plan_formats(tuple(FORMATS), [LayerShape("model.language_model.layers.0.mlp.down_proj", *shape)], lambda n: n)
    assert set(plan.allowed[0]) == fits
    assert {e.format for e in plan.exclusions} == set(FORMATS) - fits
    for e in plan.exclusions:
        assert e.reason.startswith(e.format) and "layers.0.mlp.down_proj has" in e.reason, e.reason


def test_a_fused_group_keeps_only_formats_every_member_fits():
    """q/k/v share one decision: a format that misfits one member leaves the whole group."""
    layers = [LayerShape("l.q_proj", 256, 256), LayerShape("l.k_proj", 256, 255), LayerShape("l.v_proj", 256, 256)]
    plan = plan_formats(("fp8", "int4_awq"), layers, lambda n: "l")
    assert plan.groups == (("l.q_proj", "l.k_proj", "l.v_proj"),) and plan.allowed == (("fp8",),)
    assert "l.k_proj has 255 output features" in plan.exclusions[0].reason


def _odd_model(tmp_path_factory, name: str, **shape) -> Path:
    tied = shape.pop("tied", True)
    overrides = odd_text_shape(**shape) if shape else None
    return build_tiny_checkpoint(tmp_path_factory.mktemp("odd") / name, text_overrides=overrides, tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def one_layer_192(tmp_path_factory):
    """One decoder layer, hidden 192 (not a multiple of 128), intermediate 384: INT4 fits only down_proj."""
    return pipeline.load_model(ModelRequest(str(_odd_model(tmp_path_factory, "h192-1layer", hidden_size=192,
                                                            intermediate_size=384, num_hidden_layers=1))))


@pytest.fixture(scope="module")
def searched_around_the_blocks(one_layer_192, tmp_path_factory):
    """fp8+int4_awq on the 192-wide model: searched without int4 where it cannot apply, exported, verified."""
    run = RunFolder(tmp_path_factory.mktemp("h192") / "run")
    scheme = Scheme(formats=SHAPE_FORMATS, target_bits=7.5, num_calib_steps=1, num_score_steps=1, seq_len=32)
    loaded = fresh_copy(one_layer_192)
    searched = pipeline.search(loaded, scheme, pipeline.calibrate(loaded, scheme), run=run)
    exported = pipeline.export(searched, run)
    return searched, exported, run


def test_format_that_cannot_apply_is_removed_from_those_groups_only(searched_around_the_blocks):
    searched, _, run = searched_around_the_blocks
    manifest = Manifest.load(run.manifest)
    removed = {e.group: e for e in manifest.format_exclusions}
    lm = "model.language_model.layers.0"
    assert set(removed) == {f"{lm}.self_attn.q_proj", f"{lm}.self_attn.o_proj", f"{lm}.mlp.gate_proj"}
    assert all(e.format == "int4_awq" and "blocks of 128" in e.reason and "192" in e.reason for e in removed.values())
    candidates = {g.name: {c.format for c in g.candidates} for g in manifest.groups}
    assert candidates[f"{lm}.self_attn.q_proj"] == {"fp8", "none"}, "int4_awq was never a candidate there"
    assert candidates[f"{lm}.mlp.down_proj"] == {"fp8", "int4_awq", "none"}, "negative control: 384 inputs fit, int4 searched"
    assert manifest.group(f"{lm}.mlp.down_proj").chosen == "int4_awq"


def test_searched_around_the_blocks_exports_and_verifies(searched_around_the_blocks):
    _, exported, _ = searched_around_the_blocks
    assert all(c.ok for c in exported.checks), [c.verdict() for c in exported.checks]
    config = exported.export.report.quant_config
    assert config.quant_algo == "MIXED_PRECISION" and config.quantized_layers["model.layers.0.mlp.down_proj"] == "W4A16_AWQ"
    assert config.quantized_layers["model.layers.0.self_attn.q_proj"] == "FP8"


def test_without_the_rule_modelopts_export_crashes_and_the_stage_names_it(one_layer_192, tmp_path):
    """Negative control: INT4 AWQ forced on 192-wide layers (what the search did before) fails in ModelOpt's
    export; the export stage turns that into one CheckpointError naming the first cause, nothing written."""
    import modelopt.torch.quantization as mtq
    import torch

    from vlq.export.export import export_checkpoint

    loaded = fresh_copy(one_layer_192)
    batch = pipeline.calibrate(loaded, FP8).batches[0]["input_ids"]
    with torch.no_grad():
        mtq.quantize(loaded.language_model, mtq.INT4_AWQ_CFG, forward_loop=lambda m: m(input_ids=batch))
    with pytest.raises(CheckpointError, match=r"export failed in modelopt: NotImplementedError: Cannot pack weight with input "
                       r"dimension 192 and block size 128: partial blocks are not supported"):
        with stage_boundary("export", CheckpointError):
            export_checkpoint(loaded, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == [], "nothing half-written"


def test_unreachable_target_is_refused_before_the_search_naming_the_layers(one_layer_192):
    with pytest.raises(SchemeError, match=r"target_bits=5 is infeasible for this model: 3 decision groups cannot use int4_awq "
                       r"\(int4_awq quantizes in blocks of 128 input features and model\.language_model\.layers\.0\.self_attn\.q_proj "
                       r"has 192 .*minimum over the language model is 7\.\d+"):
        plan_lm_formats(one_layer_192, Scheme(formats=SHAPE_FORMATS, target_bits=5.0))
    plan_lm_formats(one_layer_192, Scheme(formats=SHAPE_FORMATS, target_bits=7.5))  # negative control: reachable


def _odd_shapes() -> list:
    """tests/matrix/formats.yaml ``models``: a one-layer model's shape -> the formats its layers rule out."""
    import yaml

    entries = yaml.safe_load((Path(__file__).parent / "matrix" / "formats.yaml").read_text())["models"]
    return [pytest.param({k: v for k, v in e.items() if k not in ("id", "removed")} | {"num_hidden_layers": 1},
                         set(e["removed"]), id=e["id"]) for e in entries]


ODD_SHAPES = _odd_shapes()


@pytest.mark.parametrize("shape, removed", ODD_SHAPES)
def test_odd_shaped_models_search_export_and_verify(tmp_path_factory, shape, removed):
    """Real odd-shaped Qwen2.5-VL models: every format's rule holds on their real layers, and an FP8
    search exports a checkpoint that passes the on-disk pre-flight (an untied lm_head stays excluded)."""
    loaded = pipeline.load_model(ModelRequest(str(_odd_model(tmp_path_factory, "m", **dict(shape)))))
    plan = plan_formats(tuple(FORMATS), lm_layer_shapes(loaded), lambda n: modelopt_group_key(loaded.vlm, n))
    assert {e.format for e in plan.exclusions} == removed
    from_config = plan_formats(tuple(FORMATS), lm_shapes_from_config(json.loads((loaded.path / "config.json").read_text())), fused_group_key)
    assert from_config == plan, "config.json alone (what the CLI refuses with, before torch) plans as the loaded model with ModelOpt's groups"
    assert loaded.tied_lm_head is shape.get("tied", True)
    run = RunFolder(tmp_path_factory.mktemp("odd-run") / "run")
    searched = pipeline.search(loaded, FP8, pipeline.calibrate(loaded, FP8))
    exported = pipeline.export(searched, run)
    verdict = checkpoint_verdict(exported.path, searched.manifest)
    assert all(c.ok for c in verdict), [c.verdict() for c in verdict]
    assert exported.export.report.quant_config.is_excluded("lm_head")


def test_a_format_that_fits_no_layer_is_refused_from_config_before_torch(tmp_path_factory, tmp_path):
    model = _odd_model(tmp_path_factory, "h200", hidden_size=200, intermediate_size=344, num_hidden_layers=1)
    out = tmp_path / "run"
    run = vlq_cli("run", "--model", model, "--formats", "int4_awq", "--bits", "8", "--no-serve", "--out", out, *FP8_CLI[4:],
                  cwd=tmp_path)
    assert run.returncode == 2, run.tail()
    _one_error_line(run, r"vlq: error: Format int4_awq fits none of the language model's 4 decision groups: int4_awq quantizes "
                         r"in blocks of 128 input features and model\.language_model\.layers\.0\.self_attn\.q_proj has 200 .*Drop int4_awq")
    assert run.heavy_imports == (), f"refused from config.json before importing {run.heavy_imports}"
    assert not out.exists(), "a refused run leaves nothing behind"


# ------------------------------------------------------------------------------------------------
# 2. `vlq check` pre-flight from disk: one real export, copied and corrupted per case
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_run(pristine_vlm, tmp_path_factory) -> RunFolder:
    """One real FP8 search + export of the tiny model (the run folder `vlq export` can restore)."""
    run = RunFolder(tmp_path_factory.mktemp("fp8") / "run")
    loaded = fresh_copy(pristine_vlm)
    searched = pipeline.search(loaded, FP8, pipeline.calibrate(loaded, FP8), run=run)
    pipeline.export(searched, run)
    return run


def _tensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}


def _save(ckpt: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def _set_scale(ckpt: Path, value: float, layers=("q_proj", "k_proj", "v_proj"), leaf="weight_scale") -> None:
    """Set one scale of every member of layer 0's q/k/v group (members stay equal: only this fault shows)."""
    import torch

    tensors = _tensors(ckpt)
    for name in layers:
        key = f"model.layers.0.self_attn.{name}.{leaf}"
        tensors[key] = torch.full_like(tensors[key], value)
    _save(ckpt, tensors)


def _reshard(ckpt: Path) -> dict:
    """Split the checkpoint into two shards and a shard index, as large checkpoints ship; the index."""
    from safetensors.torch import save_file

    tensors = _tensors(ckpt)
    (ckpt / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, ckpt / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (ckpt / SHARD_INDEX).write_text(json.dumps(index))
    return index


def _edit_quant_config(ckpt: Path, edit: Callable[[dict], None]) -> None:
    """Apply ``edit`` to both copies of the quantization config (vLLM reads config.json's)."""
    config = json.loads((ckpt / "config.json").read_text())
    edit(config["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(config))
    hf = json.loads((ckpt / "hf_quant_config.json").read_text())
    edit(hf["quantization"])
    (ckpt / "hf_quant_config.json").write_text(json.dumps(hf))


def _truncate(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _zero_length(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"")


def _wrong_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8:8 + length] = b"#" * length  # the right length, garbage instead of JSON
    f.write_bytes(bytes(data))


def _missing_shard(ckpt):
    _reshard(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()


def _index_names_missing_tensor(ckpt):
    index = _reshard(ckpt)
    index["weight_map"]["model.layers.0.mlp.down_proj.weight_scale_2"] = "model-00001-of-00002.safetensors"
    (ckpt / SHARD_INDEX).write_text(json.dumps(index))


def _config_names_absent_layers(ckpt):
    def to_mixed(q):  # the same FP8 layers as MIXED_PRECISION, plus a layer this 4-layer model lacks
        layers = {f"model.layers.{i}.{m}": {"quant_algo": "FP8"} for i in range(4)
                  for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        layers["model.layers.7.mlp.down_proj"] = {"quant_algo": "FP8"}
        q.update(quant_algo="MIXED_PRECISION", quantized_layers=layers)
        q.pop("exclude_modules", None), q.pop("ignore", None)
    _edit_quant_config(ckpt, to_mixed)


def _algo_contradicted_by_dtypes(ckpt):
    _edit_quant_config(ckpt, lambda q: q.update(quant_algo="NVFP4", group_size=16))  # a format vLLM serves: only the dtypes object


def _no_longer_excludes_vision_and_head(ckpt):
    def drop(q):
        for key in ("exclude_modules", "ignore"):
            if key in q:
                q[key] = [p for p in q[key] if p not in ("visual*", "lm_head")]
    _edit_quant_config(ckpt, drop)


@dataclass(frozen=True)
class DiskFault:
    """One way a checkpoint on disk can be broken, and what the pre-flight must say about it."""

    id: str
    corrupt: Callable[[Path], None]
    says: str  # a regex the verdict must contain (it names the file or the layers)

    def param(self):
        return pytest.param(self, id=self.id)


DISK_FAULTS = [
    DiskFault("truncated-safetensors", _truncate, r"model\.safetensors is truncated: its header promises \d+ bytes of tensor data, the file holds \d+"),
    DiskFault("zero-length-safetensors", _zero_length, r"model\.safetensors is empty \(0 bytes\)"),
    DiskFault("wrong-header-safetensors", _wrong_header, r"model\.safetensors has no valid safetensors header \(not JSON"),
    DiskFault("shard-in-index-missing", _missing_shard, r"names shard model-00002-of-00002\.safetensors for \d+ tensors .* but the file is missing"),
    DiskFault("index-names-missing-tensor", _index_names_missing_tensor,
              r"maps tensor model\.layers\.0\.mlp\.down_proj\.weight_scale_2 to model-00001-of-00002\.safetensors, which does not hold it"),
    DiskFault("nan-scale", lambda c: _set_scale(c, math.nan), r"model\.layers\.0\.self_attn\.q_proj\.weight_scale holds 1 non-finite values"),
    DiskFault("zero-scale", lambda c: _set_scale(c, 0.0), r"model\.layers\.0\.self_attn\.q_proj\.weight_scale is zero"),
    DiskFault("negative-scale", lambda c: _set_scale(c, -0.01), r"model\.layers\.0\.self_attn\.q_proj\.weight_scale holds 1 negative values"),
    DiskFault("wrong-shape-scale", lambda c: _set_scale_shape(c), r"model\.layers\.0\.mlp\.down_proj\.input_scale has shape \[3\]; FP8 with weight \[256, 512\] exports \[\]"),
    DiskFault("config-names-absent-layers", _config_names_absent_layers,
              r"quantization config quantizes 1 layers the checkpoint does not hold: model\.layers\.7\.mlp\.down_proj"),
    DiskFault("config-algo-contradicted-by-dtypes", _algo_contradicted_by_dtypes,
              r"model\.layers\.0\.mlp\.down_proj: the config says NVFP4, which stores weights as U8, but the weight on disk is F8_E4M3"),
    DiskFault("config-quantizes-vision-and-lm_head", _no_longer_excludes_vision_and_head,
              r"quantization config applies FP8 to visual\.blocks\.0\.attn\.proj: its ignore list does not exclude the vision tower.*"
              r"\(on disk it is BF16 without scales\)"),
]


def _set_scale_shape(ckpt):
    tensors = _tensors(ckpt)
    tensors["model.layers.0.mlp.down_proj.input_scale"] = tensors["model.layers.0.mlp.down_proj.input_scale"].reshape(1).repeat(3)
    _save(ckpt, tensors)


@pytest.fixture
def ckpt_copy(fp8_run, tmp_path) -> Path:
    """A private copy of the real export, outside a run folder (no manifest next to it)."""
    return Path(shutil.copytree(fp8_run.checkpoint, tmp_path / "ckpt"))


def test_the_real_export_passes_the_pre_flight(fp8_run, ckpt_copy):
    """Negative control for every case below: the uncorrupted copy passes, with and without its manifest."""
    assert all(c.ok for c in checkpoint_verdict(ckpt_copy)), [c.verdict() for c in checkpoint_verdict(ckpt_copy)]
    assert all(c.ok for c in checkpoint_verdict(ckpt_copy, Manifest.load(fp8_run.manifest)))
    resharded = shutil.copytree(ckpt_copy, ckpt_copy.parent / "resharded")
    _reshard(resharded)
    assert inspect_checkpoint(resharded).check.ok, "a consistent sharded checkpoint passes too"


def test_export_layouts_are_the_shapes_the_pre_flight_expects(fp8_run):
    """Pins expected_scale_shapes on a real export (FP8; AWQ layouts are pinned by the 192-wide export above)."""
    report = inspect_checkpoint(fp8_run.checkpoint)
    assert report.check.ok and expected_scale_shapes("FP8", (256, 256)) == {"weight_scale": (), "input_scale": ()}


@pytest.mark.parametrize("fault", [f.param() for f in DISK_FAULTS])
def test_vlq_check_refuses_an_inconsistent_checkpoint_before_vllm(ckpt_copy, tmp_path, fault):
    fault.corrupt(ckpt_copy)
    before = sorted(p.name for p in ckpt_copy.iterdir())
    run = vlq_cli("check", ckpt_copy, cwd=tmp_path)
    assert run.returncode == 1, run.tail()
    assert "pre-flight from disk" in run.stdout and "| FAIL" in run.stdout, run.tail()
    assert re.search(fault.says, run.stdout), f"{fault.says!r} not in the verdict\n{run.tail()}"
    assert "vLLM was not started" in run.stdout and run.stderr == "", run.tail()
    _no_traceback(run)
    assert run.heavy_imports == (), f"the pre-flight imported {run.heavy_imports}: vLLM must not start"
    assert sorted(p.name for p in ckpt_copy.iterdir()) == before, "the check writes nothing"


def test_vlq_check_refuses_a_manifest_from_another_model(ckpt_copy, searched_around_the_blocks, tmp_path):
    """The 1-layer model's manifest against the 4-layer export: the layers it does not list are named."""
    _, _, other_run = searched_around_the_blocks
    run = vlq_cli("check", ckpt_copy, "--manifest", other_run.manifest, cwd=tmp_path)
    assert run.returncode == 1, run.tail()
    assert "manifest == exported checkpoint" in run.stdout and "| FAIL" in run.stdout
    assert "the checkpoint quantizes 21 layers the manifest does not list (first: model.layers.1.mlp.down_proj)" in run.stdout, run.tail()
    assert "vLLM was not started" in run.stdout and run.stderr == "", run.tail()
    _no_traceback(run)
    assert "vllm" not in (run.heavy_imports or ()), run.heavy_imports


# ------------------------------------------------------------------------------------------------
# 3. Interrupts, a full disk and an unexpected exception, in real processes
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def run_copy(fp8_run, tmp_path) -> Path:
    """A private copy of the FP8 run folder (manifest, search state, checkpoint) for `vlq export`."""
    return Path(shutil.copytree(fp8_run.root, tmp_path / "run"))


@pytest.fixture
def export_args(run_copy, tiny_checkpoint) -> tuple:
    """`vlq export RUN --overwrite` from the session's tiny checkpoint (nothing to build into a cache)."""
    return ("export", run_copy, "--overwrite", "--model", tiny_checkpoint)


def _checkpoint_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "checkpoint").iterdir())}


@pytest.mark.slow  # ~20 s; SIGKILL during scoring (and the resume) runs by default in test_reliability.py
def test_sigterm_during_scoring_stops_cleanly(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    run = vlq_cli("search", "--model", tiny_checkpoint, "--out", out, *FP8_CLI, cwd=tmp_path, kill_after="score-step", kill_signal="TERM")
    assert run.returncode == 143, run.tail()
    _one_error_line(run, r"^vlq: error: stopped by SIGTERM; nothing half-written was kept")
    assert not (out / "manifest.json").exists() and _leftovers(out) == [], _leftovers(out)


def test_sigterm_during_export_keeps_the_previous_checkpoint(run_copy, export_args, tmp_path):
    previous = _checkpoint_bytes(run_copy)
    run = vlq_cli(*export_args, cwd=tmp_path, kill_after="export", kill_signal="TERM")
    assert run.returncode == 143, run.tail()
    _one_error_line(run, r"^vlq: error: stopped by SIGTERM")
    assert _checkpoint_bytes(run_copy) == previous and _leftovers(run_copy) == [], "cleaned up at once (SIGKILL leaves it to the next run)"


def test_full_disk_during_export_is_one_line_and_keeps_the_previous_checkpoint(run_copy, export_args, tmp_path):
    previous = _checkpoint_bytes(run_copy)
    limit = (run_copy / "checkpoint" / "model.safetensors").stat().st_size // 2  # the new weights cannot be written
    run = vlq_cli(*export_args, cwd=tmp_path, file_size_limit=limit)
    assert run.returncode == 2, run.tail()
    _one_error_line(run, r"^vlq: error: export: the disk is full or a file-size limit was hit while writing .*checkpoint \(.*\)\. "
                         r"Free space or choose a folder on another disk")
    assert _checkpoint_bytes(run_copy) == previous and _leftovers(run_copy) == []


def test_unexpected_exception_is_an_internal_error_with_a_log(ckpt_copy, tmp_path):
    """A vlq bug (an exception vlq did not expect) right before vLLM would start: one line, exit 3, the
    trace in a log named on that line (no run folder here: $VLQ_CACHE_DIR/logs)."""
    cache = tmp_path / "cache"  # explicit: CI sets its own VLQ_CACHE_DIR for the whole run
    run = vlq_cli("check", ckpt_copy, cwd=tmp_path, kill_after="serve", kill_signal="RAISE", env={"VLQ_CACHE_DIR": str(cache)})
    assert run.returncode == 3, run.tail()
    line = _one_error_line(run, r"^vlq: internal error: RuntimeError: fault injected at kill point 'serve' .*\(details: .*\.log\)$")
    log = Path(line.rsplit("(details: ", 1)[1].rstrip(")"))
    assert log.parent == cache / "logs" and "Traceback" in log.read_text(), log
    assert run.heavy_imports == ()


@pytest.mark.slow  # ~25 s: the same inside a real export, whose run folder's log.txt gets the trace
def test_unexpected_exception_in_export_is_an_internal_error_with_the_run_log(run_copy, export_args, tmp_path):
    previous = _checkpoint_bytes(run_copy)
    run = vlq_cli(*export_args, cwd=tmp_path, kill_after="export", kill_signal="RAISE")
    assert run.returncode == 3, run.tail()
    line = _one_error_line(run, r"^vlq: internal error: RuntimeError: fault injected at kill point 'export' .*\(details: .*log\.txt\)$")
    log = Path(line.rsplit("(details: ", 1)[1].rstrip(")"))
    assert log == run_copy / "log.txt" and "Traceback" in log.read_text() and "fault injected" in log.read_text()
    assert _checkpoint_bytes(run_copy) == previous and _leftovers(run_copy) == []


# ------------------------------------------------------------------------------------------------
# 4. Two writers on one run folder, and runs stopped between the files that describe each other
# ------------------------------------------------------------------------------------------------

# the second writer's scheme: FP8 at 10 bits (some layers stay BF16), so its manifest cannot describe an 8-bit checkpoint
TEN_BITS = ("--formats", "fp8", "--bits", "10", "--calib-steps", "1", "--score-steps", "1", "--seq-len", "32")


def _manifest_disagreements(folder: Path, manifest: Path | None = None) -> list[str]:
    """What the pre-flight of `vlq check CKPT --manifest M` (torch-free, before vLLM) finds wrong between
    ``folder``'s checkpoint and its manifest (or ``manifest``); [] when the manifest describes it."""
    verdict = checkpoint_verdict(folder / "checkpoint", Manifest.load(manifest or folder / "manifest.json"))
    return [c.verdict() for c in verdict if not c.ok]


def _set_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of the set: manifest, search state and settings, checkpoint."""
    names = ("manifest.json", "search_state.pth", "search_state.pth.vlq.json")
    return {**{n: (folder / n).read_bytes() for n in names}, **{f"checkpoint/{k}": v for k, v in _checkpoint_bytes(folder).items()}}


def _vlq_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".vlq."))


@pytest.fixture
def searched_only(fp8_run, tmp_path) -> Path:
    """A run folder holding only a saved FP8 search state: a `vlq run` there re-solves its scores (no scoring)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("search_state.pth", "search_state.pth.vlq.json"):
        shutil.copy2(fp8_run.root / name, run / name)
    return run


def _first_and_second(run: Path, tiny_checkpoint, tmp_path, env: dict[str, str] | None = None):
    """The issue's race: `vlq run` at 8 bits, paused right after writing its manifest (it holds the folder),
    and `vlq run` at 10 bits on the same folder meanwhile; then the first goes on.  Both finished runs."""
    with start_vlq_cli("run", "--no-serve", "--model", tiny_checkpoint, "--out", run, *FP8_CLI, cwd=tmp_path, env=env,
                       kill_after="manifest", kill_signal="STOP") as first:
        first.wait_until_stopped()
        # the second as the issue ran it: --device auto, which imports torch only after the lock
        second = vlq_cli("run", "--no-serve", "--model", tiny_checkpoint, *TEN_BITS, "--out", run, cwd=tmp_path, env=env)
        first.resume()
        return first.pid, first.finish(), second


def test_a_second_writer_is_refused_at_once_and_the_first_finishes_consistent(searched_only, tiny_checkpoint, tmp_path,
                                                                                record_property):
    run = searched_only
    pid, first, second = _first_and_second(run, tiny_checkpoint, tmp_path)
    record_property("second_writer_refused_s", round(second.seconds, 2))  # measured, never asserted
    assert second.returncode == 2, second.tail()
    _one_error_line(second, rf"^vlq: error: Run folder {re.escape(str(run))} is in use by pid {pid} \(vlq run --no-serve "
                            rf".*--out {re.escape(str(run))} .*, started [-0-9]+ [0-9:]+\); one writer per run folder")
    assert second.heavy_imports == (), f"refused before importing {second.heavy_imports}"
    assert first.returncode == 0, first.tail()
    assert _manifest_disagreements(run) == [] and Manifest.load(run / "manifest.json").scheme.target_bits == 8.0
    assert _vlq_entries(run) == [], "no lock, staging or pending state left"


@pytest.mark.slow  # ~2 min: the second run goes all the way; the locked case above runs by default
def test_without_the_lock_the_same_race_leaves_a_manifest_that_does_not_describe_the_checkpoint(searched_only, tiny_checkpoint,
                                                                                                tmp_path):
    """Negative control: ``VLQ_TEST_UNLOCKED=1`` (no lock, every file written in place, as before issue 22).
    The second run writes its manifest and exports; the first then writes its manifest over it and stops
    at its export: an 8-bit manifest beside a 10-bit checkpoint, which `vlq check --manifest` refuses."""
    run = searched_only
    _, first, second = _first_and_second(run, tiny_checkpoint, tmp_path, env={"VLQ_TEST_UNLOCKED": "1"})
    assert second.returncode == 0, second.tail()
    assert first.returncode == 2 and "already holds a checkpoint" in first.stderr, first.tail()
    assert Manifest.load(run / "manifest.json").scheme.target_bits == 8.0
    assert any("manifest == exported checkpoint" in p for p in _manifest_disagreements(run)), _manifest_disagreements(run)
    check = vlq_cli("check", run / "checkpoint", "--manifest", run / "manifest.json", cwd=tmp_path)
    assert check.returncode == 1 and "vLLM was not started: the checkpoint on disk is inconsistent" in check.stdout, check.tail()


@pytest.mark.slow  # ~2 min: starts vLLM on CPU; the torch-free pre-flight of the same check runs by default above
@pytest.mark.vllm
def test_vlq_check_serves_the_first_writers_folder(searched_only, tiny_checkpoint, tmp_path):
    run = searched_only
    _, first, second = _first_and_second(run, tiny_checkpoint, tmp_path)
    assert second.returncode == 2 and first.returncode == 0, first.tail() + second.tail()
    check = vlq_cli("check", run / "checkpoint", "--manifest", run / "manifest.json", cwd=tmp_path)
    assert check.returncode == 0 and "manifest == exported checkpoint" in check.stdout, check.tail()


def test_a_run_killed_between_its_writes_leaves_the_previous_set(run_copy, tiny_checkpoint, tmp_path):
    """`vlq run --overwrite` at 10 bits over a finished 8-bit run, SIGKILLed right after writing its new
    manifest: the folder still holds the 8-bit set, byte for byte; the next command cleans up."""
    previous = _set_bytes(run_copy)
    killed = vlq_cli("run", "--no-serve", "--overwrite", "--model", tiny_checkpoint, *TEN_BITS, "--device", "cpu",
                     "--out", run_copy, cwd=tmp_path, kill_after="manifest")
    assert killed.returncode == -signal.SIGKILL, killed.tail()
    assert _set_bytes(run_copy) == previous and _manifest_disagreements(run_copy) == []
    staged = list(run_copy.glob(".vlq.staging-*/manifest.json"))
    assert len(staged) == 1 and Manifest.load(staged[0]).scheme.target_bits == 10.0
    # negative control: the new manifest, had it been written in place, would not describe the checkpoint
    assert any("manifest == exported checkpoint" in p for p in _manifest_disagreements(run_copy, staged[0]))

    pid = json.loads((run_copy / ".vlq.lock").read_text())["pid"]
    after = vlq_cli("export", run_copy, "--model", tiny_checkpoint, cwd=tmp_path)  # any writer; this one stops at its first check
    assert after.returncode == 2 and "already holds a checkpoint" in after.error_lines[0], after.tail()
    notes = [line for line in after.stderr.splitlines() if line.startswith("vlq: note:")]
    assert len(notes) == 2, after.tail()
    assert re.search(rf"took over the lock of .*: pid {pid} \(vlq run --no-serve --overwrite .*\) left it and is no longer running", notes[0])
    assert f"removed the unfinished files of pid {pid}" in notes[1]
    assert _set_bytes(run_copy) == previous and _vlq_entries(run_copy) == [".vlq.pending"], \
        "only the killed search's state is kept (the same command resumes from it)"


@pytest.fixture(scope="module")
def fp8_run_10_bits(pristine_vlm, tmp_path_factory) -> RunFolder:
    """A second real FP8 run folder, at 10 bits: the set a commit moves in."""
    run = RunFolder(tmp_path_factory.mktemp("fp8-10") / "run")
    scheme = FP8.with_(target_bits=10.0)
    loaded = fresh_copy(pristine_vlm)
    pipeline.export(pipeline.search(loaded, scheme, pipeline.calibrate(loaded, scheme), run=run), run)
    return run


# a writer committing another run's manifest and checkpoint into argv[2] (torch-free: the commit alone)
_COMMIT_OTHER_SET = (
    "import shutil, sys\n"
    "from pathlib import Path\n"
    "from vlq.inputs.requests import RunFolder\n"
    "from vlq.runtime.runlock import writing\n"
    "new = Path(sys.argv[1])\n"
    "with writing(RunFolder(sys.argv[2])) as staged:\n"
    "    shutil.copytree(new / 'checkpoint', staged.checkpoint)\n"
    "    shutil.copy2(new / 'manifest.json', staged.manifest)\n"
)


def test_a_commit_killed_between_its_renames_is_rolled_forward_by_the_next_writer(run_copy, fp8_run_10_bits, tiny_checkpoint,
                                                                                    tmp_path):
    env = {**os.environ, KILL_ENV: "commit:checkpoint"}  # SIGKILL right after the new checkpoint moved in
    proc = subprocess.run([sys.executable, "-c", _COMMIT_OTHER_SET, str(fp8_run_10_bits.root), str(run_copy)], env=env)
    assert proc.returncode == -signal.SIGKILL and (run_copy / ".vlq.commit").exists()
    # negative control: as the kill left it (new checkpoint, old manifest) the folder is inconsistent, and the check says so
    assert any("manifest == exported checkpoint" in p for p in _manifest_disagreements(run_copy))
    after = vlq_cli("export", run_copy, "--model", tiny_checkpoint, cwd=tmp_path)
    assert after.returncode == 2, after.tail()
    assert re.search(r"vlq: note: .*: finished moving in checkpoint, manifest\.json, which pid \d+ was committing together "
                     "when it stopped", after.stderr), after.tail()
    assert _manifest_disagreements(run_copy) == [] and Manifest.load(run_copy / "manifest.json").scheme.target_bits == 10.0
    assert _checkpoint_bytes(run_copy) == _checkpoint_bytes(fp8_run_10_bits.root) and _vlq_entries(run_copy) == []


def test_a_search_alone_does_not_commit_a_manifest_that_no_longer_describes_the_checkpoint(run_copy, pristine_vlm):
    """`vlq search` into a finished run folder: a new decision would orphan its checkpoint, so nothing is
    replaced (the search's scores stay pending for `vlq run --overwrite` to resume)."""
    previous = _set_bytes(run_copy)
    folder = RunFolder(run_copy)
    ten = FP8.with_(target_bits=10.0)
    loaded = fresh_copy(pristine_vlm)
    with pytest.raises(CheckpointError, match=r"The search decided differently from the checkpoint already in .*; nothing was "
                                              r"replaced\. Export the new decisions with `vlq run --out .* --overwrite`"):
        pipeline.search(loaded, ten, pipeline.calibrate(loaded, ten), run=folder)
    assert _set_bytes(run_copy) == previous and _vlq_entries(run_copy) == [".vlq.pending"]
    # negative control: a search that decides what the checkpoint holds commits (its manifest still describes it)
    loaded = fresh_copy(pristine_vlm)
    pipeline.search(loaded, FP8, pipeline.calibrate(loaded, FP8), run=folder)
    assert _manifest_disagreements(run_copy) == [] and _vlq_entries(run_copy) == []
