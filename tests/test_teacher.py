"""Teacher loading: round trips, nf4/int8 dequantisation, FFN layout, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from tinyonn import TeacherNotFoundError, UnsupportedArchitectureError, dequantize, ffn_layout, load_teacher


def test_round_trip_fp32_and_bf16(tiny_teacher_dir, tmp_path):
    ids = torch.randint(3, 200, (2, 12))
    model, tokenizer = load_teacher(tiny_teacher_dir, dtype=torch.float32)
    reference = model(ids).logits
    for dtype in (torch.float32, torch.bfloat16):
        out = tmp_path / str(dtype)
        model.to(dtype).save_pretrained(out)
        tokenizer.save_pretrained(out)
        loaded, loaded_tok = load_teacher(out, dtype=dtype)
        assert next(loaded.parameters()).dtype == dtype
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        logits = loaded(ids).logits.float()
        if dtype == torch.float32:
            assert torch.equal(logits, reference)
        else:
            assert (logits - reference).abs().max() < 0.1
        assert loaded_tok("harbour")["input_ids"] == tokenizer("harbour")["input_ids"]
    model.to(torch.float32)


def test_ffn_layout_finds_every_layer(tiny_teacher_dir):
    model, _ = load_teacher(tiny_teacher_dir)
    layout = ffn_layout(model)
    assert [layer.layer for layer in layout] == [0, 1]
    assert all(layer.hidden_size == 64 and layer.intermediate_size == 128 for layer in layout)
    assert layout[1].down_proj is model.model.layers[1].mlp.down_proj


def _nf4_bound(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Largest possible nf4 error per block: half the widest gap of the nf4 code times absmax."""
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type("nf4", device="cpu").sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    absmax = weight.reshape(-1, blocksize).abs().amax(dim=1, keepdim=True)
    # bitsandbytes' CPU kernel layout stores absmax in bf16: allow its rounding (2^-8 relative)
    return ((half_gap + 2**-8) * absmax).expand(-1, blocksize).reshape(weight.shape) + 1e-6


def test_nf4_dequantised_weights_within_nf4_error(tiny_teacher_dir):
    original, _ = load_teacher(tiny_teacher_dir, dtype=torch.float32)
    quantised, _ = load_teacher(tiny_teacher_dir, quant="nf4", dtype=torch.float32)
    pairs = list(zip(ffn_layout(original), ffn_layout(quantised)))

    def check_all():
        for dense, packed in pairs:
            for name in ("gate_proj", "up_proj", "down_proj"):
                w = getattr(dense, name).weight
                deq = dequantize(getattr(packed, name), torch.float32)
                assert deq.shape == w.shape
                assert ((deq - w).abs() <= _nf4_bound(w)).all(), name
                assert (deq - w).abs().max() > 0  # really quantised

    check_all()
    with torch.no_grad():
        quantised(torch.randint(3, 200, (2, 9)))
    check_all()


def test_dequantize_undoes_cpu_repacking(tiny_teacher_dir):
    """bitsandbytes repacks nf4 weights for its CPU kernel after an eval forward (on AVX512-BF16
    CPUs); dequantising the repacked bytes directly gives garbage. Force the repack and check."""
    import bitsandbytes.functional as bnbf

    original, _ = load_teacher(tiny_teacher_dir, dtype=torch.float32)
    quantised, _ = load_teacher(tiny_teacher_dir, quant="nf4", dtype=torch.float32)
    linear = ffn_layout(quantised)[0].down_proj  # [64, 128]: two absmax blocks per row
    weight = ffn_layout(original)[0].down_proj.weight
    before = dequantize(linear, torch.float32)
    linear.weight.data, linear.weight.quant_state = bnbf._convert_weight_packed_for_cpu(
        linear.weight.data, linear.weight.quant_state)
    assert linear.weight.quant_state.packing_format_for_cpu
    packed_bytes = linear.weight.data.clone()
    after = dequantize(linear, torch.float32)
    assert torch.equal(linear.weight.data, packed_bytes)  # the module keeps its fast layout
    # the repack rounds absmax to bf16: the same codes, scales within bf16 rounding
    assert torch.allclose(before, after, rtol=2**-8, atol=0)
    assert ((after - weight).abs() <= _nf4_bound(weight)).all()
    naive = bnbf.dequantize_4bit(*bnbf._convert_weight_packed_for_cpu_inverse(
        packed_bytes.clone(), __import__("copy").copy(linear.weight.quant_state)))
    assert not torch.allclose(naive.reshape(weight.shape), after, atol=1e-3)  # the trap is real


def test_int8_dequantised_weights_close(tiny_teacher_dir):
    original, _ = load_teacher(tiny_teacher_dir, dtype=torch.float32)
    quantised, _ = load_teacher(tiny_teacher_dir, quant="int8", dtype=torch.float32)
    for dense, packed in zip(ffn_layout(original), ffn_layout(quantised)):
        w = dense.down_proj.weight.half().float()  # bitsandbytes quantises int8 from fp16
        deq = dequantize(packed.down_proj, torch.float32)
        row_step = w.abs().amax(dim=1, keepdim=True) / 127  # row-wise absmax scaling
        assert ((deq - w).abs() <= row_step * 0.5 * (1 + 1e-3) + 1e-7).all()
        assert (deq - w).abs().max() > 0


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(TeacherNotFoundError, match="not found: .*nowhere"):
        load_teacher(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(TeacherNotFoundError, match="no config.json"):
        load_teacher(tmp_path)


def test_unknown_architecture_lists_supported(tiny_teacher_dir, tmp_path):
    config = json.loads((tiny_teacher_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*qwen3, qwen2, llama, mistral"):
        load_teacher(tmp_path)


def test_non_swiglu_activation_is_refused(tiny_teacher_dir, tmp_path):
    config = json.loads((tiny_teacher_dir / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act 'gelu'"):
        load_teacher(tmp_path)


def test_ffn_layout_refuses_model_without_mlp_projections():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(UnsupportedArchitectureError, match="supported"):
        ffn_layout(model)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_other_swiglu_families_load_and_lay_out(family, tmp_path, tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, _ = load_teacher(tmp_path)
    layout = ffn_layout(model)
    assert model.config.model_type == family
    assert [(f.layer, f.hidden_size, f.intermediate_size) for f in layout] == [(0, 64, 128), (1, 64, 128)]
