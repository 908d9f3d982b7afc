"""Formats, schemes (YAML round trip, validation) and pattern-based configs applied for real."""

from __future__ import annotations

import pytest

from vlq.runtime.errors import SchemeError
from vlq.formats.registry import FORMATS, get_format, servability
from vlq.search.scheme import Scheme
from vlq.formats.modelopt_configs import all_layers_config, build_config, lm_only_config, pattern_entries


def test_scheme_id_grammar():
    scheme = Scheme(formats="fp8+int4_awq", target_bits=6.0, method="kl_div", strategy="mask")
    assert scheme.id == "fp8+int4_awq-6b-kl_div-mask"
    assert scheme.formats == ("fp8", "int4_awq")


def test_scheme_yaml_round_trip(tmp_path):
    scheme = Scheme(formats=("fp8", "w4a8_awq"), target_bits=5.5, method="kl_div", strategy="mask", num_calib_steps=3)
    path = tmp_path / "scheme.yaml"
    path.write_text(scheme.to_yaml())
    assert Scheme.from_yaml(path) == scheme
    assert "version: 2" in scheme.to_yaml() and "target_bits: 5.5" in scheme.to_yaml()


def test_version_1_scheme_reads_effective_bits_as_the_target():
    """Schemes saved before the rename (version 1) called the target ``effective_bits``."""
    old = {"formats": ["fp8", "int4_awq"], "effective_bits": 5.0, "method": "kl_div", "version": 1}
    assert Scheme.from_dict(old) == Scheme(formats=("fp8", "int4_awq"), target_bits=5.0, method="kl_div")
    # only version 1 knows the old name
    with pytest.raises(SchemeError, match=r"Unknown scheme keys \['effective_bits'\]"):
        Scheme.from_dict({**old, "version": 2})


def test_scheme_rejects_unknown_keys_and_versions():
    with pytest.raises(SchemeError, match=r"Unknown scheme keys \['bitz'\]"):
        Scheme.from_dict({"formats": ["fp8"], "bitz": 3})
    with pytest.raises(SchemeError, match="version 3 is not supported"):
        Scheme.from_dict({"formats": ["fp8"], "target_bits": 8, "version": 3})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"formats": ("fp9",)}, "Unknown format 'fp9'. Known formats: " + ", ".join(FORMATS)),
        ({"formats": ()}, "at least one format"),
        ({"formats": ("fp8", "fp8")}, "repeat"),
        ({"method": "hessian"}, "Unknown method 'hessian'"),
        ({"strategy": "all"}, "Unknown strategy 'all'"),
        ({"num_score_steps": 0}, "num_score_steps must be at least 1"),
        ({"seq_len": 1}, "seq_len must be at least 2"),
    ],
    ids=["unknown-format", "no-format", "repeated-format", "unknown-method", "unknown-strategy", "zero-steps", "short-seq"],
)
def test_scheme_validation(kwargs, message):
    with pytest.raises(SchemeError, match=message):
        Scheme(**kwargs)


def test_servability():
    assert servability(["fp8"]).servable
    assert servability(["fp8", "nvfp4"]).servable
    verdict = servability(["fp8", "int4_awq"])
    assert not verdict.servable and "int4_awq" in verdict.reason and "W4A16_AWQ" in verdict.reason
    mixed = servability(["fp8", "mxfp8"])
    assert not mixed.servable and "MIXED_PRECISION" in mixed.reason
    with pytest.raises(SchemeError, match="vLLM cannot serve"):
        Scheme(formats=("fp8", "int8_sq"), target_bits=8).require_servable()


def test_pattern_entries_name_the_global_patterns():
    entries = pattern_entries(get_format("fp8").config)
    names = {e.quantizer_name for e in entries if e.kind == "module-name"}
    assert {"*lm_head*", "*visual*", "*vision_tower*"} <= names
    assert "*weight_quantizer" not in names and "*input_quantizer" not in names
    assert any(e.kind == "parent-class" and e.parent_class == "nn.Embedding" for e in entries)
    assert all(e.in_default_disabled for e in entries)


def _quantize_copy(pristine, config, calibration):
    import modelopt.torch.quantization as mtq
    import torch

    from vlq.pipeline import fresh_copy

    loaded = fresh_copy(pristine)

    def loop(model):
        with torch.no_grad():
            for batch in calibration.batches[:1]:
                model(input_ids=batch["input_ids"])

    mtq.quantize(loaded.vlm, config, forward_loop=loop)
    return loaded


def _enabled(loaded, prefix):
    from vlq.search.guards import enabled_quantizers

    return [q for q in enabled_quantizers(loaded.vlm) if q.startswith(prefix)]


@pytest.mark.parametrize(
    "config_name, lm_head, vision",
    [("default-fp8", False, False), ("lm-only-fp8", False, False), ("all-layers-fp8", True, False), ("all-layers-fp8-with-vision", True, True)],
)
def test_configs_applied_to_the_model(pristine_vlm, calibration, config_name, lm_head, vision):
    config = {
        "default-fp8": get_format("fp8").config,
        "lm-only-fp8": lm_only_config("fp8"),
        "all-layers-fp8": all_layers_config("fp8"),
        "all-layers-fp8-with-vision": all_layers_config("fp8", include_vision=True),
    }[config_name]
    loaded = _quantize_copy(pristine_vlm, config, calibration)
    assert bool(_enabled(loaded, "lm_head.")) is lm_head
    assert bool(_enabled(loaded, "model.visual.")) is vision
    assert _enabled(loaded, "model.language_model.layers.0.self_attn.q_proj.")  # the LM is always quantized


def test_build_config_extra_disabled(pristine_vlm, calibration):
    config = build_config("fp8", extra_disabled=["*layers.0.*"])
    loaded = _quantize_copy(pristine_vlm, config, calibration)
    assert not _enabled(loaded, "model.language_model.layers.0.")
    assert _enabled(loaded, "model.language_model.layers.1.")


def test_every_format_has_a_signature():
    for fmt in FORMATS.values():
        sig = fmt.quantizer_signature()
        assert sig.weight is not None, fmt.name
    # the manifest's check against the live quantizers tells every format apart by its signature
    signatures = {fmt.quantizer_signature(): fmt.name for fmt in FORMATS.values()}
    assert len(signatures) == len(FORMATS), signatures
