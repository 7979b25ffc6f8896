"""Where the embedded default lives: the builtin teacher, its tokenizer, the probe and evaluation sets.

The repository's `stores/builtin/` folder is the package `tinyonn.builtin` (pyproject maps it), so the
files are found through `importlib.resources` both in a checkout and in an installed wheel.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def builtin_dir() -> Path:
    """The folder holding `teacher/`, `probe/` and `eval/` of the embedded default."""
    return Path(str(files("tinyonn.builtin")))


def builtin_teacher_dir() -> Path:
    return builtin_dir() / "teacher"


def builtin_probe_dir() -> Path:
    return builtin_dir() / "probe"


def builtin_eval_file() -> Path:
    return builtin_dir() / "eval" / "eval.jsonl.gz"
