"""Measurement point c for task accuracy: vLLM serving the export, as an lm-eval model.

lm-eval's own ``vllm`` model builds its engine from a path with its own settings; vlq's
:class:`vlq.serve.runner.VllmRunner` already prepares this machine's vLLM for ModelOpt checkpoints (CPU kernels,
fused-scale workarounds, offline).  :class:`RunnerLM` is an lm-eval ``TemplateLM`` whose token scoring asks that
runner for prompt log-probabilities: lm-eval tokenizes and aggregates as for its HF model, vLLM scores.
Multiple-choice (loglikelihood) tasks only: generation tasks are refused by name.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from ..runtime.errors import VlqError

#: Prompts per vLLM call, and the longest prompt the engine is sized for.
REQUESTS_PER_CALL = 64
MAX_PROMPT_TOKENS = 512


def _runner_lm_class():
    from lm_eval.api.model import TemplateLM

    class RunnerLM(TemplateLM):
        """lm-eval model over a started VllmRunner: loglikelihood from vLLM's prompt logprobs (top 1 + own token)."""

        def __init__(self, runner, tokenizer, vocab_size: int):
            super().__init__()
            self.runner, self.tokenizer, self.vocab_size = runner, tokenizer, int(vocab_size)

        @property
        def eot_token_id(self) -> int:
            return int(self.tokenizer.eos_token_id)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            results = []
            for start in range(0, len(requests), REQUESTS_PER_CALL):
                chunk = requests[start:start + REQUESTS_PER_CALL]
                rows = [(context + continuation)[-MAX_PROMPT_TOKENS:] for _, context, continuation in chunk]
                tables = self.runner.prompt_logprobs(rows, self.vocab_size, top_k=1)
                for (_, _, continuation), row, table in zip(chunk, rows, tables):
                    positions = range(len(row) - len(continuation), len(row))
                    # table.logprobs[j - 1] is the distribution that predicts token j
                    logprob = sum(float(table.logprobs[j - 1, row[j]]) for j in positions)
                    greedy = all(int(table.logprobs[j - 1].argmax()) == row[j] for j in positions)
                    results.append((logprob, greedy))
                    self.cache_hook.add_partial("loglikelihood", None, (logprob, greedy))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise VlqError("vlq's vLLM point scores multiple-choice (loglikelihood) tasks; this task asks for rolling "
                           "perplexity: evaluate it at points a or b.")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise VlqError("vlq's vLLM point scores multiple-choice (loglikelihood) tasks; this task generates: "
                           "evaluate it at points a or b.")

    return RunnerLM


@contextlib.contextmanager
def served_lm(checkpoint: str | Path, tokenizer, vocab_size: int | None = None) -> Iterator[object]:
    """An lm-eval model over vLLM serving ``checkpoint`` (started here, shut down on exit)."""
    from ..serve.runner import VllmRunner, context_length_for

    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    with VllmRunner(checkpoint, max_model_len=context_length_for(MAX_PROMPT_TOKENS)) as runner:
        yield _runner_lm_class()(runner, tokenizer, vocab)
