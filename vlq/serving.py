"""Stage 7 — serve an exported checkpoint in vLLM and check what it promises, layer by layer.

:class:`VllmRunner` starts a real in-process ``vllm.LLM`` on a checkpoint folder (test-friendly
defaults: bfloat16, eager, short context, one image per prompt), generates greedily with logprobs
from a text prompt and from image+text prompts, and inspects the loaded model with
``LLM.apply_model``.  Everything it returns is plain typed data (:class:`ServingReport`), so the
checks below run after the engine is gone:

* :func:`check_vision_and_head_unquantized` — every ``visual.*`` linear and ``lm_head`` keeps an
  unquantized method (a checkpoint whose ignore list lacks the tower loads "fine" in vLLM, with
  never-loaded scales and a vision tower that outputs exactly 0);
* :func:`check_lm_layers` — every LM linear (vLLM's fused ``qkv_proj``/``o_proj``/``gate_up_proj``/
  ``down_proj``) uses the method and weight dtype the manifest (or the checkpoint config) says;
* :func:`check_outputs` — generations are finite and not degenerate;
* :func:`check_image_sensitivity` and :func:`check_vision_probe` — the vision tower really works;
* :func:`check_against_reference` — greedy tokens and logprobs agree with a BF16 reference within a
  tolerance suited to the format;
* :func:`check_kv_cache` — an FP8 KV cache is active and its calibrated scales were loaded.

Formats vLLM cannot serve are refused before an engine starts (:func:`preflight`).  Formats without
CPU kernels (NVFP4, MXFP8) are checked on CPU up to config parsing and per-layer method resolution
(:func:`resolve_quant_methods`).
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import _compat
from .errors import CheckpointError, ServingError
from .schemes import FORMATS, NO_QUANT, VLLM_SERVABLE_ALGOS, servability

# ------------------------------------------------------------------------------------------------
# Names and expectations
# ------------------------------------------------------------------------------------------------

#: vLLM fuses these checkpoint linears into one layer.
VLLM_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
VLLM_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
LM_LINEAR_RE = re.compile(r"^language_model\.model\.layers\.(\d+)\.(self_attn\.(?:qkv_proj|o_proj)|mlp\.(?:gate_up_proj|down_proj))$")
VISION_PREFIX = "visual."
LM_HEAD_NAMES = ("language_model.lm_head", "lm_head")
#: What ModelOpt writes for a never-loaded scale (vLLM's FP8 sentinel is -3.4e38).
UNLOADED_SCALE = -1e38

_ALGO_TO_FORMAT = {f.export_quant_algo: f.name for f in FORMATS.values()}
#: Algorithms with no CPU kernel in vLLM: they can only be resolved, not run, on CPU.
NO_CPU_KERNEL_ALGOS = frozenset({"NVFP4", "W4A16_NVFP4", "MXFP8"})

#: Quant-method class names per vlq format (vLLM 0.32 has one generic ModelOptLinearMethod; older
#: releases had per-format classes).
EXPECTED_METHODS: dict[str, tuple[str, ...]] = {
    "fp8": ("ModelOptLinearMethod", "ModelOptFp8LinearMethod"),
    "nvfp4": ("ModelOptLinearMethod", "ModelOptNvFp4LinearMethod"),
    "w4a16_nvfp4": ("ModelOptLinearMethod", "ModelOptNvFp4LinearMethod"),
    "mxfp8": ("ModelOptLinearMethod", "ModelOptMxFp8LinearMethod"),
}
EXPECTED_WEIGHT_DTYPES: dict[str, tuple[str, ...]] = {
    NO_QUANT: ("torch.bfloat16", "torch.float16"),
    "fp8": ("torch.float8_e4m3fn",),
    "nvfp4": ("torch.uint8",),
    "w4a16_nvfp4": ("torch.uint8",),
    "mxfp8": ("torch.float8_e4m3fn",),
}


def is_unquantized_method(name: str | None) -> bool:
    return bool(name) and name.startswith("Unquantized")


def vllm_layer_name(member: str, lm_path: str = "model.language_model", vision_root: str = "model.visual") -> str:
    """Map a transformers-5 module name to the fused layer vLLM builds for it.

    ``model.language_model.layers.0.self_attn.q_proj`` -> ``language_model.model.layers.0.self_attn.qkv_proj``.
    """
    from .export import checkpoint_module_name

    hub = checkpoint_module_name(member, lm_path, vision_root)  # model.layers.0.self_attn.q_proj
    parent, _, leaf = hub.rpartition(".")
    leaf = VLLM_FUSED.get(leaf, leaf)
    if hub == "lm_head":
        return "language_model.lm_head"
    if hub.startswith("model."):
        return f"language_model.{parent}.{leaf}"
    return f"{parent}.{leaf}" if parent else leaf


def format_of_algo(algo: str | None) -> str:
    if algo is None:
        return NO_QUANT
    return _ALGO_TO_FORMAT.get(algo, algo.lower())


def expected_lm_formats(*, manifest=None, checkpoint: str | os.PathLike | None = None) -> dict[str, str]:
    """vLLM layer name -> expected vlq format for every LM linear, from a manifest or a checkpoint config."""
    expected: dict[str, str] = {}
    conflicts: list[str] = []
    if manifest is not None:
        for group in manifest.groups:
            for member in group.members:
                name = vllm_layer_name(member, manifest.lm_path, manifest.vision_root)
                if expected.setdefault(name, group.chosen) != group.chosen:
                    conflicts.append(f"{name}: manifest gives its shards {expected[name]} and {group.chosen}")
    elif checkpoint is not None:
        from .export import CheckpointQuantConfig

        path = Path(checkpoint)
        config = CheckpointQuantConfig.read(path)
        layers = _num_text_layers(path)
        for i in range(layers):
            for parent, leaves in (("self_attn", ("qkv_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj"))):
                for leaf in leaves:
                    shards = VLLM_SHARDS.get(leaf, (leaf,))
                    formats = {format_of_algo(config.algo_for(f"model.layers.{i}.{parent}.{s}")) for s in shards}
                    name = f"language_model.model.layers.{i}.{parent}.{leaf}"
                    if len(formats) != 1:
                        conflicts.append(f"{name}: checkpoint config gives its shards {sorted(formats)}")
                    expected[name] = sorted(formats)[0]
    else:
        raise ValueError("expected_lm_formats needs manifest= or checkpoint=.")
    if conflicts:
        raise ServingError("Fused layers with mixed formats cannot be served:\n  " + "\n  ".join(conflicts))
    return expected


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ServingError(f"{path / 'config.json'} cannot be read: {exc}") from exc


def _num_text_layers(path: Path) -> int:
    config = _read_config(path)
    text = config.get("text_config") or config
    return int(text["num_hidden_layers"])


# ------------------------------------------------------------------------------------------------
# Typed results
# ------------------------------------------------------------------------------------------------


def _layer_named(layers, name: str):
    for layer in layers:
        if layer.name == name:
            return layer
    raise KeyError(name)


@dataclass(frozen=True)
class ServedLayer:
    """One module of the served (or resolved) model that carries a quant method."""

    name: str  # vLLM naming, e.g. language_model.model.layers.0.self_attn.qkv_proj
    layer_cls: str
    quant_method: str | None
    weight_dtype: str | None  # None when unknown (resolution without weights)
    scale_params: tuple[str, ...] = ()
    unloaded_scales: tuple[str, ...] = ()  # scale params still holding the never-loaded sentinel


@dataclass(frozen=True)
class KvCacheLayer:
    name: str
    kv_cache_dtype: str
    k_scale: float
    v_scale: float
    quant_method: str | None


@dataclass(frozen=True)
class GenerationResult:
    """A greedy generation: tokens, the logprob of each chosen token, and the top-k per step."""

    kind: str  # "text" or "image"
    prompt_len: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()

    def top(self, step: int) -> dict[int, float]:
        return dict(self.top_logprobs[step]) if step < len(self.top_logprobs) else {}


@dataclass(frozen=True)
class VisionProbe:
    """``model.visual`` run directly on fixed raw pixels inside the engine."""

    ran: bool
    shape: tuple[int, ...] = ()
    values: tuple[float, ...] = ()  # flattened output (small for probe-sized inputs)
    values_alt: tuple[float, ...] = ()  # the output for other pixels
    error: str = ""

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.values)

    @property
    def abs_mean(self) -> float:
        return sum(abs(v) for v in self.values) / len(self.values) if self.values else 0.0


@dataclass(frozen=True)
class ServingReport:
    """Everything a serving run observed; plain data, valid after the engine is shut down."""

    checkpoint: str
    device: str
    model_cls: str
    quant_algo: str | None
    kv_cache_dtype: str
    layers: tuple[ServedLayer, ...]
    kv_layers: tuple[KvCacheLayer, ...]
    text: GenerationResult
    image: GenerationResult
    image_alt: GenerationResult  # same prompt, a different image
    vision_probe: VisionProbe
    engine_start_s: float
    generate_s: float
    peak_rss_bytes: int = 0

    def layer(self, name: str) -> ServedLayer:
        return _layer_named(self.layers, name)


@dataclass(frozen=True)
class QuantResolution:
    """Per-layer quant methods vLLM would build for a checkpoint, resolved without kernels."""

    checkpoint: str
    quantization: str | None  # vLLM's quantization name, e.g. modelopt_fp4
    config_class: str | None
    quant_algo: str | None
    layers: tuple[ServedLayer, ...]
    kv_method: str | None
    errors: tuple[str, ...] = ()

    def layer(self, name: str) -> ServedLayer:
        return _layer_named(self.layers, name)


@dataclass(frozen=True)
class CheckResult:
    """One serving guarantee: ``ok`` and, when not, every problem found."""

    name: str
    ok: bool
    problems: tuple[str, ...]
    checked: int
    detail: str = ""

    def require(self) -> "CheckResult":
        if not self.ok:
            shown = "\n  ".join(self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise ServingError(f"{self.name} failed ({len(self.problems)} problems):\n  {shown}{more}")
        return self


def _result(name: str, problems: Sequence[str], checked: int, detail: str = "") -> CheckResult:
    return CheckResult(name, not problems, tuple(problems), checked, detail)


# ------------------------------------------------------------------------------------------------
# Preflight: refuse what cannot be served before an engine starts
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preflight:
    path: Path
    quant_algo: str | None
    algos: tuple[str, ...]  # every per-layer quant_algo in the checkpoint
    kv_cache_quant_algo: str | None
    runnable_on: tuple[str, ...]  # devices whose vLLM has kernels for every algo


def preflight(path: str | os.PathLike) -> Preflight:
    """Read a checkpoint's quant config and refuse formats vLLM cannot serve (ServingError)."""
    from .export import CheckpointQuantConfig

    path = Path(path).expanduser()
    if not path.exists():
        raise ServingError(f"Checkpoint path {path} does not exist; pass an exported checkpoint folder.")
    if not path.is_dir() or not (path / "config.json").exists():
        raise ServingError(f"{path} is not a checkpoint folder (no config.json); pass the folder vlq exported.")
    config = _read_config(path)
    if config.get("model_type") != "qwen2_5_vl":
        raise ServingError(
            f"{path} holds model_type={config.get('model_type')!r}; the serving check covers Qwen2.5-VL "
            "(model_type='qwen2_5_vl') exports."
        )
    if not any(path.glob("*.safetensors")):
        raise ServingError(f"{path} has config.json but no *.safetensors weights.")
    try:
        qc = CheckpointQuantConfig.read(path)
    except CheckpointError as exc:
        raise ServingError(f"Cannot read the quantization config of {path}: {exc}") from exc
    if qc.quant_algo is None:
        algos: tuple[str, ...] = ()
    elif qc.quant_algo == "MIXED_PRECISION":
        algos = tuple(sorted({a for a in qc.quantized_layers.values() if a}))
    else:
        algos = (qc.quant_algo,)
    unknown = [a for a in algos if a not in _ALGO_TO_FORMAT and a not in VLLM_SERVABLE_ALGOS]
    if unknown:
        raise ServingError(f"{path}: quant_algo {', '.join(unknown)} is unknown to vlq and vLLM's ModelOpt loader.")
    formats = [_ALGO_TO_FORMAT[a] for a in algos if a in _ALGO_TO_FORMAT]
    if formats:
        verdict = servability(formats)
        if not verdict.servable:
            raise ServingError(f"{path} cannot be served by vLLM: {verdict.reason}")
    runnable = ("cuda",) if any(a in NO_CPU_KERNEL_ALGOS for a in algos) else ("cpu", "cuda")
    return Preflight(path, qc.quant_algo, algos, qc.kv_cache_quant_algo, runnable)


