"""The embedded default: shipped teacher, probe and evaluation sets, and the card's numbers."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tinyonn import load_probe_set, load_teacher
from recipes.builtin_data import BUILTIN_DIR, document_key
from tinyonn.data import load_eval_set

TEACHER = BUILTIN_DIR / "teacher"
CATEGORIES = {"code", "math", "definition", "factual", "dialogue", "prose", "translation"}


@pytest.fixture(scope="module")
def builtin_teacher():
    return load_teacher("builtin", dtype=torch.float32)


def test_builtin_teacher_answers_a_chat_prompt_on_cpu(builtin_teacher):
    from tinyonn.evaluation.metrics import sample_answers

    model, tokenizer = builtin_teacher
    assert model.config.model_type == "qwen3" and model.config.num_hidden_layers == 8
    answer = sample_answers(model, tokenizer, ['What does the word "harbour" mean?'], max_new_tokens=24)[0]
    assert "harbour" in answer.lower()


def test_shipped_files_fit_the_budget():
    files = [p for p in BUILTIN_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 60 * 1024 * 1024
    assert all(p.stat().st_size < 16 * 1024 * 1024 for p in files)
    assert len(list(TEACHER.glob("*.safetensors"))) >= 3


def test_probe_split_sizes_and_no_document_leak():
    train, validation = load_probe_set("builtin", "train"), load_probe_set("builtin", "validation")
    totals = Counter(e.category for e in train) + Counter(e.category for e in validation)
    assert set(totals) == CATEGORIES and min(totals.values()) >= 2000
    assert set(Counter(e.category for e in validation)) == CATEGORIES

    def key(e):
        return document_key({"category": e.category, "source": e.source,
                             "prompt": e.messages[-2]["content"]})

    assert not {key(e) for e in train} & {key(e) for e in validation}


def test_eval_set_loads():
    items = load_eval_set("builtin")
    assert len(items) == 4882
    assert {i["category"] for i in items} == CATEGORIES


def test_card_numbers_beat_the_baselines():
    metrics = json.loads((TEACHER / "metrics.json").read_text())
    for category in CATEGORIES:
        teacher_ppl = metrics["heldout"][category]["ppl"]
        unigram_ppl = metrics["unigram"][category]["ppl"]
        assert teacher_ppl * 10 < unigram_ppl, category
    assert metrics["training"]["tokens"] >= 200_000_000
    card = (TEACHER / "README.md").read_text()
    assert f"{metrics['heldout']['all']['ppl']:.2f}" in card
    assert f"{metrics['eval']['math']['accuracy']:.3f}" in card


def test_card_perplexity_reproduces_on_cpu(builtin_teacher):
    """The math row of the card, recomputed here on CPU, matches the shipped metrics."""
    from tinyonn.evaluation.metrics import heldout_perplexity

    model, tokenizer = builtin_teacher
    math_items = [e for e in load_probe_set("builtin", "validation") if e.category == "math"]
    measured = heldout_perplexity(model, tokenizer, math_items)["math"]
    shipped = json.loads((TEACHER / "metrics.json").read_text())["heldout"]["math"]
    assert measured["tokens"] == shipped["tokens"]
    assert abs(measured["ppl"] - shipped["ppl"]) / shipped["ppl"] < 0.01
