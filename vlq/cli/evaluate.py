"""``vlq eval RUN``: lm-eval task accuracy of a finished run at the measurement points, BF16 against quantized.

Bad input (no run folder, an unknown task or point, a point whose files are missing, no lm-eval) is refused in
one line before torch is imported.
"""

from __future__ import annotations

import argparse
import importlib.util

from ..inputs.requests import POINT_NAMES, ModelRequest, RunFolder
from ..runtime.errors import SchemeError, VlqError


def add_parser(subparsers) -> None:
    from ..evaluation.tasks import SHIPPED_TASKS

    p = subparsers.add_parser("eval", help="lm-eval task accuracy of a run: the BF16 model against the quantized one at "
                              "measurement points a (fake-quantized), b (checkpoint, dequantized) and c (vLLM); base, "
                              "quantized and recovery with standard errors, recorded in the manifest")
    p.add_argument("run_dir", help="folder written by `vlq run` (or `vlq search` + `vlq export`)")
    from ..evaluation.tasks import DEFAULT_TASKS

    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"lm-eval task names, comma-separated; shipped (generated, offline): {', '.join(SHIPPED_TASKS)}")
    p.add_argument("--tasks-dir", help="folder of your own lm-eval task YAMLs (local data_files; nothing is downloaded)")
    p.add_argument("--point", default="fake,checkpoint", help="fake (a), checkpoint (b), served (c, vLLM), comma-separated "
                   "(default fake,checkpoint)")
    p.add_argument("--limit", type=int, help="first N samples of each task (default all)")
    p.add_argument("--model", help="the BF16 model the run searched (default: the manifest's)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, or cuda")
    p.add_argument("--verbose", action="store_true", help="show third-party output (lm-eval, ModelOpt, vLLM)")
    p.set_defaults(func=run)


def _validate(args) -> tuple[RunFolder, list[str], tuple[str, ...]]:
    from ..evaluation.tasks import require_tasks

    folder = RunFolder(args.run_dir)
    if not folder.manifest.exists():
        raise VlqError(f"{folder.root} has no {RunFolder.MANIFEST}; pass a folder written by `vlq run` or `vlq search --out FOLDER`.")
    points = [POINT_NAMES.get(p.strip(), p.strip()) for p in args.point.split(",") if p.strip()]
    if not points or any(p not in POINT_NAMES.values() for p in points):
        raise SchemeError(f"--point takes fake, checkpoint or served (comma-separated); got {args.point!r}.")
    if "fake_quant" in points and not folder.search_state.exists():
        raise VlqError(f"{folder.root} has no {RunFolder.SEARCH_STATE} to restore the fake-quantized model (--point fake) from; "
                       "use --point checkpoint.")
    if {"checkpoint", "vllm"} & set(points) and not (folder.checkpoint / "config.json").exists():
        raise VlqError(f"{folder.root} has no exported checkpoint ({RunFolder.CHECKPOINT}/config.json) to evaluate; "
                       f"run `vlq export {folder.root}` first, or use --point fake.")
    if args.limit is not None and args.limit < 1:
        raise SchemeError(f"--limit takes a number of samples of at least 1; got {args.limit}.")
    tasks = require_tasks(args.tasks.split(","), args.tasks_dir)
    if importlib.util.find_spec("lm_eval") is None:
        raise VlqError("`vlq eval` needs lm-eval, found no lm_eval package; install vlq's eval extra (pip install -e '.[eval]').")
    if "vllm" in points and importlib.util.find_spec("vllm") is None:
        raise VlqError("--point served needs vLLM, found no vllm package; install it (scripts/install.sh installs the CPU build).")
    return folder, points, tasks


def run(args: argparse.Namespace) -> int:
    from ..runtime.console import third_party_to_log
    from ..runtime.progress import Lines, TerminalBars
    from ..runtime.runlock import RunLock

    folder, points, tasks = _validate(args)
    with RunLock(folder, command=getattr(args, "command_line", None)):
        from ..manifest.manifest import Manifest

        saved = Manifest.load(folder.manifest)
        device = args.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = ModelRequest(args.model or saved.model_source, device)
        with third_party_to_log(folder.log, verbose=args.verbose) as terminal:
            progress = TerminalBars(terminal) if getattr(terminal, "isatty", lambda: False)() else Lines(terminal)
            from .. import pipeline

            loaded = pipeline.load_model(model, progress=progress)
            evaluated = pipeline.evaluate_run(folder, loaded, points, tasks, tasks_dir=args.tasks_dir, limit=args.limit,
                                              progress=progress)
    from ..report.accuracy import accuracy_table

    times = ", ".join(f"{label} {s:.1f}s" for label, s in evaluated.seconds.items())
    print(f"Task accuracy of {folder.root} (lm-eval; recovery = quantized / BF16, ± standard errors):\n"
          + accuracy_table(evaluated.accuracy) + f"\n\nlm-eval time: {times}; recorded in {folder.manifest}", flush=True)
    return 0