# ------------------------------------------------------------------------------------------------
# Worker-side probes (module level so apply_model can pickle them in multiprocess mode)
# ------------------------------------------------------------------------------------------------


def summarize_layers(model) -> dict[str, Any]:
    """Runs in the vLLM worker: every module with a quant method, as plain tuples."""
    import torch

    rows = []
    kv = []
    for name, module in model.named_modules():
        quant_method = getattr(module, "quant_method", None)
        if hasattr(module, "_k_scale") and hasattr(module, "kv_cache_dtype"):
            kv.append((name, str(module.kv_cache_dtype), float(module._k_scale), float(module._v_scale),
                       type(quant_method).__name__ if quant_method is not None else None))
        if quant_method is None:
            continue
        weight = getattr(module, "weight", None)
        scales, unloaded = [], []
        for pname, param in module.named_parameters(recurse=False):
            if "scale" not in pname:
                continue
            scales.append(pname)
            if param.numel() and param.is_floating_point() and float(param.detach().float().min()) <= UNLOADED_SCALE:
                unloaded.append(pname)
        rows.append((name, type(module).__name__, type(quant_method).__name__,
                     str(weight.dtype) if isinstance(weight, torch.Tensor) else None, tuple(sorted(scales)), tuple(unloaded)))
    return {"model_cls": type(model).__name__, "layers": rows, "kv": kv}


