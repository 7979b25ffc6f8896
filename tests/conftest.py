"""Shared fixtures: a tiny random Qwen3 saved to disk with a small byte-level BPE tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; set before anything imports triton,
    # because triton.language's jit helpers (tl.sum, tl.sigmoid, ...) fix their mode at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What does the word harbour mean? A sheltered port where ships can stay.",
    "Calculate: 23 + 19 = 42. Compute 7 times 6.",
    "def add(a, b):\n    return a + b\n",
    "Translate into English: Vosotros también los de Etiopía.",
] * 20


def build_tiny_tokenizer():
    from recipes.tokenizer import train_bpe, wrap_for_transformers

    return wrap_for_transformers(train_bpe(TINY_CORPUS, vocab_size=300, min_frequency=1))


def tiny_qwen3_config(vocab_size: int, **overrides):
    from transformers import Qwen3Config

    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                    tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    settings.update(overrides)
    return Qwen3Config(**settings)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A random tiny Qwen3 (fp32) and its tokenizer saved as a Hugging Face directory."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(len(tiny_tokenizer)))
    directory = tmp_path_factory.mktemp("tiny_qwen3")
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory
