"""Write the data files of vlq's shipped lm-eval tasks (vlq/data/tasks/*.jsonl) from their generators.

    python scripts/make_tasks.py

tests/test_evaluation.py checks the shipped files equal what the generators make.
"""

from vlq.evaluation.tasks import SHIPPED_TASKS, write_shipped

if __name__ == "__main__":
    for task in SHIPPED_TASKS.values():
        print(f"{task.name}: {len(task.generate())} rows -> {write_shipped(task)}")