def probe_vision(model, raw_pixels, grid_thw) -> dict[str, Any]:
    """Runs in the vLLM worker: ``model.visual`` on raw 0..255 patches (vLLM normalises on device)."""
    import torch

    try:
        param = next(model.visual.parameters())
        pixels = raw_pixels.to(device=param.device)
        with torch.no_grad():
            out = model.visual(pixels, grid_thw=grid_thw)
        out = getattr(out, "pooler_output", out)
        flat = out.detach().float().cpu().flatten()
        return {"shape": tuple(out.shape), "values": tuple(float(v) for v in flat.tolist()), "error": ""}
    except Exception as exc:  # the probe is an extra; an API difference must not hide other checks
        return {"shape": (), "values": (), "error": f"{type(exc).__name__}: {exc}"}


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------

TEXT_QUESTION = "Tell me about the sun and the river."
IMAGE_QUESTION = "Describe it."


def make_image(seed: int = 0, size: int = 56):
    """A deterministic noise image (PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _raw_pixel_patches(vision_config: dict[str, Any], seed: int = 0):
    """Raw 0..255 values in the flattened patch layout for a 4x4-patch image (grid [1, 4, 4])."""
    import torch

    ps = int(vision_config.get("patch_size", 14))
    tps = int(vision_config.get("temporal_patch_size", 2))
    channels = int(vision_config.get("in_channels", vision_config.get("in_chans", 3)))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (16, channels * tps * ps * ps), generator=generator).float(), [[1, 4, 4]]


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_device() -> str:
    from .capabilities import vllm_platform

    return vllm_platform() or "cpu"


def prepare_environment(device: str) -> None:
    """Env vars and workarounds an in-process engine needs; all CPU workarounds live in _compat."""
    _compat.apply_hf_offline()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: apply_model runs here, no pickling
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    _compat.apply_torchvision_schema_shim()
    _compat.apply_vllm_registry_inprocess()
    _compat.apply_vllm_cpu_disabled_kernels(device)


class VllmRunner:
    """A real in-process ``vllm.LLM`` with test-friendly defaults, closed cleanly on exit.

    ``with VllmRunner(path) as runner: report = runner.report()``.  Refuses (ServingError) before
    starting anything when the checkpoint's formats cannot be served, or cannot run on ``device``.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str | None = None,
        dtype: str = "bfloat16",
        max_model_len: int = 512,
        max_num_seqs: int = 4,
        enforce_eager: bool = True,
        seed: int = 0,
        kv_cache_dtype: str = "auto",
        **llm_kwargs: Any,
    ):
        self.path = Path(model).expanduser().resolve()
        self.device = device or default_device()
        self.preflight = preflight(self.path)
        if self.device not in self.preflight.runnable_on:
            raise ServingError(
                f"{self.path} uses {', '.join(self.preflight.algos)}, for which vLLM has no {self.device} "
                "kernels; serve it on a CUDA GPU, or check it with resolve_quant_methods() here."
            )
        kwargs: dict[str, Any] = dict(
            model=str(self.path), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager, seed=seed, kv_cache_dtype=kv_cache_dtype,
            limit_mm_per_prompt={"image": 1, "video": 0},
        )
        if self.device == "cuda":
            kwargs["gpu_memory_utilization"] = 0.4
        kwargs.update(llm_kwargs)
        self.llm_kwargs = kwargs
        self.llm = None
        self.engine_start_s = 0.0
        self._config = _read_config(self.path)

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "VllmRunner":
        prepare_environment(self.device)
        from vllm import LLM

        start = time.perf_counter()
        try:
            self.llm = LLM(**self.llm_kwargs)
        except Exception as exc:
            self.close()
            raise ServingError(f"vLLM could not load {self.path}: {type(exc).__name__}: {exc}") from exc
        self.engine_start_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        llm, self.llm = self.llm, None
        try:
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            if self.device == "cuda":
                import torch

                torch.cuda.empty_cache()

    def _require_llm(self):
        if self.llm is None:
            raise ServingError("The vLLM engine is not running; use `with VllmRunner(path) as runner:`.")
        return self.llm

    # -- prompts -------------------------------------------------------------------------------
    def chat_prompt(self, question: str, *, image: bool) -> str:
        """The checkpoint's own chat template applied to one user turn (with an image slot)."""
        from .models import QWEN_CHAT_TEMPLATE

        tokenizer = self._require_llm().get_tokenizer()
        content: Any = [{"type": "image"}, {"type": "text", "text": question}] if image else question
        template = getattr(tokenizer, "chat_template", None) or QWEN_CHAT_TEMPLATE
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True, chat_template=template)

    # -- generation ----------------------------------------------------------------------------
    def generate_greedy(self, requests: Sequence[tuple[str, Any]], *, max_tokens: int = 4, num_logprobs: int = 5) -> list[GenerationResult]:
        """Greedy generation for ``(prompt, image_or_None)`` requests."""
        from vllm import SamplingParams

        llm = self._require_llm()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=num_logprobs)
        inputs = []
        for prompt, image in requests:
            item: dict[str, Any] = {"prompt": prompt}
            if image is not None:
                item["multi_modal_data"] = {"image": image}
            inputs.append(item)
        outputs = llm.generate(inputs, params, use_tqdm=False)
        results = []
        for (prompt, image), out in zip(requests, outputs):
            completion = out.outputs[0]
            tokens = tuple(int(t) for t in completion.token_ids)
            steps = list(completion.logprobs or [])
            chosen, tops = [], []
            for token, step in zip(tokens, steps):
                items = {int(k): float(v.logprob) for k, v in (step or {}).items()}
                chosen.append(items.get(token, float("nan")))
                tops.append(tuple(sorted(items.items(), key=lambda kv: -kv[1])))
            results.append(GenerationResult("image" if image is not None else "text", len(out.prompt_token_ids),
                                            tokens, tuple(chosen), tuple(tops)))
        return results

    # -- inspection ----------------------------------------------------------------------------
    def _apply(self, fn):
        return self._require_llm().apply_model(fn)[0]  # one entry per worker; one worker here

    def layers(self) -> tuple[tuple[ServedLayer, ...], tuple[KvCacheLayer, ...], str]:
        summary = self._apply(summarize_layers)
        layers = tuple(ServedLayer(*row) for row in summary["layers"])
        kv = tuple(KvCacheLayer(*row) for row in summary["kv"])
        return layers, kv, summary["model_cls"]

    def vision_probe(self, seed: int = 0) -> VisionProbe:
        """``model.visual`` on two fixed raw-pixel inputs (seeds ``seed`` and ``seed + 1``)."""
        outs = []
        for s in (seed, seed + 1):
            pixels, grid = _raw_pixel_patches(self._config.get("vision_config") or {}, s)
            outs.append(self._apply(functools.partial(probe_vision, raw_pixels=pixels, grid_thw=grid)))
        error = outs[0]["error"] or outs[1]["error"]
        return VisionProbe(not error, tuple(outs[0]["shape"]), tuple(outs[0]["values"]), tuple(outs[1]["values"]), error)

    def kv_cache_dtype(self) -> str:
        return str(self._require_llm().llm_engine.vllm_config.cache_config.cache_dtype)

    def report(self, *, max_tokens: int = 4, num_logprobs: int = 5) -> ServingReport:
        """Generate (text, image, other image) and inspect the model: one :class:`ServingReport`."""
        text_prompt = self.chat_prompt(TEXT_QUESTION, image=False)
        image_prompt = self.chat_prompt(IMAGE_QUESTION, image=True)
        start = time.perf_counter()
        text, image, image_alt = self.generate_greedy(
            [(text_prompt, None), (image_prompt, make_image(0)), (image_prompt, make_image(1))],
            max_tokens=max_tokens, num_logprobs=num_logprobs,
        )
        generate_s = time.perf_counter() - start
        layers, kv, model_cls = self.layers()
        return ServingReport(
            checkpoint=str(self.path), device=self.device, model_cls=model_cls,
            quant_algo=self.preflight.quant_algo, kv_cache_dtype=self.kv_cache_dtype(),
            layers=layers, kv_layers=kv, text=text, image=image, image_alt=image_alt,
            vision_probe=self.vision_probe(), engine_start_s=self.engine_start_s, generate_s=generate_s,
            peak_rss_bytes=_peak_rss(),
        )


