"""vlq.export.dequant: an exported checkpoint read back from disk equals the fake-quantized model it came from.

For every format: quantize the tiny model's language model with ModelOpt (the format's ModelOpt
config from ``vlq.formats.registry``), let vlq's export prepare it (``unify_fused_scales``, the step export
runs before ModelOpt writes, done first so the capture is what is exported), capture ModelOpt's fake
quant of the live model (``weight_quantizer(weight)``, ``input_quantizer(x)``, norm weights, logits),
export with vlq, re-read with :func:`vlq.export.dequant.dequantize_checkpoint` and compare under the
per-format tolerances of :data:`vlq.export.dequant.WEIGHT_TOLERANCES`.

* CPU lane: FP8, INT8 SmoothQuant, and a MIXED_PRECISION of INT4 AWQ (attention) and W4A8 AWQ (MLP)
  calibrated with AWQ; NVFP4, W4A16_NVFP4 and MXFP8, whose fake quant needs CUDA, are calibrated on
  CPU (ModelOpt only collects amax there) as one MIXED_PRECISION checkpoint and compared with
  vlq.export.dequant's own NVFP4/MXFP8 rule applied to the live weights.
* gpu lane: NVFP4, W4A16_NVFP4, MXFP8 and an FP8+NVFP4 mix against ModelOpt's CUDA fake quant.

Plain PTQ (``mtq.quantize``) rather than the AutoQuant search keeps the lane fast: the per-layer
tensors an export writes depend on the layer's format, not on how it was chosen.  AWQ runs with a
coarse alpha grid (0, 0.5, 1) for the same reason.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vlq.export.dequant import WEIGHT_TOLERANCES, ActivationQuant, compare_activation, compare_weight, dequantize_checkpoint
from vlq.runtime.errors import CheckpointError

N_LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


# ------------------------------------------------------------------------------------------------
# Variants: a default format plus per-module overrides, as one ModelOpt config
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    id: str
    default: str  # vlq format name applied to every LM linear
    overrides: tuple[tuple[str, str], ...] = ()  # (module pattern, vlq format) on top, last wins
    expected: tuple[tuple[str, int], ...] = ()  # quant_algo -> number of layers, on the tiny model (4 layers)

    def config(self) -> dict:
        from vlq.formats.registry import get_format

        base = get_format(self.default).config
        entries = list(base["quant_cfg"])
        for pattern, fmt in self.overrides:
            other = {e["quantizer_name"]: e for e in get_format(fmt).config["quant_cfg"] if not e.get("parent_class")}
            for kind in ("weight_quantizer", "input_quantizer"):
                entry = other.get(f"*{kind}", {"enable": False})
                entries.append({**{k: v for k, v in entry.items() if k != "quantizer_name"}, "quantizer_name": f"*{pattern}*{kind}"})
        algorithm = copy.deepcopy(base.get("algorithm", "max"))
        method = algorithm.get("method") if isinstance(algorithm, dict) else algorithm
        if method == "awq_lite":
            algorithm = {"method": "awq_lite", "alpha_step": 0.5}  # coarse grid: same layout, a fraction of the time
        return {"quant_cfg": entries, "algorithm": algorithm}


FP8 = Variant("fp8", "fp8", expected=(("FP8", 28),))
INT8_SQ = Variant("int8_sq", "int8_sq", expected=(("W8A8_SQ_PER_CHANNEL", 28),))
AWQ_MIX = Variant("int4_awq+w4a8_awq", "int4_awq", (("mlp.", "w4a8_awq"),), (("W4A16_AWQ", 16), ("W4A8_AWQ", 12)))
CUDA_MIX = Variant("nvfp4+w4a16_nvfp4+mxfp8", "nvfp4", (("mlp.gate_proj", "w4a16_nvfp4"), ("mlp.up_proj", "w4a16_nvfp4"),
                                                        ("mlp.down_proj", "mxfp8")),
                   (("MXFP8", 4), ("NVFP4", 16), ("W4A16_NVFP4", 8)))
FP8_PC_PB = Variant("fp8_pc_pt+fp8_pb_wo", "fp8_pc_pt", (("mlp.", "fp8_pb_wo"),),
                    (("FP8_PER_CHANNEL_PER_TOKEN", 16), ("fp8_pb_wo", 12)))
CPU_FAKE_QUANT = (FP8, INT8_SQ, AWQ_MIX, FP8_PC_PB)  # ModelOpt's fake quant runs on CPU for these


def _quantized(pristine_vlm, batches, variant: Variant, device: str = "cpu"):
    import modelopt.torch.quantization as mtq

    loaded = copy.deepcopy(pristine_vlm)
    loaded.vlm.to(device)

    def loop(model):
        for batch in batches:
            model(input_ids=batch["input_ids"].to(device))

    mtq.quantize(loaded.language_model, variant.config(), forward_loop=loop)
    return loaded


# ------------------------------------------------------------------------------------------------
# Capturing the live fake quant, then exporting
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    """The live fake-quantized model, captured right before export, and the checkpoint it wrote."""

    path: Path
    weights: dict  # checkpoint layer name -> weight_quantizer(weight), model dtype (None: needs CUDA)
    raw_weights: dict  # layer -> the BF16 weight the export quantizes
    weight_amax: dict  # layer -> the weight quantizer's (global) amax, float32 value
    inputs: dict  # layer -> probe input x
    activations: dict  # layer -> input_quantizer(x): pre_quant_scale applied, then quantized (None: needs CUDA)
    pre_quant_scales: dict  # layer -> live pre_quant_scale or None
    norms: dict  # checkpoint name -> RMSNorm weight before export
    input_ids: torch.Tensor
    logits: torch.Tensor | None
    num_layers: int


def _checkpoint_name(lm_relative: str) -> str:
    # the export writes the language model (model.language_model in transformers 5) as model.*
    return "model." + lm_relative


def _capture_and_export(loaded, dest: Path, *, fake_quant: bool = True) -> Captured:
    from vlq.export.export import export_checkpoint, unify_fused_scales

    lm = loaded.language_model
    unify_fused_scales(lm)
    device = loaded.device
    generator = torch.Generator().manual_seed(0)
    weights, raw, amax, inputs, activations, pqs = {}, {}, {}, {}, {}, {}
    with torch.no_grad():
        for name, module in lm.named_modules():
            if not (hasattr(module, "weight_quantizer") and hasattr(module, "in_features")):
                continue
            key = _checkpoint_name(name)
            raw[key] = module.weight.detach().cpu().clone()
            live_amax = getattr(module.weight_quantizer, "amax", None)
            amax[key] = None if live_amax is None else float(live_amax.float().max())
            # [batch, tokens, features] as the model feeds it: per-token quantizers reduce over the last dim only
            x = (torch.randn(1, 4, module.in_features, generator=generator) * 3).to(module.weight.dtype)
            inputs[key] = x
            scale = module.input_quantizer.pre_quant_scale
            pqs[key] = None if scale is None else scale.detach().cpu().clone()
            weights[key] = module.weight_quantizer(module.weight).detach().cpu() if fake_quant else None
            activations[key] = module.input_quantizer(x.to(device)).detach().cpu() if fake_quant else None
        norms = {_checkpoint_name(n) + ".weight": m.weight.detach().cpu().clone()
                 for n, m in lm.named_modules() if type(m).__name__.endswith("RMSNorm")}
        input_ids = torch.arange(16, 48).reshape(1, 32) % loaded.vocab_size
        logits = loaded.vlm(input_ids=input_ids.to(device)).logits.float().cpu() if fake_quant else None
    export_checkpoint(loaded, dest)
    return Captured(dest, weights, raw, amax, inputs, activations, pqs, norms, input_ids, logits,
                    loaded.config.text_config.num_hidden_layers)


@pytest.fixture(scope="module")
def exports(pristine_vlm, calibration, tmp_path_factory):
    """Variant id -> Captured, each quantized and exported once per module."""
    cache: dict[str, Captured] = {}
    batches = list(calibration.batches)[:1]

    def get(variant: Variant) -> Captured:
        if variant.id not in cache:
            loaded = _quantized(pristine_vlm, batches, variant)
            cache[variant.id] = _capture_and_export(
                loaded, tmp_path_factory.mktemp(variant.id) / "checkpoint", fake_quant=variant is not CUDA_MIX)
        return cache[variant.id]

    return get


@pytest.fixture(scope="module", params=CPU_FAKE_QUANT, ids=lambda v: v.id)
def variant_export(request, exports) -> tuple[Variant, Captured]:
    return request.param, exports(request.param)


# ------------------------------------------------------------------------------------------------
# CPU lane: formats whose fake quant runs on CPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [*CPU_FAKE_QUANT, CUDA_MIX], ids=lambda v: v.id)
def test_every_lm_linear_is_read_with_its_format(exports, variant):
    captured = exports(variant)
    ckpt = dequantize_checkpoint(captured.path)
    assert ckpt.algo_counts() == dict(variant.expected)
    assert ckpt.quant_algo == (variant.expected[0][0] if len(variant.expected) == 1 else "MIXED_PRECISION")
    assert ckpt.unquantized_not_excluded == (), "vision tower and lm_head must be excluded by the config"
    assert all(layer.name.startswith("model.layers.") for layer in ckpt.layers)


def test_dequantized_weights_equal_fake_quant(variant_export):
    _, captured = variant_export
    ckpt = dequantize_checkpoint(captured.path)
    results = [compare_weight(layer, captured.weights[layer.name]) for layer in ckpt.layers]
    bad = [r.describe() for r in results if not r.ok]
    assert not bad, "\n".join(bad)


def test_activation_quantization_equals_input_quantizer(variant_export):
    """Each layer's prescribed input quantization reproduces ModelOpt's input quantizer (exactly but
    for ties moved by an ulp in ``input_scale``: :data:`vlq.export.dequant.ACTIVATION_TOLERANCES`).

    Where the export folded an AWQ pre_quant_scale into the preceding RMSNorm, the layer carries
    none; the norm weight on disk must then hold ``norm * pre_quant_scale`` (BF16), and the layer's
    quantizer sees the scaled input.
    """
    _, captured = variant_export
    ckpt = dequantize_checkpoint(captured.path)
    folded = []
    for layer in ckpt.layers:
        x = captured.inputs[layer.name]
        live_pqs = captured.pre_quant_scales[layer.name]
        on_disk = layer.activation.pre_quant_scale
        if on_disk is None and live_pqs is not None:
            x = x * live_pqs.to(x.dtype)  # what the norm now does for this layer
            folded.append(layer.name)
        elif live_pqs is not None:
            assert torch.equal(on_disk, live_pqs.to(on_disk.dtype)), layer.name
        agreement = compare_activation(layer, x, captured.activations[layer.name])
        assert agreement.ok, f"{agreement.describe()}; {layer.activation.describe()}"
    if not folded:
        return
    from safetensors import safe_open

    parents = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
    with safe_open(captured.path / "model.safetensors", "pt") as fh:
        for i in range(captured.num_layers):
            for norm, readers in parents.items():
                names = [f"model.layers.{i}.{r}" for r in readers]
                if not all(n in folded for n in names):
                    continue
                key = f"model.layers.{i}.{norm}.weight"
                pqs = captured.pre_quant_scales[names[0]]
                assert all(torch.equal(captured.pre_quant_scales[n], pqs) for n in names), "fused readers share one scale"
                assert torch.equal(fh.get_tensor(key), captured.norms[key] * pqs.to(captured.norms[key].dtype)), key


def test_fp8_codes_follow_the_export_rule(exports):
    """The FP8 gap to the fake quant is the export's, not the reader's: codes are ``e4m3(bf16(w / s))``.

    ModelOpt's export divides the BF16 weight by a 0-dim float32 scale (``amax / 448``), which torch
    computes in BF16, then casts to E4M3; decoding reproduces exactly that, element for element.
    """
    captured = exports(FP8)
    ckpt = dequantize_checkpoint(captured.path)
    shares = []
    for layer in ckpt.layers:
        scale = torch.tensor(captured.weight_amax[layer.name] / 448.0)
        expected = (captured.raw_weights[layer.name] / scale).to(torch.float8_e4m3fn).float() * scale
        assert torch.equal(layer.weight(), expected), layer.name
        shares.append(compare_weight(layer, captured.weights[layer.name]).differing_share)
    assert 0 < max(shares) <= WEIGHT_TOLERANCES["FP8"].off_grid_share, shares
    keys = ckpt.keys()
    assert f"{TAMPERED}.weight" in keys and not any(k.endswith(("_scale", "_scale_2")) for k in keys)


@pytest.mark.parametrize("variant", [FP8, INT8_SQ, FP8_PC_PB], ids=lambda v: v.id)
def test_model_read_from_disk_is_the_fake_quant_model(exports, variant):
    """Everything but the quantized weights — names, norms, biases, vision tower, tied head, the
    activation hooks with their pre_quant_scales — rebuilds the fake-quantized model exactly: with
    the live fake-quantized weights put in place of the decoded ones, the logits are identical.
    (With the decoded weights they differ by the export's weight gap, bounded per layer above; the
    AWQ mix is left out because its W4A8 input ties, within tolerance, already move the logits.)"""
    captured = exports(variant)
    ckpt = dequantize_checkpoint(captured.path)
    loaded = ckpt.build_model()
    assert set(loaded.modules) == {layer.name for layer in ckpt.layers}
    assert all(name.startswith("model.language_model.") for name in loaded.quantized_modules)
    with torch.no_grad():
        for layer_name, module_name in loaded.modules.items():
            loaded.model.get_submodule(module_name).weight.copy_(captured.weights[layer_name])
        logits = loaded.model(input_ids=captured.input_ids).logits.float()
        assert torch.equal(logits, captured.logits)
        loaded.remove_hooks()
        unhooked = loaded.model(input_ids=captured.input_ids).logits.float()
    assert not torch.equal(unhooked, captured.logits), "without its input quantization the model must change"


# ------------------------------------------------------------------------------------------------
# CPU lane: CUDA-only formats, exported from a CPU calibration
# ------------------------------------------------------------------------------------------------


def test_cuda_formats_export_on_cpu_and_decode_to_their_rule(exports):
    """NVFP4/W4A16_NVFP4/MXFP8 weights on disk decode to the format's rule applied to the live BF16 weight.

    The rule is :class:`ActivationQuant`'s dynamic-block fake quant (NVFP4 with the weight's global
    scale ``amax / (6 * 448)`` in float32), so this checks packing, nibble order and both scale
    levels bit for bit; the gpu lane compares with ModelOpt's own CUDA fake quant.
    """
    captured = exports(CUDA_MIX)
    ckpt = dequantize_checkpoint(captured.path)
    kinds = {"NVFP4": "nvfp4_dynamic_block", "W4A16_NVFP4": "none", "MXFP8": "mxfp8_dynamic_block"}
    for layer in ckpt.layers:
        live = captured.raw_weights[layer.name].float()
        if layer.quant_algo == "MXFP8":
            rule = ActivationQuant("mxfp8_dynamic_block", block_size=32)
        else:
            global_scale = float(torch.tensor(captured.weight_amax[layer.name], dtype=torch.float32) / (6 * 448))
            rule = ActivationQuant("nvfp4_dynamic_block", scale=global_scale, block_size=16)
        assert torch.equal(layer.weight(), rule.apply(live)), layer.describe()
        assert layer.activation.kind == kinds[layer.quant_algo], layer.describe()
        assert layer.weight_block_size == (32 if layer.quant_algo == "MXFP8" else 16)


# ------------------------------------------------------------------------------------------------
# Negative controls
# ------------------------------------------------------------------------------------------------

TAMPERED = "model.layers.1.mlp.down_proj"


@pytest.fixture
def fp8_copy(exports, tmp_path) -> tuple[Captured, Path]:
    captured = exports(FP8)
    dest = tmp_path / "copy"
    shutil.copytree(captured.path, dest)
    return captured, dest


def _rewrite(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_configs(path: Path, edit) -> None:
    for name, section in (("config.json", "quantization_config"), ("hf_quant_config.json", "quantization")):
        data = json.loads((path / name).read_text())
        edit(data[section], name)
        (path / name).write_text(json.dumps(data))


def test_doubled_weight_scale_is_a_mismatch(fp8_copy):
    captured, path = fp8_copy
    _rewrite(path, lambda t: t.__setitem__(f"{TAMPERED}.weight_scale", t[f"{TAMPERED}.weight_scale"] * 2))
    ckpt = dequantize_checkpoint(path)
    verdicts = {layer.name: compare_weight(layer, captured.weights[layer.name]) for layer in ckpt.layers}
    assert [name for name, v in verdicts.items() if not v.ok] == [TAMPERED]
    assert verdicts[TAMPERED].differing_share > 0.9


def test_doubled_input_scale_is_a_mismatch(exports, tmp_path):
    """On INT8 (a uniform grid).  A power-of-two error in an FP8 scale only shifts the exponent, so
    it shows only where values saturate or underflow: the weight_scale control above is FP8's."""
    captured = exports(INT8_SQ)
    path = tmp_path / "copy"
    shutil.copytree(captured.path, path)
    _rewrite(path, lambda t: t.__setitem__(f"{TAMPERED}.input_scale", t[f"{TAMPERED}.input_scale"] * 2))
    layer = dequantize_checkpoint(path).layer(TAMPERED)
    agreement = compare_activation(layer, captured.inputs[TAMPERED], captured.activations[TAMPERED])
    assert not agreement.ok and agreement.differing_share > 0.3, agreement.describe()


