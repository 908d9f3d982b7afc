"""ModelOpt AutoQuantize recipes in (``--recipe FILE|NAME``) and out (``vlq recipe RUN``).

Recipes load through ModelOpt's own loader; vlq maps each candidate format by its quantizer config, refuses one it
does not know, states where its LM-only search differs, and writes a recipe that ModelOpt loads and that makes the
same decisions on the same data.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import pytest

from tests.helpers import vlq_cli
from vlq.cli import main
from vlq.manifest.manifest import Manifest
from vlq.recipes.names import resolve_recipe, shipped_recipe_names
from vlq.recipes.reading import differences, read_recipe, recipe_scheme
from vlq.runtime.errors import SchemeError
from vlq.search.scheme import Scheme

W4A8 = "w4a8_awq_beta_fp8_at_6p0bits"


@dataclass(frozen=True)
class InProcess:
    code: int
    stdout: str
    stderr: str

    def notes(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("vlq: note: recipe")]


def run_vlq(*args: str) -> InProcess:
    """``vlq ARGS`` in this process (ModelOpt is imported once for the module, not once per command)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return InProcess(code, out.getvalue(), err.getvalue())


# ---- reading -----------------------------------------------------------------------------------------


def test_shipped_recipes_map_to_vlq_formats_or_are_refused():
    shipped = shipped_recipe_names()
    assert {W4A8, "nvfp4_fp8_at_5p4bits", "nvfp4_fp8_kl_div_at_5p4bits", "nvfp4_mse_fp8_at_6p0bits"} <= set(shipped)
    w4a8 = read_recipe(W4A8)
    assert (w4a8.formats, w4a8.target_bits, w4a8.method, w4a8.score_size) == (("w4a8_awq", "fp8"), 6.0, "gradient", 128)
    assert "*visual*" in w4a8.disabled_layers and "*visual*" in w4a8.cost_excluded_layers  # the shared units, $imported
    kl = read_recipe("nvfp4_fp8_kl_div_at_5p4bits")
    assert (kl.formats, kl.target_bits, kl.method) == (("nvfp4", "fp8"), 5.4, "kl_div")
    # negative control: a candidate whose quantizer config is no vlq format (NVFP4 weights with an MSE sweep)
    with pytest.raises(SchemeError, match=r"candidate format 1 \(ModelOpt's NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG\) is not a "
                                          r"format vlq knows; vlq knows fp8 \(FP8_DEFAULT_CFG\)"):
        read_recipe("nvfp4_mse_fp8_at_6p0bits")


def test_missing_recipe_names_the_shipped_ones(tmp_path):
    with pytest.raises(SchemeError, match=rf"no recipe of that name ships with ModelOpt; shipped AutoQuantize recipes: .*{W4A8}"):
        resolve_recipe(str(tmp_path / "nosuch.yaml"))
    assert resolve_recipe(W4A8).name == f"{W4A8}.yaml"


def test_a_recipe_modelopt_refuses_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata:\n  recipe_type: auto_quantize\nauto_quantize:\n  constraints:\n    effective_bits: 99\n"
                   "  candidate_formats: []\n")
    with pytest.raises(SchemeError, match="ModelOpt's load_recipe refuses"):
        read_recipe(str(bad))


def test_differences_name_lm_head_scores_and_image_calibration():
    recipe = read_recipe(W4A8)
    scheme = recipe_scheme(recipe, Scheme(formats=("fp8",), target_bits=12.0), {"num_score_steps": 4})
    assert (scheme.formats, scheme.target_bits, scheme.num_score_steps) == (("w4a8_awq", "fp8"), 6.0, 4)
    found = differences(recipe, scheme)
    assert "the recipe leaves lm_head searchable (no disabled_layers pattern matches it): kept BF16" in found
    assert any(d.startswith("--score-steps 4 replaces the recipe's score_size 128") for d in found)
    assert not any("vision tower" in d for d in found)  # the shared units disable and cost-exclude *visual*
    assert not any("image+text" in d for d in found)
    assert any("refuses image+text calibration" in d for d in differences(recipe, scheme, images=True))
    # patterns vlq applies anyway are not carried; patterns that reach LM linears are
    assert "*visual*" not in scheme.disabled_layers and "*mlp.gate.*" in scheme.disabled_layers
    assert recipe.carried(["*mlp*", "*visual*", "*lm_head*", "*vision_tower*"]) == ("*mlp*",)


# ---- the CLI -----------------------------------------------------------------------------------------


