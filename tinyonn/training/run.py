"""The training stage over a run folder: `run_dir/model/` in, `run_dir/train/` out.

    train_run("stores/runs/demo", TrainConfig(...))                     # SMK on the assembled model
    train_run(run_dir, dataclasses.replace(config, rule="selective"), output="train-selective")
    train_run(run_dir, dataclasses.replace(config, rule="full"), student="teacher", output="train-dense")

The student is `run_dir/<student>/` (a saved TinyONN model and its tokenizer), or with
`student="teacher"` a trainable copy of the teacher itself (the dense fine-tune baseline on the same
tokens). The teacher is loaded in the student's dtype. Training examples are the probe set's train
split (`config.data_source`, `config.max_examples`), validation the first
`config.validation_per_category` examples of each category of its validation split.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from tinyonn.data import Example, load_probe_set
from tinyonn.training.config import TrainConfig
from tinyonn.training.loop import train


def spread(examples: list[Example], count: int | None) -> list[Example]:
    """`count` examples taken evenly over the list (all of them for None)."""
    if count is None or count >= len(examples):
        return list(examples)
    step = len(examples) / count
    return [examples[int(i * step)] for i in range(count)]


def per_category(examples: list[Example], count: int | None) -> list[Example]:
    """The first `count` examples of each category, categories sorted (all of them for None)."""
    if count is None:
        return list(examples)
    by_category: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_category[example.category].append(example)
    return [e for category in sorted(by_category) for e in by_category[category][:count]]


def train_run(run_dir: str | Path, config: TrainConfig, teacher: str | Path = "builtin", *, resume: bool = False,
              student: str = "model", output: str = "train",
              on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train `run_dir/<student>/` (or a copy of the teacher) with KD from `teacher`; writes
    `run_dir/<output>/` (`model/`, `log.jsonl`, `checkpoints/`, `summary.json`); returns the summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tinyonn.model.modeling  # noqa: F401  (registers "tinyonn" with the Auto classes)
    from tinyonn.teacher import load_teacher

    run_dir = Path(run_dir)
    if student == "teacher":
        model, tokenizer = load_teacher(teacher)
    else:
        model_dir = run_dir / student
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no saved model in {model_dir} (run the assemble stage first)")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    teacher_model, _ = load_teacher(teacher, dtype=next(model.parameters()).dtype)
    examples = spread(load_probe_set(config.data_source, "train"), config.max_examples)
    validation = []
    if config.validation_per_category != 0:
        validation = per_category(load_probe_set(config.data_source, "validation"), config.validation_per_category)
    return train(model, teacher_model, tokenizer, examples, config, run_dir / output, validation=validation,
                 resume=resume, on_step=on_step, notes={"student": student, "teacher": str(teacher)})
