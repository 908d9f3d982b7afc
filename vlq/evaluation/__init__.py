"""Task accuracy through lm-eval: shipped generated tasks (:mod:`.tasks`), scores of a model vlq holds
(:mod:`.scoring`), BF16 against quantized (:mod:`.results`), vLLM as an lm-eval model (:mod:`.served`).

For a caller with two models in memory (e.g. a study's frontier point)::

    from vlq.evaluation.scoring import score_tasks
    from vlq.pipeline import task_accuracy
    base = score_tasks(bf16.vlm, bf16.tokenizer, ["vlq_sequences"])
    quantized = score_tasks(fake_quantized.vlm, bf16.tokenizer, ["vlq_sequences"])
    results = task_accuracy(base, quantized, "fake_quant")   # tuple[TaskAccuracy]: recovery ± error

Light at import (the CLI validates task names without torch).
"""