def test_cli_refuses_missing_recipe_and_scheme_beside_it_before_heavy_imports(tmp_path):
    missing = vlq_cli("search", "--recipe", "nosuch_recipe", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert missing.returncode == 2 and len(missing.error_lines) == 1, missing.tail()
    assert "no recipe of that name ships with ModelOpt" in missing.error_lines[0]
    assert missing.heavy_imports == ()
    (tmp_path / "s.yaml").write_text(Scheme().to_yaml())
    both = vlq_cli("plan", "--recipe", W4A8, "--scheme", str(tmp_path / "s.yaml"), cwd=tmp_path)
    assert both.returncode == 2 and both.error_lines == ["vlq: error: --recipe and --scheme both give the search's scheme; "
                                                         "pass one of them."], both.tail()
    assert both.heavy_imports == ()


def test_cli_refuses_unknown_format_in_one_line(tmp_path):
    refused = run_vlq("plan", "--recipe", "nvfp4_mse_fp8_at_6p0bits", "--device", "cpu")
    lines = [line for line in refused.stderr.splitlines() if line.startswith("vlq: error:")]
    assert refused.code == 2 and len(lines) == 1 and "is not a format vlq knows; vlq knows" in lines[0]


def test_plan_reads_score_size_as_score_steps():
    planned = run_vlq("plan", "--recipe", W4A8, "--device", "cpu")
    assert planned.code == 0, planned.stderr
    assert "128 scoring steps" in planned.stdout
    assert any("lm_head searchable" in n for n in planned.notes())


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """A search from a shipped recipe, the recipe vlq writes for it, and a search from that recipe."""
    root = tmp_path_factory.mktemp("recipes")
    first = run_vlq("search", "--recipe", W4A8, "--model", "tiny-trained", "--score-steps", "4", "--out", str(root / "a"))
    written = run_vlq("recipe", str(root / "a"))
    second = run_vlq("search", "--recipe", str(root / "a" / "recipe.yaml"), "--model", "tiny-trained", "--out", str(root / "b"))
    return root, first, written, second


def test_search_from_recipe_prints_and_records_differences(round_trip):
    root, first, _, _ = round_trip
    assert first.code == 0, first.stderr
    manifest = Manifest.load(root / "a" / "manifest.json")
    assert manifest.scheme.recipe is not None and manifest.scheme.recipe.source == W4A8
    assert "the recipe leaves lm_head searchable (no disabled_layers pattern matches it): kept BF16" in manifest.scheme.recipe.differences
    assert [n.split(": ", 3)[-1] for n in first.notes()] == list(manifest.scheme.recipe.differences)  # printed = recorded
    assert {g.chosen for g in manifest.groups} <= {"w4a8_awq", "fp8", "none"}


def test_written_recipe_loads_in_modelopt_and_reproduces_the_decisions(round_trip):
    from modelopt.recipe import ModelOptAutoQuantizeRecipe, load_recipe

    root, _, written, second = round_trip
    assert written.code == 0 and second.code == 0, written.stderr + second.stderr
    loaded = load_recipe(root / "a" / "recipe.yaml")
    assert isinstance(loaded, ModelOptAutoQuantizeRecipe)
    assert {"*visual*", "*lm_head*"} <= set(loaded.auto_quantize.disabled_layers) & set(loaded.auto_quantize.cost_excluded_layers)
    a, b = (Manifest.load(root / name / "manifest.json") for name in ("a", "b"))
    assert b.scheme.recipe is not None and not any("lm_head" in d for d in b.scheme.recipe.differences)
    assert a.scheme.with_(recipe=None) == b.scheme.with_(recipe=None)
    assert [(g.name, g.chosen) for g in a.groups] == [(g.name, g.chosen) for g in b.groups]
    assert a.achieved_bits == b.achieved_bits


def test_round_trip_control_another_target_changes_the_decisions(round_trip, tmp_path):
    """The comparison above can fail: the same recipe at another effective_bits decides otherwise."""
    root, _, _, _ = round_trip
    text = (root / "a" / "recipe.yaml").read_text()
    assert "effective_bits: 6.0" in text
    (tmp_path / "lower.yaml").write_text(text.replace("effective_bits: 6.0", "effective_bits: 4.8"))
    lower = run_vlq("search", "--recipe", str(tmp_path / "lower.yaml"), "--model", "tiny-trained", "--out", str(tmp_path / "c"))
    assert lower.code == 0, lower.stderr
    a, c = Manifest.load(root / "a" / "manifest.json"), Manifest.load(tmp_path / "c" / "manifest.json")
    assert [g.chosen for g in a.groups] != [g.chosen for g in c.groups]


def test_recipe_out_refuses_a_folder_without_manifest_before_heavy_imports(tmp_path):
    refused = vlq_cli("recipe", str(tmp_path / "nothing"), cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.error_lines) == 1 and "has no manifest.json" in refused.error_lines[0]
    assert refused.heavy_imports == ()


def test_module_search_spaces_carry_over(round_trip, tmp_path):
    """A recipe that lets every down_proj choose FP8 only (no BF16) gets exactly that; the shipped recipe's own
    search (the round trip's first run) is the control: there some down_proj chose otherwise."""
    root, _, _, _ = round_trip
    text = (root / "a" / "recipe.yaml").read_text()
    assert "  cost_excluded_layers:" in text
    space = ("  module_search_spaces:\n  - module_name_patterns: ['*mlp.down_proj']\n    candidate_formats:\n"
             "    - $import: fp8\n    allow_no_quant: false\n")
    (tmp_path / "spaces.yaml").write_text(text.replace("  cost_excluded_layers:", space + "  cost_excluded_layers:"))
    searched = run_vlq("search", "--recipe", str(tmp_path / "spaces.yaml"), "--model", "tiny-trained", "--out", str(tmp_path / "s"))
    assert searched.code == 0, searched.stderr
    manifest = Manifest.load(tmp_path / "s" / "manifest.json")
    assert [(s.patterns, s.formats, s.allow_no_quant) for s in manifest.scheme.search_spaces] == [(("*mlp.down_proj",), ("fp8",), False)]
    down = {g.name: g.chosen for g in manifest.groups if g.name.endswith("down_proj")}
    assert len(down) == 4 and set(down.values()) == {"fp8"}, down
    control = Manifest.load(root / "a" / "manifest.json")
    assert {g.chosen for g in control.groups if g.name.endswith("down_proj")} != {"fp8"}
