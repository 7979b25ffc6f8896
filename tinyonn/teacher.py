"""Loading a teacher and finding its FFN units.

`load_teacher` goes through the real Hugging Face `from_pretrained` for a local directory, the
shipped builtin teacher ("builtin") or a hub id. `ffn_layout` finds, per decoder layer, the SwiGLU
projections whose neurons become Tiny-ONN units. `dequantize` gives back bf16 weights of a
bitsandbytes nf4/int8 linear layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from tinyonn.assets import builtin_teacher_dir
from tinyonn.errors import TeacherNotFoundError, UnsupportedArchitectureError


SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")
"""Decoder families whose MLP is `down_proj(act(gate_proj(x)) * up_proj(x))` with SiLU."""

Quant = Literal["none", "nf4", "int8"]


@dataclass(frozen=True)
class FFNLayer:
    """The SwiGLU MLP of one decoder layer: `y = down(silu(gate(x)) * up(x))`."""

    layer: int
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    hidden_size: int
    intermediate_size: int


def resolve_teacher_source(source: str | Path) -> str:
    """Map "builtin" to the shipped teacher; check that a path-like source exists."""
    if str(source) == "builtin":
        teacher_dir = builtin_teacher_dir()
        if not (teacher_dir / "config.json").is_file():
            raise TeacherNotFoundError(
                f"the builtin teacher is missing: no config.json in {teacher_dir}"
            )
        return str(teacher_dir)
    path = Path(source).expanduser()
    looks_like_path = path.is_absolute() or str(source).startswith((".", "~")) or path.exists()
    if looks_like_path or str(source).count("/") != 1:
        if not path.exists():
            raise TeacherNotFoundError(f"teacher directory not found: {path}")
        if not path.is_dir():
            raise TeacherNotFoundError(f"teacher source is a file, not a directory: {path}")
        if not (path / "config.json").is_file():
            raise TeacherNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return str(path)
    return str(source)  # a hub id "org/name"


def check_architecture(config) -> None:
    """Raise a clear error unless the config is a decoder family with a SwiGLU MLP."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported: Tiny-ONN needs a causal LM with a SwiGLU MLP "
            f"(gate_proj/up_proj/down_proj); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedArchitectureError(
            f"hidden_act {act!r} is not supported: the MLP must be SwiGLU (hidden_act 'silu')"
        )


def load_teacher(
    source: str | Path = "builtin",
    quant: Quant = "none",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "eager",
):
    """Load a causal LM and its tokenizer with `from_pretrained`.

    `source` is "builtin", a local directory (no network needed) or a hub id. `quant` loads the
    linear layers as bitsandbytes nf4 or int8 (`dtype` is then the compute dtype). Returns
    `(model, tokenizer)`; the model is in eval mode with gradients off for its parameters.
    """
    from transformers import AutoConfig, BitsAndBytesConfig

    from tinyonn.weights import load_model, load_tokenizer

    if quant not in ("none", "nf4", "int8"):
        raise ValueError(f"quant must be 'none', 'nf4' or 'int8', got {quant!r}")
    where = resolve_teacher_source(source)
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise TeacherNotFoundError(f"could not load a model config from {where!r}: {err}") from err
    check_architecture(config)
    tokenizer = load_tokenizer(where, getattr(config, "vocab_size", None))

    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": torch.device(device)}
    elif quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": torch.device(device)}
    model = load_model(where, **kwargs)  # refuses truncated shards, missing or misshapen tensors
    if quant == "none":
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    ffn_layout(model)  # fail early on an MLP we cannot read
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Llama-style causal LM."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no `model.layers` list of decoder blocks; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} style causal LMs"
        )
    return layers


def ffn_layout(model: nn.Module) -> list[FFNLayer]:
    """Find, per decoder layer, the gate/up/down projections of its SwiGLU MLP and their sizes."""
    config = getattr(model, "config", None)
    if config is not None:
        check_architecture(config)
    found = []
    for index, block in enumerate(decoder_layers(model)):
        mlp = getattr(block, "mlp", None)
        projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if mlp is None or any(p is None for p in projections):
            raise UnsupportedArchitectureError(
                f"layer {index} of {type(model).__name__} has no mlp.gate_proj/up_proj/down_proj; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} style SwiGLU MLPs"
            )
        gate, up, down = projections
        found.append(
            FFNLayer(
                layer=index,
                gate_proj=gate,
                up_proj=up,
                down_proj=down,
                hidden_size=int(gate.in_features),
                intermediate_size=int(gate.out_features),
            )
        )
    return found


def dequantize(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Return the dense weight `[out, in]` of a linear layer, dequantising bitsandbytes nf4/int8.

    On CPU (AVX512-BF16), bitsandbytes repacks nf4 weights into a kernel layout after an eval
    forward, and `dequantize_4bit` on the repacked bytes silently returns garbage; its own inverse
    restores the codes but leaves `absmax` transposed. Here the packed layout is read from copies,
    so the module keeps its fast layout and stays untouched.
    """
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Linear4bit
        import copy

        import bitsandbytes.functional as bnbf

        data = weight.data
        if getattr(quant_state, "packing_format_for_cpu", False):
            packed_absmax = quant_state.absmax  # [in / blocksize, out], bf16
            quant_state = copy.copy(quant_state)
            data, quant_state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), quant_state)
            if not quant_state.original_nested:
                quant_state.absmax = packed_absmax.T.reshape(-1).float()
        dense = bnbf.dequantize_4bit(data, quant_state)
        return dense.reshape(module.out_features, module.in_features).to(dtype)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if weight.dtype == torch.int8:  # bitsandbytes Linear8bitLt: row-wise absmax scaling
        if scb is None:
            raise ValueError("int8 weight without SCB scales: cannot dequantise")
        return (weight.data.float() * (scb.float().unsqueeze(1) / 127.0)).to(dtype)
    return weight.detach().to(dtype)


def describe(model: nn.Module) -> dict:
    """A small JSON-able summary of a teacher: family, sizes, parameter count."""
    layout = ffn_layout(model)
    return {
        "model_type": model.config.model_type,
        "num_layers": len(layout),
        "hidden_size": layout[0].hidden_size,
        "intermediate_size": layout[0].intermediate_size,
        "ffn_units": sum(layer.intermediate_size for layer in layout),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def read_config_json(directory: str | Path) -> dict:
    """The raw config.json of a model directory."""
    return json.loads((Path(directory) / "config.json").read_text())
