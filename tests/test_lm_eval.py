"""TinyONN under lm-evaluation-harness (`HFLM` over the loaded model) on a local multiple-choice
task gives the accuracy `tinyonn.evaluate` reports on the same items.

The two score the same answer tokens after the same chat prompt, with one difference: the harness
moves the context's trailing whitespace (the chat template's newline after "assistant") into the
continuation, so each of its log-likelihoods holds one more token, log P("\\n" | prompt), the same for
every choice of an item. Its `acc` (best total log-likelihood) therefore matches our
`accuracy_total` exactly, and our `accuracy` (best mean log-likelihood per answer token) is matched
exactly once that shared term, which the harness itself scores, is taken out. Its `acc_norm` divides
by characters, a definition of its own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from tinyonn import load_eval_set, load_teacher  # noqa: E402
from tinyonn.clustering.plan import full_plan  # noqa: E402
from tinyonn.evaluation.evaluate import _mc_overall, select_items  # noqa: E402
from tinyonn.evaluation.extract import budget_routing, routed_budgets  # noqa: E402
from tinyonn.evaluation.metrics import choice_loglikelihoods, multiple_choice_eval  # noqa: E402
from tinyonn.model.assemble import assemble  # noqa: E402

TASK = """task: tinyonn_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer_idx
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(directory, tokenizer, items) -> None:
    """A local lm-eval task: each item's chat prompt (as tinyonn asks it) and its choices."""
    with open(directory / "items.jsonl", "w") as f:
        for item in items:
            question = (item.get("prefix") or "") + item["input"]
            context = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                    add_generation_prompt=True, tokenize=False)
            f.write(json.dumps({"context": context, "choices": item["choices"], "answer_idx": item["answer_idx"],
                                "category": item["category"]}) + "\n")
    (directory / "tinyonn_mc.yaml").write_text(TASK.format(data=directory / "items.jsonl"))


def test_lm_eval_harness_gives_tinyonn_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    teacher, tokenizer = load_teacher("builtin")
    model = assemble(teacher, full_plan(8, 1536, 16, groups=4, seed=1))
    model.set_routing(budget_routing(model, routed_budgets(model, 0.5, 1536), "oracle"))
    items = select_items(load_eval_set("builtin"), 2)  # 14 items, 2 to 7 choices
    write_task(tmp_path, tokenizer, items)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=8, device="cpu")
    result = lm_eval.simple_evaluate(model=lm, tasks=["tinyonn_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                     log_samples=True, bootstrap_iters=0)
    harness = result["results"]["tinyonn_mc"]
    samples = sorted(result["samples"]["tinyonn_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items) == 14

    ours = multiple_choice_eval(model, tokenizer, items, batch_size=8)
    overall = _mc_overall(ours)  # what tinyonn.evaluate reports as "all"
    assert harness["acc,none"] == pytest.approx(overall["accuracy_total"], abs=1e-12)

    # per choice: the harness's log-likelihood is ours plus the prompt's newline token, shared by the item
    scored = choice_loglikelihoods(model, tokenizer, items, batch_size=8)
    newline = lm.loglikelihood([Instance("loglikelihood", {}, (s["doc"]["context"][:-1], "\n"), 0) for s in samples],
                               disable_tqdm=True)
    normalised = []
    for sample, item, choices, (shared, _) in zip(samples, items, scored, newline):
        harness_ll = np.array([float(r[0][0]) for r in sample["resps"]])
        our_ll = np.array([lp for lp, _ in choices])
        assert np.allclose(harness_ll - our_ll, shared, atol=2e-4)
        tokens = np.array([n for _, n in choices])
        normalised.append(int(np.argmax((harness_ll - shared) / tokens)) == item["answer_idx"])
    assert np.mean(normalised) == pytest.approx(overall["accuracy"], abs=1e-12)
    assert 0 <= harness["acc_norm,none"] <= 1  # by characters: the harness's own definition
    print(f"lm-eval acc {harness['acc,none']:.4f} = tinyonn accuracy_total {overall['accuracy_total']:.4f}; "
          f"token-normalised {np.mean(normalised):.4f} = tinyonn accuracy {overall['accuracy']:.4f}; "
          f"lm-eval acc_norm {harness['acc_norm,none']:.4f}")
