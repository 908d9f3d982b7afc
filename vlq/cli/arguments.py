"""The flags several commands share (model, data, scheme, output) and the parsers of their values; light:
nothing here imports torch."""

from __future__ import annotations

import argparse

from ..runtime.errors import SchemeError
from ..inputs.requests import TINY
from ..search.scheme import METHODS, STRATEGIES
from . import recipe as recipe_cli


def scheme_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheme (default: formats vLLM serves on the device: fp8 at 12 bits on CPU, fp8+nvfp4 at 6 on CUDA)")
    g.add_argument("--scheme", help="YAML scheme file (other scheme flags override its fields)")
    recipe_cli.add_recipe_option(g)
    g.add_argument("--formats", help="candidate formats joined by '+', e.g. fp8+nvfp4 (`vlq explain` lists them)")
    g.add_argument("--bits", type=float, dest="target_bits", help="target bits per LM weight (16 = no compression)")
    g.add_argument("--method", choices=METHODS)
    g.add_argument("--strategy", choices=STRATEGIES)
    g.add_argument("--calib-steps", type=int, dest="num_calib_steps")
    g.add_argument("--score-steps", type=int, dest="num_score_steps")
    g.add_argument("--batch-size", type=batch_size_arg, help="rows per step, or 'auto' (default for full-size models on "
                   "CUDA): the largest batch under the memory budget, the steps read as rows at batch 1, gradient "
                   "checkpointing off when the activations fit (`vlq plan` shows the choice)")
    g.add_argument("--memory-budget", type=positive_gib, metavar="GIB", help="GiB per device the search may use "
                   "(default: the free memory; auto batching grows activations by at most 20 GiB unless this is set)")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--kv-cache-fp8", action="store_true", default=None, help="add FP8 KV-cache quantization after the search")


def batch_size_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or 'auto', got {text!r}") from None


def positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of GiB, e.g. 40; got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 GiB, got {text}")
    return value


def model_args(p: argparse.ArgumentParser, *, default_model: str | None = TINY) -> None:
    default = f" (default {default_model})" if default_model else ""
    p.add_argument("--model", default=default_model,
                   help=f"local Qwen2.5-VL checkpoint folder{default}, 'tiny' (random weights: seconds, but its fidelity "
                   "numbers mean little), 'tiny-trained' (learned weights: fidelity means something) or a published shape "
                   "with random weights: qwen2.5-vl-{3b,7b,32b,72b}-random")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, or cuda")
    p.add_argument("--data", help="calibration text: a local .txt (one sample per line) or .jsonl with a 'text' field")
    p.add_argument("--images", help="image+text calibration instead of text: 'generated' (seeded synthetic images) or a "
                   "local imagefolder folder (images + metadata.jsonl) / .jsonl of image paths with a text field")
    p.add_argument("--seed", type=int, default=0, help="seed of generated images / synthetic tokens")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the checkpoint to run")


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="show third-party output (ModelOpt, transformers, vLLM) "
                   "on the terminal instead of the run's log.txt")


def positive_int(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SchemeError(f"{flag} takes a whole number of at least 1 (e.g. 16); got {text!r}.")
    return value


def float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise SchemeError(f"{flag} takes comma-separated numbers (e.g. 8,7,6); got {text!r}.") from exc
