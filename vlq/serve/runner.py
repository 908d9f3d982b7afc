"""The vLLM engine runner: start a real in-process ``vllm.LLM`` on a checkpoint, generate,
look inside, and return plain typed data.

:class:`VllmRunner` has test-friendly defaults (bfloat16, eager, short context, one image per
prompt), generates greedily with logprobs from a text prompt and from image+text prompts, and
inspects the loaded model with ``LLM.apply_model``.  Everything it returns
(:class:`ServingReport`) stays valid after the engine is gone; :mod:`vlq.serve.checks` checks it.

:func:`vlq.serve.resolution.preflight` refuses formats vLLM cannot serve before an engine starts; formats without
kernels here are resolved layer by layer instead (:func:`vlq.serve.resolution.resolve_quant_methods`).
"""

from __future__ import annotations

import functools
import gc
import os
import time
from pathlib import Path
from typing import Any, Sequence

from ..runtime.errors import ServingError
from .environment import default_device, prepare_environment
from .resolution import preflight, read_config
from .results import GenerationResult, KvCacheLayer, PromptLogprobTable, ServedLayer, ServingReport, VisionProbe

#: What ModelOpt writes for a never-loaded scale (vLLM's FP8 sentinel is -3.4e38).
UNLOADED_SCALE = -1e38


def _flat_prompt_logprobs(prompt_logprobs):
    """(position, token id, logprob) tensors of vLLM's prompt logprobs: its flat layout read as arrays, or
    the per-position dicts of older releases."""
    import torch

    if prompt_logprobs is None:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0, dtype=torch.float32)
    if hasattr(prompt_logprobs, "start_indices"):  # vllm.logprobs.FlatLogprobs
        starts = torch.tensor(prompt_logprobs.start_indices, dtype=torch.long)
        ends = torch.tensor(prompt_logprobs.end_indices, dtype=torch.long)
        positions = torch.repeat_interleave(torch.arange(len(starts)), ends - starts)
        return (positions, torch.tensor(prompt_logprobs.token_ids, dtype=torch.long),
                torch.tensor(prompt_logprobs.logprobs, dtype=torch.float32))
    positions, ids, values = [], [], []
    for t, step in enumerate(prompt_logprobs):
        for token, logprob in (step or {}).items():
            positions.append(t)
            ids.append(int(token))
            values.append(float(logprob.logprob))
    return (torch.tensor(positions, dtype=torch.long), torch.tensor(ids, dtype=torch.long),
            torch.tensor(values, dtype=torch.float32))


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
#: vLLM scores a prompt only while generating after it, so prompt log-probabilities cost one generated token.
PROMPT_LOGPROBS_GENERATED = 1
#: Prompt log-probabilities over the whole vocabulary up to this size; beyond it (Qwen2.5-VL: 151936) each
#: position's top PROMPT_LOGPROBS_TOP_K, since the full set is ~1 GB of numbers per 512-token row.
FULL_PROMPT_LOGPROBS_VOCAB = 8192
PROMPT_LOGPROBS_TOP_K = 256
#: The context every engine gets at least: the report's chat prompts (a question, one small image) and their
#: few generated tokens fit with room to spare.
DEFAULT_MAX_MODEL_LEN = 512


def context_length_for(longest_prompt: int, generated: int = PROMPT_LOGPROBS_GENERATED) -> int:
    """The ``max_model_len`` an engine needs for prompts of up to ``longest_prompt`` tokens plus ``generated``
    tokens after each (vLLM refuses a request whose prompt plus output exceeds it)."""
    return max(DEFAULT_MAX_MODEL_LEN, int(longest_prompt) + int(generated))


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
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
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
        self._config = read_config(self.path)
        if self.preflight.kv_cache_quant_algo is not None or kv_cache_dtype.startswith("fp8"):
            from ..formats.applicability import text_head_dim
            from ..runtime.capabilities import fp8_kv_cache_skip_reason

            reason = fp8_kv_cache_skip_reason(self.device, head_dim=text_head_dim(self._config))
            if reason is not None:  # vLLM would raise NotImplementedError while building its attention layers
                raise ServingError(f"{self.path} has an FP8 KV cache, which vLLM on {self.device} cannot run here: {reason}. "
                                   "Serve it on a CUDA GPU, or on an x86 CPU with AVX-512 or AMX.")
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
        from ..data.qwen import QWEN_CHAT_TEMPLATE

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
        for (_prompt, image), out in zip(requests, outputs):
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

    def prompt_logprobs(self, rows: Sequence[Sequence[int]], vocab_size: int, *,
                        top_k: int | None = None) -> list["PromptLogprobTable"]:
        """vLLM's log-probabilities at every position of token-id prompts, one :class:`PromptLogprobTable` per row.

        ``top_k=None``: the whole vocabulary (needs the engine started with ``max_logprobs=-1``); else each
        position's ``top_k`` most likely tokens and the prompt's own next token.  vLLM scores no token after
        the prompt, so the last row is uniform (it predicts nothing a label can check).  Requests go without
        detokenization and in vLLM's flat layout: a position's ``vocab_size`` candidates are numbers, not
        Python objects (a 151936-token vocabulary is 78 M entries per 512-token row).
        """
        import torch
        from vllm import SamplingParams

        llm = self._require_llm()
        limit = int(self.llm_kwargs["max_model_len"])
        longest = max((len(row) for row in rows), default=0)
        if longest + PROMPT_LOGPROBS_GENERATED > limit:
            raise ServingError(f"A {longest}-token prompt plus {PROMPT_LOGPROBS_GENERATED} generated token does not fit the "
                               f"engine's max_model_len={limit}; start it with max_model_len=context_length_for({longest}).")
        asked = -1 if top_k is None else int(top_k)
        params = SamplingParams(temperature=0.0, max_tokens=PROMPT_LOGPROBS_GENERATED, prompt_logprobs=asked,
                                detokenize=False, flat_logprobs=True)
        outputs = llm.generate([{"prompt_token_ids": [int(t) for t in row]} for row in rows], params, use_tqdm=False)
        tables = []
        for row, out in zip(rows, outputs):
            positions, ids, values = _flat_prompt_logprobs(out.prompt_logprobs)
            keep = (ids < vocab_size) & (positions >= 1)  # position 0: no distribution for the first prompt token
            positions, ids, values = positions[keep] - 1, ids[keep], values[keep]
            table = torch.full((len(row), vocab_size), float("-inf"), dtype=torch.float32)
            table[positions, ids] = values
            table[len(row) - 1] = 0.0
            returned = None
            if top_k is None:
                counts = torch.bincount(positions, minlength=len(row))[: len(row) - 1]
                short = (counts < vocab_size).nonzero()
                if short.numel():
                    t = int(short[0])
                    raise ServingError(f"vLLM returned {int(counts[t])} of {vocab_size} prompt logprobs at position {t + 1}; "
                                       "start the engine with max_logprobs=-1.")
            else:
                returned = torch.zeros((len(row), vocab_size), dtype=torch.bool)
                returned[positions, ids] = True
                returned[len(row) - 1] = True
            tables.append(PromptLogprobTable(table, returned))
        return tables

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
