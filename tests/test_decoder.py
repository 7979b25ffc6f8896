"""The readable decoder forward equals the Hugging Face forward."""

from __future__ import annotations

import pytest
import torch

from tinyonn import load_teacher
from tinyonn.probe.decoder import decoder_hidden_states


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_decoder_forward_equals_hugging_face(tiny_teacher_dir, padding_side):
    model, _ = load_teacher(tiny_teacher_dir, dtype=torch.float32)
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (3, 11))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 5)):
        if pad:
            mask[row, :pad] = 0 if padding_side == "left" else 1
            mask[row, -pad:] = 1 if padding_side == "left" else 0
    reference = model(input_ids=ids, attention_mask=mask).logits
    ours = model.lm_head(decoder_hidden_states(model, ids, None if padding_side == "right" else mask))
    valid = mask.bool()
    assert (ours[valid] - reference[valid]).abs().max() < 1e-5


def test_builtin_teacher_forward_matches(tmp_path):
    model, tokenizer = load_teacher("builtin", dtype=torch.float32)
    ids = tokenizer("The harbour is a sheltered port.", return_tensors="pt")["input_ids"]
    reference = model(input_ids=ids).logits
    ours = model.lm_head(decoder_hidden_states(model, ids))
    assert (ours - reference).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_decoder_forward_other_families(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (2, 9))
    reference = model(input_ids=ids).logits
    ours = model.lm_head(decoder_hidden_states(model, ids))
    assert (ours - reference).abs().max() < 1e-5
