"""Evaluation: held-out perplexity per category, a unigram baseline, multiple-choice accuracy.

Works for any causal LM with a tokenizer (the teacher now; TinyONN models later). Multiple-choice
items are asked in chat form (`prefix + input` as the user turn) and each choice is scored by its
length-normalised log-likelihood (mean over its tokens) as the assistant answer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tinyonn.config import DataConfig
from tinyonn.data import Example, encode_examples, iter_batches, per_sample_loss, response_token_counts


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def heldout_perplexity(model, tokenizer, examples: Sequence[Example], config: DataConfig | None = None,
                       batch_size: int = 16) -> dict[str, dict]:
    """Token-weighted mean NLL and perplexity of the response tokens, per category and overall."""
    config = config or DataConfig()
    samples, _ = encode_examples(tokenizer, list(examples), config)
    device = _device_of(model)
    nll_sum: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for batch in iter_batches(samples, batch_size, tokenizer.pad_token_id, "right"):
        logits = model(input_ids=batch.input_ids.to(device),
                       attention_mask=batch.attention_mask.to(device)).logits
        labels = batch.labels.to(device)
        losses = per_sample_loss(logits, labels)
        counts = response_token_counts(labels)
        for category, loss, n in zip(batch.categories, losses.tolist(), counts.tolist()):
            nll_sum[category] += loss * n
            count[category] += n
    return _summarise(nll_sum, count)


def _summarise(nll_sum: dict[str, float], count: dict[str, int]) -> dict[str, dict]:
    out = {}
    for category in sorted(count):
        nll = nll_sum[category] / count[category]
        out[category] = {"nll": nll, "ppl": math.exp(nll), "tokens": count[category]}
    total = sum(count.values())
    overall = sum(nll_sum.values()) / total
    out["all"] = {"nll": overall, "ppl": math.exp(overall), "tokens": total}
    return out


def unigram_counts(streams: dict[str, np.ndarray], vocab_size: int) -> np.ndarray:
    """Token counts over all training streams."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens in streams.values():
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_perplexity(counts: np.ndarray, tokenizer, examples: Sequence[Example],
                       config: DataConfig | None = None) -> dict[str, dict]:
    """Perplexity of the same response tokens under the add-one-smoothed unigram distribution."""
    config = config or DataConfig()
    logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
    samples, _ = encode_examples(tokenizer, list(examples), config)
    nll_sum: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for sample in samples:
        labels = np.asarray(sample.labels[1:])  # the shift: the first token is never predicted
        targets = labels[labels != -100]
        nll_sum[sample.category] += float(-logp[targets].sum())
        count[sample.category] += int(len(targets))
    return _summarise(nll_sum, count)


def candidate_answers(item: dict) -> tuple[list[str], int]:
    """The answers to score for an item and the index of the reference among them.

    Multiple-choice items give their choices and `answer_idx`; generation items give their
    `target` (the first one where the task lists several acceptable targets).
    """
    if item.get("choices"):
        return [str(c) for c in item["choices"]], int(item["answer_idx"])
    target = item["target"]
    return [str(target[0] if isinstance(target, list) else target)], 0


def _choice_sequences(tokenizer, item: dict, max_length: int) -> list[tuple[list[int], int]]:
    """(token ids, number of answer tokens at the end) for each candidate answer of an item."""
    question = (item.get("prefix") or "") + item["input"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for answer in candidate_answers(item)[0]:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max_length // 2] or [
            tokenizer.pad_token_id]
        keep = max_length - len(answer_ids)
        out.append((prompt_ids[-keep:] + answer_ids, len(answer_ids)))
    return out


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, items: Sequence[dict], batch_size: int = 32,
                          max_length: int = 1024) -> list[list[tuple[float, int]]]:
    """Per item, per candidate answer: (total log-likelihood of the answer's tokens given the chat
    prompt, number of answer tokens)."""
    from tqdm.auto import tqdm

    device = _device_of(model)
    rows = []  # (item index, choice index, ids, n answer tokens)
    for i, item in enumerate(items):
        for j, (ids, n) in enumerate(_choice_sequences(tokenizer, item, max_length)):
            rows.append((i, j, ids, n))
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]))
    logp_sum = np.zeros(len(rows))
    for start in tqdm(range(0, len(order), batch_size), desc="multiple choice", leave=False):
        chunk = [rows[r] for r in order[start : start + batch_size]]
        width = max(len(ids) for _, _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (_, _, ids, _) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = F.log_softmax(logits[:, :-1], dim=-1)
        token_lp = logprobs.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for row, (_, _, ids, n) in enumerate(chunk):
            logp_sum[order[start + row]] = float(token_lp[row, len(ids) - 1 - n : len(ids) - 1].sum())
    by_item: list[list[tuple[float, int]]] = [[] for _ in items]
    for r, (i, _, _, n) in enumerate(rows):
        by_item[i].append((float(logp_sum[r]), n))
    return by_item


@torch.no_grad()
def multiple_choice_eval(model, tokenizer, items: Sequence[dict], batch_size: int = 32,
                         max_length: int = 1024) -> dict[str, dict]:
    """Per category: accuracy over multiple-choice items (the best answer by length-normalised
    log-likelihood), chance, mean NLL of the reference answer; and `accuracy_total`, the best answer
    by total log-likelihood (lm-evaluation-harness's `acc`)."""
    by_item = choice_loglikelihoods(model, tokenizer, items, batch_size, max_length)
    stats: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for item, scored in zip(items, by_item):
        answer = candidate_answers(item)[1]
        total_lp, n = scored[answer]
        s = stats[item["category"]]
        s["ref_nll"].append(-total_lp / n)
        if item.get("choices") and len(item["choices"]) > 1:
            best = int(np.argmax([lp / m for lp, m in scored]))
            s["correct"].append(best == answer)
            s["correct_total"].append(int(np.argmax([lp for lp, _ in scored])) == answer)
            s["chance"].append(1.0 / len(item["choices"]))
    out = {}
    for category in sorted(stats):
        s = stats[category]
        out[category] = {
            "items": len(s["ref_nll"]),
            "mc_items": len(s["correct"]),
            "accuracy": float(np.mean(s["correct"])) if s["correct"] else None,
            "accuracy_total": float(np.mean(s["correct_total"])) if s["correct_total"] else None,
            "chance": float(np.mean(s["chance"])) if s["chance"] else None,
            "ref_nll": float(np.mean(s["ref_nll"])),
        }
    return out


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy chat answers to user prompts."""
    device = _device_of(model)
    answers = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers
