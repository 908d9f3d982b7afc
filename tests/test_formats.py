"""The format registry: one module per format under ``vlq/formats/catalog/``, found by itself, and held equal to
what ModelOpt computes, what vLLM's ModelOpt loader accepts and what the independent dequantizer reads."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from vlq.formats import catalog
from vlq.formats.registry import (
    ALGO_TO_FORMAT, FORMATS, FUSED_GROUPS, VLLM_SERVABLE_ALGOS, VLLM_SERVABLE_IN_MIXED, color_of, discover, format_for_algo,
    fused_group_key, runnable_devices,
)
from vlq.runtime.errors import SchemeError

_FORMAT_MODULE = '''
from vlq.formats.spec import ExportAgreement, OnDiskSpec, QuantFormat

FORMAT = QuantFormat(name={name!r}, modelopt_config={config!r}, export_quant_algo={algo!r}, needs_cuda=False,
                     description="test", bits=8.0, on_disk=OnDiskSpec(("F8_E4M3",), ("weight_scale",)),
                     export_agreement=ExportAgreement(1.0, "test"), color="#000000", order={order})
'''


def _catalog(tmp_path, monkeypatch, name: str, modules: dict[str, str]):
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module, text in modules.items():
        (package / f"{module}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


def test_every_catalog_module_is_registered():
    """A format is its module: every module of the catalog defines one FORMAT, and the registry holds exactly those."""
    import pkgutil

    modules = [info.name for info in pkgutil.iter_modules(catalog.__path__)]
    formats = {importlib.import_module(f"{catalog.__name__}.{m}").FORMAT.name for m in modules}
    assert formats == set(FORMATS) and len(modules) == len(FORMATS)
    assert [f.order for f in FORMATS.values()] == sorted(f.order for f in FORMATS.values())


def test_discovery_finds_a_new_module_and_refuses_duplicates(tmp_path, monkeypatch):
    """Negative control for the discovery: a module with a FORMAT is found (in its order, whatever its file name), a
    module without one is skipped, and two formats exporting the same quant_algo are refused."""
    found = discover(_catalog(tmp_path, monkeypatch, "catalog_ok", {
        "a_second": _FORMAT_MODULE.format(name="late", config="B_CFG", algo="B", order=2),
        "z_first": _FORMAT_MODULE.format(name="early", config="A_CFG", algo="A", order=1),
        "helpers": "VALUE = 1\n",
    }))
    assert list(found) == ["early", "late"]
    clash = _catalog(tmp_path, monkeypatch, "catalog_clash", {
        "one": _FORMAT_MODULE.format(name="one", config="A_CFG", algo="SAME", order=1),
        "two": _FORMAT_MODULE.format(name="two", config="B_CFG", algo="SAME", order=2),
    })
    with pytest.raises(SchemeError, match="share export_quant_algo SAME"):
        discover(clash)


def test_registry_imports_no_torch():
    """The CLI validates formats before any heavy import: the registry and every format module stay light."""
    import subprocess

    code = ("import sys, vlq.formats.registry as r; assert r.FORMATS; "
            "print([m for m in ('torch', 'modelopt', 'transformers', 'vllm') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_bits_equal_modelopts_cost_model(name):
    """vlq keeps each format's bits as data (schemes validate without importing ModelOpt); they must equal what
    the installed ModelOpt's AutoQuant cost model counts."""
    fmt = FORMATS[name]
    assert fmt.modelopt_bits() == pytest.approx(fmt.bits)


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_facts_are_complete(name):
    """Every format says what its export holds, how far that export may sit from the search's model and why, and
    how it is drawn; a served format says how vLLM serves it."""
    fmt = FORMATS[name]
    assert fmt.on_disk.weight_dtypes and fmt.on_disk.required
    assert fmt.export_agreement.factor > 0 and fmt.export_agreement.why
    assert fmt.color.startswith("#") and color_of(name) == fmt.color
    assert format_for_algo(fmt.export_quant_algo) is fmt and ALGO_TO_FORMAT[fmt.export_quant_algo] == name
    if fmt.vllm is not None:
        assert fmt.vllm.methods and fmt.vllm.weight_dtypes and fmt.vllm.cuda_kernels
        assert fmt.vllm.reference.max_abs_logprob > 0


def _vllm_linear_algos() -> dict:
    try:
        from vlq.runtime import compat

        compat.apply_torchvision_schema_shim()
        from vllm.model_executor.layers.quantization import modelopt
    except ImportError as exc:
        pytest.skip(f"needs vLLM's ModelOpt loader to read its table, found none ({exc})")
    return modelopt.LINEAR_ALGOS


def test_servable_formats_are_vllms_linear_algos():
    """What the registry says vLLM serves is what vLLM's ModelOpt loader lists (its LINEAR_ALGOS table, which its
    MIXED_PRECISION config also routes per layer)."""
    linear = set(_vllm_linear_algos())
    served = {algo.upper() for algo in VLLM_SERVABLE_ALGOS}  # vLLM upper-cases quant_algo (ModelOpt writes fp8_pb_wo)
    assert served <= linear, served - linear
    assert VLLM_SERVABLE_IN_MIXED <= VLLM_SERVABLE_ALGOS


def test_dequantizer_reads_every_registered_format():
    """The independent dequantizer keeps its own decoding (it must not trust what it checks), but it reads exactly
    the quant_algos the registry's formats export: none missing, none extra."""
    from vlq.export.dequant import SUPPORTED_ALGOS

    assert set(SUPPORTED_ALGOS) == set(ALGO_TO_FORMAT)


def test_runnable_devices_follow_the_kernels():
    assert runnable_devices(["FP8"]) == ("cpu", "cuda")
    assert runnable_devices(["FP8", "NVFP4"]) == ("cuda",)  # negative control: one kernel-less algo takes CPU away
    assert runnable_devices([]) == ("cpu", "cuda")


def test_fused_groups_are_defined_once():
    assert FUSED_GROUPS == {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    assert fused_group_key("model.layers.3.self_attn.k_proj") == "model.layers.3.self_attn"
    assert fused_group_key("model.layers.3.mlp.up_proj") == "model.layers.3.mlp"
    assert fused_group_key("model.layers.3.mlp.down_proj") == "model.layers.3.mlp.down_proj"  # not fused: its own group


def test_guide_formats_table_is_the_registry():
    """docs/guide.md's "Which formats serve where" is generated from the registry, so a new format shows up there."""
    from vlq.formats.registry import formats_markdown

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    start = guide.index("| format | export `quant_algo` |")
    end = guide.index("<!-- end of formats table -->")
    assert guide[start:end].strip() == formats_markdown(), "regenerate the table with vlq.formats.registry.formats_markdown()"
