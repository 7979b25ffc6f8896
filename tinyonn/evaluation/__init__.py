"""Evaluation: held-out perplexity, multiple-choice accuracy, and the training-free extraction table.

- `metrics`: per-category held-out perplexity, unigram baseline, multiple-choice accuracy, samples.
- `extract`: oracle routing, router warm-up and the comparison of partitions at a unit budget.
"""