def serve_checkpoint(path: str | os.PathLike, *, max_tokens: int = 4, **runner_kwargs: Any) -> ServingReport:
    """Start an engine on ``path``, collect a :class:`ServingReport`, and shut the engine down."""
    with VllmRunner(path, **runner_kwargs) as runner:
        return runner.report(max_tokens=max_tokens)


# ------------------------------------------------------------------------------------------------
# Resolution without kernels (formats with no CPU kernels)
# ------------------------------------------------------------------------------------------------

_MODELOPT_QUANTIZATIONS = ("modelopt", "modelopt_fp4", "modelopt_mxfp8", "modelopt_mixed")


def _vllm_layer_inventory(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(vLLM name, vLLM layer class) of every linear Qwen2.5-VL builds, from its HF config."""
    text = config.get("text_config") or config
    vision = config.get("vision_config") or {}
    rows = []
    for i in range(int(vision.get("depth", 0))):
        p = f"visual.blocks.{i}"
        rows += [(f"{p}.attn.qkv", "QKVParallelLinear"), (f"{p}.attn.proj", "RowParallelLinear"),
                 (f"{p}.mlp.gate_up_proj", "MergedColumnParallelLinear"), (f"{p}.mlp.down_proj", "RowParallelLinear")]
    rows += [("visual.merger.mlp.0", "ColumnParallelLinear"), ("visual.merger.mlp.2", "RowParallelLinear")]
    for i in range(int(text["num_hidden_layers"])):
        p = f"language_model.model.layers.{i}"
        rows += [(f"{p}.self_attn.qkv_proj", "QKVParallelLinear"), (f"{p}.self_attn.o_proj", "RowParallelLinear"),
                 (f"{p}.mlp.gate_up_proj", "MergedColumnParallelLinear"), (f"{p}.mlp.down_proj", "RowParallelLinear")]
    rows.append(("language_model.lm_head", "ParallelLMHead"))
    return rows


def _choose_quantization(quant_cfg: dict[str, Any]) -> str | None:
    """vLLM's choice among its ModelOpt configs, as ``ModelConfig._verify_quantization`` makes it."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    for name in _MODELOPT_QUANTIZATIONS:
        cls = get_quantization_config(name)
        try:
            claimed = cls.override_quantization_method(quant_cfg, None, hf_config=None)
        except TypeError:
            claimed = cls.override_quantization_method(quant_cfg, None)
        if claimed is not None:
            return claimed
    return quant_cfg.get("quant_method")


def resolve_quant_methods(checkpoint_path: str | os.PathLike) -> QuantResolution:
    """Per-layer quant methods vLLM would build for ``checkpoint_path``, without kernels or weights.

    Parses the checkpoint's quantization config exactly as vLLM does (config.json first, then
    hf_quant_config.json), maps names with Qwen2.5-VL's ``hf_to_vllm_mapper`` and asks
    ``get_quant_method`` for each linear, using bare layer objects (kernels are chosen only later,
    in ``create_weights``).  Works for NVFP4/MXFP8 on CPU, where no kernel exists.
    """
    path = Path(checkpoint_path).expanduser().resolve()
    preflight(path)
    prepare_environment(default_device())
    from torch import nn
    from vllm.model_executor.layers import linear as vllm_linear
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VllmQwen25VL

    config = _read_config(path)
    quant_cfg = config.get("quantization_config")
    hf_file = path / "hf_quant_config.json"
    if quant_cfg is None and hf_file.exists():
        quant_cfg = json.loads(hf_file.read_text())
        quant_cfg.setdefault("quant_method", "modelopt")
    inventory = _vllm_layer_inventory(config)
    if quant_cfg is None:
        layers = tuple(ServedLayer(n, c, "UnquantizedLinearMethod" if c != "ParallelLMHead" else "UnquantizedEmbeddingMethod", None)
                       for n, c in inventory)
        return QuantResolution(str(path), None, None, None, layers, None)

    quantization = _choose_quantization(dict(quant_cfg))
    cls = get_quantization_config(quantization)
    qc = cls.from_config(quant_cfg)
    qc.packed_modules_mapping = dict(getattr(VllmQwen25VL, "packed_modules_mapping", {}))
    qc.apply_vllm_mapper(VllmQwen25VL.hf_to_vllm_mapper)

    classes = {"ParallelLMHead": ParallelLMHead}
    layers, errors = [], []
    for name, cls_name in inventory:
        layer_cls = classes.get(cls_name) or getattr(vllm_linear, cls_name)
        layer = object.__new__(layer_cls)  # isinstance-compatible, no TP groups, no weights
        nn.Module.__init__(layer)
        try:
            method = qc.get_quant_method(layer, name)
        except Exception as exc:  # e.g. "Mixed quant_algo within fused layer"
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            layers.append(ServedLayer(name, cls_name, None, None))
            continue
        method_name = type(method).__name__ if method is not None else None
        weight = getattr(getattr(method, "spec", None), "weight", None)
        dtype = str(weight.dtype) if weight is not None and getattr(weight, "dtype", None) is not None else None
        if is_unquantized_method(method_name):
            dtype = None
        layers.append(ServedLayer(name, cls_name, method_name, dtype))

    kv_method = None
    try:
        from vllm.model_executor.layers.attention import Attention  # type: ignore[attr-defined]
    except ImportError:
        try:
            from vllm.attention.layer import Attention  # type: ignore[no-redef]
        except ImportError:
            Attention = None
    if Attention is not None:
        attn = object.__new__(Attention)
        nn.Module.__init__(attn)
        try:
            method = qc.get_quant_method(attn, "language_model.model.layers.0.self_attn.attn")
            kv_method = type(method).__name__ if method is not None else None
        except Exception as exc:
            errors.append(f"attention: {type(exc).__name__}: {exc}")
    return QuantResolution(str(path), quantization, cls.__name__, quant_cfg.get("quant_algo") or
                           (quant_cfg.get("quantization") or {}).get("quant_algo"), tuple(layers), kv_method, tuple(errors))


# ------------------------------------------------------------------------------------------------
# Guarantees
# ------------------------------------------------------------------------------------------------


def _layers_of(source) -> tuple[ServedLayer, ...]:
    return tuple(source.layers) if hasattr(source, "layers") else tuple(source)


def check_vision_and_head_unquantized(source) -> CheckResult:
    """Every ``visual.*`` module with a quant method, and ``lm_head``, are unquantized with loaded weights."""
    layers = _layers_of(source)
    problems = []
    vision = [l for l in layers if l.name.startswith(VISION_PREFIX)]
    heads = [l for l in layers if l.name in LM_HEAD_NAMES]
    if not vision:
        problems.append("no vision-tower layer (visual.*) found in the served model")
    if not heads:
        problems.append("no lm_head found in the served model")
    for layer in vision + heads:
        if not is_unquantized_method(layer.quant_method):
            problems.append(f"{layer.name} ({layer.layer_cls}) uses {layer.quant_method}, expected Unquantized*")
        if layer.weight_dtype is not None and layer.weight_dtype not in EXPECTED_WEIGHT_DTYPES[NO_QUANT]:
            problems.append(f"{layer.name} weight dtype {layer.weight_dtype}, expected bf16/fp16")
        if layer.unloaded_scales:
            problems.append(f"{layer.name} has never-loaded scales {list(layer.unloaded_scales)}")
    return _result("vision tower and lm_head unquantized", problems, len(vision) + len(heads),
                   f"{len(vision)} vision layers, lm_head")


def check_lm_layers(source, expected: dict[str, str]) -> CheckResult:
    """Every LM linear uses the quant method and weight dtype of its expected format."""
    layers = {l.name: l for l in _layers_of(source) if LM_LINEAR_RE.match(l.name)}
    problems = []
    for name in sorted(set(expected) - set(layers)):
        problems.append(f"{name}: expected {expected[name]}, but vLLM built no such layer")
    for name in sorted(set(layers) - set(expected)):
        problems.append(f"{name}: served as {layers[name].quant_method} but has no expected format")
    for name in sorted(set(layers) & set(expected)):
        layer, fmt = layers[name], expected[name]
        if fmt == NO_QUANT:
            ok_method = is_unquantized_method(layer.quant_method)
        else:
            ok_method = layer.quant_method in EXPECTED_METHODS.get(fmt, ())
        if not ok_method:
            want = "Unquantized*" if fmt == NO_QUANT else "/".join(EXPECTED_METHODS.get(fmt, ("?",)))
            problems.append(f"{name}: expected {fmt} ({want}), vLLM uses {layer.quant_method}")
        dtypes = EXPECTED_WEIGHT_DTYPES.get(fmt)
        if layer.weight_dtype is not None and dtypes and layer.weight_dtype not in dtypes:
            problems.append(f"{name}: expected {fmt} weight dtype {'/'.join(dtypes)}, found {layer.weight_dtype}")
        if layer.unloaded_scales:
            problems.append(f"{name} has never-loaded scales {list(layer.unloaded_scales)}")
    counts: dict[str, int] = {}
    for fmt in expected.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return _result("LM layers match the manifest", problems, len(expected), detail)


def _uniform(step: tuple[tuple[int, float], ...]) -> bool:
    values = [lp for _, lp in step]
    return len(values) >= 2 and max(values) - min(values) < 1e-6


def check_outputs(generations: Iterable[GenerationResult] | ServingReport) -> CheckResult:
    """Generations exist, their logprobs are finite, and the distribution is not flat.

    A random-weight model legitimately repeats one token, so repetition alone is no failure; a
    flat top-k at every step (zero logits, a dead model) is.
    """
    if isinstance(generations, ServingReport):
        generations = (generations.text, generations.image, generations.image_alt)
    generations = tuple(generations)
    problems = []
    for g in generations:
        label = f"{g.kind} generation"
        if not g.token_ids:
            problems.append(f"{label} produced no tokens")
            continue
        bad = [i for i, lp in enumerate(g.logprobs) if not math.isfinite(lp) or lp > 1e-6]
        if bad or len(g.logprobs) != len(g.token_ids):
            problems.append(f"{label}: missing or non-finite logprobs at steps {bad or 'all'}")
        bad_top = [i for i, step in enumerate(g.top_logprobs) if any(not math.isfinite(lp) for _, lp in step)]
        if bad_top:
            problems.append(f"{label}: non-finite top-k logprobs at steps {bad_top}")
        if g.top_logprobs and all(_uniform(step) for step in g.top_logprobs):
            problems.append(
                f"{label} is degenerate: the top-{len(g.top_logprobs[0])} logprobs are equal at every step "
                f"(tokens {list(g.token_ids)}, logprob {g.logprobs[0]:.4f})"
            )
    return _result("outputs finite and not degenerate", problems, len(generations))


def check_image_sensitivity(report: ServingReport, *, min_delta: float = 1e-6) -> CheckResult:
    """Two different images give different step-0 logprobs (a dead vision tower gives identical ones)."""
    a, b = report.image.top(0), report.image_alt.top(0)
    shared = set(a) & set(b)
    problems = []
    if not a or not b:
        problems.append("no step-0 logprobs for the image prompts")
        delta = float("nan")
    elif not shared:
        delta = float("inf")  # different top-k sets: the image clearly matters
    else:
        delta = max(abs(a[k] - b[k]) for k in shared)
        if not delta > min_delta:
            problems.append(
                f"step-0 logprobs are identical for two different images (max |Δ| {delta:.2e} <= {min_delta:g}): "
                "the output does not depend on the image, so the vision tower is not working"
            )
    return _result("image changes the output", problems, 1, f"max |Δ step-0 logprob| {delta:.4g}")


def check_vision_probe(report: ServingReport, reference: ServingReport | None = None, *, min_cos: float = 0.99) -> CheckResult:
    """``model.visual`` on fixed raw pixels gives a finite output that depends on the pixels (and is close
    to the reference's)."""
    probe = report.vision_probe
    problems = []
    if not probe.ran:
        return _result("vision tower output (raw-pixel probe)", [], 0, f"not run: {probe.error}")
    if not probe.values:
        problems.append("the vision tower returned an empty output")
    elif not probe.finite:
        problems.append("the vision tower output is not finite")
    elif probe.abs_mean == 0.0:
        problems.append("the vision tower output is exactly 0 (quantized with never-loaded scales?)")
    elif probe.values_alt and max(abs(a - b) for a, b in zip(probe.values, probe.values_alt)) <= 1e-6:
        problems.append(
            "the vision tower output does not depend on its pixels (two inputs give the same output: "
            "its linears compute 0 and only biases remain; quantized with never-loaded scales?)"
        )
    detail = f"|mean| {probe.abs_mean:.4g}"
    if reference is not None and reference.vision_probe.ran and not problems:
        ref = reference.vision_probe.values
        if len(ref) != len(probe.values):
            problems.append(f"vision output size {len(probe.values)} != reference {len(ref)}")
        else:
            dot = sum(x * y for x, y in zip(probe.values, ref))
            norm = math.sqrt(sum(x * x for x in probe.values)) * math.sqrt(sum(y * y for y in ref))
            cos = dot / norm if norm else 0.0
            detail += f", cos vs reference {cos:.4f}"
            if cos < min_cos:
                problems.append(f"vision output cos {cos:.4f} vs the BF16 reference < {min_cos}")
    return _result("vision tower output (raw-pixel probe)", problems, 1, detail)


@dataclass(frozen=True)
class Tolerance:
    """How close a quantized model's greedy steps must stay to the BF16 reference's.

    ``max_abs_logprob`` bounds |Δ logprob| of the reference's greedy token at every compared step.
    With ``same_tokens`` the greedy tokens must agree, except at a near-tie: a step where the
    reference itself ranks the quantized model's choice within ``2 * max_abs_logprob`` of its own
    top-1 (random-weight models have nearly flat distributions).  Comparison stops at the first
    differing token, since the contexts diverge after it.
    """

    same_tokens: bool
    max_abs_logprob: float


#: Per format.  FP8 was measured on the tiny model with text-only calibration: |Δ| ≤ 0.03 on text
#: prompts, up to 0.22 on image prompts (static activation scales calibrated on text only), and
#: greedy flips only at near-ties (top-1/top-2 gaps of 0.05-0.33).  4-bit formats may flip tokens.
TOLERANCES: dict[str, Tolerance] = {
    NO_QUANT: Tolerance(True, 0.02),
    "fp8": Tolerance(True, 0.25),
    "mxfp8": Tolerance(True, 0.3),
    "nvfp4": Tolerance(False, 0.6),
    "w4a16_nvfp4": Tolerance(False, 0.6),
}


def tolerance_for(report: ServingReport) -> Tolerance:
    from .export import CheckpointQuantConfig

    formats = {NO_QUANT}
    try:
        qc = CheckpointQuantConfig.read(report.checkpoint)
        if qc.quant_algo == "MIXED_PRECISION":
            formats |= {format_of_algo(a) for a in qc.quantized_layers.values()}
        elif qc.quant_algo is not None:
            formats.add(format_of_algo(qc.quant_algo))
        if qc.kv_cache_quant_algo is not None:
            formats.add("fp8")
    except CheckpointError:
        pass
    chosen = [TOLERANCES.get(f, Tolerance(False, 0.6)) for f in formats]
    return Tolerance(all(t.same_tokens for t in chosen), max(t.max_abs_logprob for t in chosen))


def check_against_reference(report: ServingReport, reference: ServingReport, tolerance: Tolerance | None = None) -> CheckResult:
    """Greedy steps agree with a BF16 reference within the format's :class:`Tolerance`."""
    tol = tolerance or tolerance_for(report)
    problems = []
    worst = 0.0
    labels = ("text", "image", "other image")
    pairs = ((report.text, reference.text), (report.image, reference.image), (report.image_alt, reference.image_alt))
    for label, (mine, ref) in zip(labels, pairs):
        if mine.prompt_len != ref.prompt_len:
            problems.append(f"{label}: prompt length {mine.prompt_len} != reference {ref.prompt_len}")
            continue
        if not mine.token_ids or not ref.token_ids:
            problems.append(f"{label}: no tokens to compare")
            continue
        for step, (tok, ref_tok) in enumerate(zip(mine.token_ids, ref.token_ids)):
            mine_top = mine.top(step)
            got = mine.logprobs[step] if tok == ref_tok else mine_top.get(ref_tok)
            if got is None:
                problems.append(f"{label}: reference token {ref_tok} is not in the top-{len(mine_top)} at step {step}")
                break
            delta = abs(got - ref.logprobs[step])
            worst = max(worst, delta)
            if not delta <= tol.max_abs_logprob:
                problems.append(f"{label}: |Δ logprob| {delta:.4f} > {tol.max_abs_logprob} at step {step}")
            if tok != ref_tok:
                ref_of_mine = ref.top(step).get(tok)
                gap = ref.logprobs[step] - ref_of_mine if ref_of_mine is not None else float("inf")
                if tol.same_tokens and not gap <= 2 * tol.max_abs_logprob:
                    problems.append(
                        f"{label}: greedy token {tok} != reference {ref_tok} at step {step}, and not a near-tie "
                        f"(the reference ranks it {gap:.3f} below its top-1)"
                    )
                break  # contexts diverge from here
    return _result("agrees with the BF16 reference", problems, len(pairs),
                   f"max |Δ logprob| {worst:.4f} (tolerance {tol.max_abs_logprob}{', same tokens but near-ties' if tol.same_tokens else ''})")


def check_kv_cache(report: ServingReport, *, checkpoint: str | os.PathLike | None = None) -> CheckResult:
    """An FP8 KV cache is active for every LM attention layer and the calibrated k/v scales were loaded."""
    problems = []
    lm_kv = [k for k in report.kv_layers if k.name.startswith("language_model.")]
    if not report.kv_cache_dtype.startswith("fp8"):
        problems.append(f"engine kv_cache_dtype is {report.kv_cache_dtype}, expected fp8")
    if not lm_kv:
        problems.append("no language-model attention layer reports a KV cache")
    stored = _stored_kv_scales(Path(checkpoint or report.checkpoint))
    for layer in lm_kv:
        if not layer.kv_cache_dtype.startswith("fp8"):
            problems.append(f"{layer.name}: kv_cache_dtype {layer.kv_cache_dtype}, expected fp8")
        match = re.search(r"layers\.(\d+)\.", layer.name)
        want = stored.get(int(match.group(1))) if match else None
        if want is None:
            problems.append(f"{layer.name}: the checkpoint has no k_scale/v_scale for this layer")
            continue
        for label, got, exp in (("k_scale", layer.k_scale, want[0]), ("v_scale", layer.v_scale, want[1])):
            if not (math.isfinite(got) and abs(got - exp) <= 1e-2 * abs(exp)):
                problems.append(f"{layer.name}: served {label} {got:.6g} != checkpoint {exp:.6g} (scale not loaded)")
    return _result("FP8 KV cache with calibrated scales", problems, len(lm_kv),
                   f"{report.kv_cache_dtype}, {len(lm_kv)} attention layers")


def _stored_kv_scales(path: Path) -> dict[int, tuple[float, float]]:
    from safetensors import safe_open

    found: dict[int, dict[str, float]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            for key in fh.keys():
                match = re.search(r"layers\.(\d+)\.self_attn\.[kv]_proj\.([kv]_scale)$", key)
                if match:
                    found.setdefault(int(match.group(1)), {})[match.group(2)] = float(fh.get_tensor(key).float())
    return {i: (d["k_scale"], d["v_scale"]) for i, d in found.items() if "k_scale" in d and "v_scale" in d}


def run_checks(report: ServingReport, *, manifest=None, reference: ServingReport | None = None) -> tuple[CheckResult, ...]:
    """Every guarantee that applies to ``report`` (LM expectations from the manifest, else the config)."""
    expected = expected_lm_formats(manifest=manifest) if manifest is not None else expected_lm_formats(checkpoint=report.checkpoint)
    checks = [
        check_vision_and_head_unquantized(report),
        check_lm_layers(report, expected),
        check_outputs(report),
        check_image_sensitivity(report),
        check_vision_probe(report, reference),
    ]
    if reference is not None:
        checks.append(check_against_reference(report, reference))
    if report.kv_layers and preflight(report.checkpoint).kv_cache_quant_algo is not None:
        checks.append(check_kv_cache(report))
    return tuple(checks)


def check_resolution(resolution: QuantResolution, *, manifest=None) -> tuple[CheckResult, ...]:
    """The guarantees that hold without kernels: per-layer methods only."""
    expected = expected_lm_formats(manifest=manifest) if manifest is not None else expected_lm_formats(checkpoint=resolution.checkpoint)
    checks = [check_vision_and_head_unquantized(resolution), check_lm_layers(resolution, expected)]
    if resolution.errors:
        checks.append(_result("quant config resolves", resolution.errors, len(resolution.layers)))
    return tuple(checks)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def layer_table(layers: Sequence[ServedLayer], expected: dict[str, str] | None = None, fmt: str = "github") -> str:
    from tabulate import tabulate

    rows = []
    for layer in layers:
        if not (layer.name.startswith(VISION_PREFIX) or LM_LINEAR_RE.match(layer.name) or layer.name in LM_HEAD_NAMES):
            continue
        want = (expected or {}).get(layer.name, NO_QUANT if not LM_LINEAR_RE.match(layer.name) else "?")
        rows.append([layer.name, layer.layer_cls, layer.quant_method, layer.weight_dtype or "-", want])
    return tabulate(rows, headers=["layer (vLLM)", "class", "quant method", "weight dtype", "expected"], tablefmt=fmt)


def checks_table(checks: Sequence[CheckResult], fmt: str = "github") -> str:
    from tabulate import tabulate

    rows = []
    for c in checks:
        detail = c.detail if c.ok else "; ".join(c.problems[:3]) + (f" (+{len(c.problems) - 3} more)" if len(c.problems) > 3 else "")
        rows.append([c.name, "PASS" if c.ok else "FAIL", detail])
    return tabulate(rows, headers=["check", "result", "detail"], tablefmt=fmt)


def _find_manifest(path: Path, given: str | None):
    from .manifest import Manifest

    if given:
        return Manifest.load(given), Path(given)
    sibling = path.parent / "manifest.json"  # `vlq run` layout: runs/<id>/{manifest.json,checkpoint/}
    if sibling.exists():
        return Manifest.load(sibling), sibling
    return None, None


def check_cli(args) -> int:
    """``vlq check PATH [--manifest M] [--reference BF16_PATH]``: 0 when every check passes, else 1."""
    path = Path(args.path).expanduser().resolve()
    pre = preflight(path)
    manifest, manifest_path = _find_manifest(path, getattr(args, "manifest", None))
    reference_path = getattr(args, "reference", None)
    if reference_path:
        preflight(reference_path)
    source = f"manifest {manifest_path}" if manifest is not None else "the checkpoint's quantization config"
    expected = expected_lm_formats(manifest=manifest) if manifest is not None else expected_lm_formats(checkpoint=path)
    device = default_device()
    print(f"vlq check {path} ({pre.quant_algo or 'unquantized'}; expectations from {source}; vLLM on {device})", flush=True)

    if device not in pre.runnable_on:
        resolution = resolve_quant_methods(path)
        checks = check_resolution(resolution, manifest=manifest)
        print(layer_table(resolution.layers, expected))
        print()
        print(checks_table(checks))
        print(f"\nvLLM has no {device} kernels for {', '.join(pre.algos)}: checked config parsing and per-layer "
              "method resolution only; generation NOT run.")
        return 0 if all(c.ok for c in checks) else 1

    reference = serve_checkpoint(reference_path, device=device) if reference_path else None
    report = serve_checkpoint(path, device=device)
    checks = run_checks(report, manifest=manifest, reference=reference)
    print(layer_table(report.layers, expected))
    print()
    print(checks_table(checks))
    print(f"\nengine start {report.engine_start_s:.1f}s, generation {report.generate_s:.1f}s; "
          f"text tokens {list(report.text.token_ids)}, image tokens {list(report.image.token_ids)}")
    return 0 if all(c.ok for c in checks) else 1