def test_missing_scale_tensor_is_one_line_error(fp8_copy):
    _, path = fp8_copy
    _rewrite(path, lambda t: t.pop(f"{TAMPERED}.weight_scale"))
    with pytest.raises(CheckpointError, match=rf"{TAMPERED} is FP8 but {TAMPERED}\.weight_scale is missing") as info:
        dequantize_checkpoint(path)
    assert "\n" not in str(info.value)


def test_scales_without_weight_is_one_line_error(fp8_copy):
    _, path = fp8_copy
    _rewrite(path, lambda t: t.pop(f"{TAMPERED}.weight"))
    with pytest.raises(CheckpointError, match=rf"{TAMPERED} has input_scale, weight_scale but no {TAMPERED}\.weight") as info:
        dequantize_checkpoint(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("where", ["checkpoint", "layer"])
def test_unknown_quant_algo_is_one_line_error(fp8_copy, where):
    _, path = fp8_copy

    def edit(section, _name):
        if where == "checkpoint":
            section["quant_algo"] = "FP4_MAGIC"
        else:  # a MIXED_PRECISION config whose one layer names an unknown format
            section["quant_algo"] = "MIXED_PRECISION"
            section["quantized_layers"] = {TAMPERED: {"quant_algo": "FP4_MAGIC"}}

    _edit_configs(path, edit)
    with pytest.raises(CheckpointError, match=r"quant_algo 'FP4_MAGIC' .* is not one vlq\.export\.dequant reads; known: FP8, ") as info:
        dequantize_checkpoint(path)
    assert "\n" not in str(info.value)


def test_quantized_weight_the_config_excludes_is_refused(fp8_copy):
    _, path = fp8_copy

    def edit(section, name):
        key = "ignore" if name == "config.json" else "exclude_modules"
        section[key] = [*section[key], TAMPERED]

    _edit_configs(path, edit)
    with pytest.raises(CheckpointError, match=rf"{TAMPERED}\.weight is stored as F8_E4M3 .* lists no quant_algo for it"):
        dequantize_checkpoint(path)


def test_config_json_alone_is_read_like_hf_quant_config(fp8_copy):
    """vLLM reads config.json; without hf_quant_config.json the same layers and formats come out."""
    captured, path = fp8_copy
    (path / "hf_quant_config.json").unlink()
    ckpt = dequantize_checkpoint(path)
    assert ckpt.config_source == "config.json"
    assert [(l.name, l.quant_algo) for l in ckpt.layers] == [(l.name, l.quant_algo) for l in dequantize_checkpoint(captured.path).layers]


def test_disagreeing_config_copies_are_refused(fp8_copy):
    _, path = fp8_copy
    data = json.loads((path / "config.json").read_text())
    data["quantization_config"]["quant_algo"] = "NVFP4"
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config.json quantization_config has quant_algo='NVFP4' but hf_quant_config.json has 'FP8'"):
        dequantize_checkpoint(path)


def test_foreign_quantization_method_is_refused(fp8_copy):
    _, path = fp8_copy
    (path / "hf_quant_config.json").unlink()
    data = json.loads((path / "config.json").read_text())
    data["quantization_config"]["quant_method"] = "compressed-tensors"
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"quant_method='compressed-tensors'; vlq.export.dequant reads ModelOpt exports"):
        dequantize_checkpoint(path)


