"""Train the tiny Qwen2.5-VL and write the ``tiny-trained`` checkpoint (vlq/data/tiny_trained).

    .venv/bin/python scripts/train_tiny.py --force            # retrain the shipped weights in place
    .venv/bin/python scripts/train_tiny.py --out /tmp/tt      # somewhere else
    .venv/bin/python scripts/train_tiny.py --verify           # retrain in memory, compare with the shipped weights

Training is deterministic (see ``vlq.data.training``): on the same machine type (CPU, torch version) the
same recipe gives bit-identical weights, which ``--verify`` checks against the fingerprint recorded in
``vlq/data/tiny_trained/training.json``.  A 2-core machine takes several minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    from vlq.data.shipped import TINY_TRAINED_DIR
    from vlq.data.training import TRAINING_RECORD, TrainingRecipe, save_trained, train_tiny

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(TINY_TRAINED_DIR), help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint folder")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps")
    parser.add_argument("--verify", action="store_true",
                        help="train in memory and compare the fingerprint with the shipped training.json; write nothing")
    args = parser.parse_args(argv)

    recipe = TrainingRecipe()
    if args.steps is not None:
        recipe = recipe.replace(steps=args.steps)

    def log(message: str) -> None:
        print(f"[train_tiny {time.strftime('%H:%M:%S')}] {message}", flush=True)

    trained = train_tiny(recipe, log=log)
    log(f"trained in {trained.wall_s:.0f} s; fingerprint {trained.fingerprint}")
    if args.verify:
        record = json.loads((TINY_TRAINED_DIR / TRAINING_RECORD).read_text())
        if record["recipe"] != recipe.to_dict():
            log("the shipped weights were made with another recipe; nothing to compare")
            return 1
        same = record["fingerprint"] == trained.fingerprint
        log(f"shipped fingerprint {record['fingerprint']}: {'IDENTICAL' if same else 'DIFFERENT'}")
        return 0 if same else 1
    dest = save_trained(trained, args.out, overwrite=args.force)
    record = json.loads((dest / TRAINING_RECORD).read_text())
    log(f"wrote {dest}")
    print(json.dumps({"heldout": record["heldout"], "heldout_random_tiny": record["heldout_random_tiny"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