def test_unquantized_checkpoint_reads_as_plain_bf16(tiny_checkpoint):
    """Negative control for the reader: the BF16 original has no quantized layers and loads as is."""
    from safetensors import safe_open

    ckpt = dequantize_checkpoint(tiny_checkpoint)
    assert ckpt.quant_algo is None and ckpt.layers == ()
    with safe_open(next(tiny_checkpoint.glob("*.safetensors")), "pt") as fh:
        on_disk = {key: fh.get_tensor(key) for key in fh.keys()}
    streamed = dict(ckpt.iter_state_dict())
    assert streamed.keys() == on_disk.keys() and all(torch.equal(streamed[k], on_disk[k]) for k in on_disk)
    loaded = ckpt.build_model()
    assert loaded.quantized_modules == () and loaded.hooked_modules == ()


# ------------------------------------------------------------------------------------------------
# gpu lane: ModelOpt's CUDA fake quant of NVFP4 / W4A16_NVFP4 / MXFP8 and an FP8+NVFP4 mix
# ------------------------------------------------------------------------------------------------

GPU_VARIANTS = (
    Variant("nvfp4", "nvfp4", expected=(("NVFP4", 28),)),
    Variant("w4a16_nvfp4", "w4a16_nvfp4", expected=(("W4A16_NVFP4", 28),)),
    Variant("mxfp8", "mxfp8", expected=(("MXFP8", 28),)),
    Variant("fp8+nvfp4", "fp8", (("mlp.", "nvfp4"),), (("FP8", 16), ("NVFP4", 12))),
)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", GPU_VARIANTS, ids=lambda v: v.id)
def test_cuda_formats_equal_modelopt_fake_quant(variant, pristine_vlm, tmp_path):
    from vlq.data.calibration import synthetic_text_calibration

    batches = list(synthetic_text_calibration(pristine_vlm.config, vocab_size=pristine_vlm.vocab_size, num_batches=1,
                                              seq_len=32).batches)
    loaded = _quantized(pristine_vlm, batches, variant, device="cuda")
    captured = _capture_and_export(loaded, tmp_path / "ckpt")
    ckpt = dequantize_checkpoint(captured.path)
    assert ckpt.algo_counts() == dict(variant.expected)
    problems = []
    for layer in ckpt.layers:
        for agreement in (compare_weight(layer, captured.weights[layer.name]),
                          compare_activation(layer, captured.inputs[layer.name], captured.activations[layer.name])):
            print(agreement.describe())
            if not agreement.ok:
                problems.append(agreement.describe())
    assert not problems, "\n".join(problems)
