"""Checked loading of model folders: weights and tokenizer.

`from_pretrained` alone loads a folder with missing tensors by initialising them at random (a
warning, then silently wrong numbers), stops on a truncated shard with a message that names no
file, and builds an empty tokenizer from a folder without tokenizer files. Here a folder is
checked first: every safetensors file it names must hold all the bytes its header describes, the
load must find every tensor the config needs in the shape it needs, and the tokenizer must have
files and fit the model's vocabulary; each failure is a `WeightsError` / `ModelFolderError`
naming the folder, the file and the tensor. Pickled weights (`pytorch_model.bin`) load only through
transformers' `torch.load(weights_only=True)`, which refuses anything but tensors.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from tinyonn.errors import ModelFolderError, WeightsError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")


def check_safetensors(path: str | Path) -> dict:
    """The header of a safetensors file, after checking that the file holds every byte it
    describes; `WeightsError` naming the file if it is truncated or its header is damaged."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes: not even its header length)")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes; its header alone claims {length})")
        try:
            header = json.loads(handle.read(length))
            end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise WeightsError(f"{path}: damaged safetensors header ({err})") from None
    if 8 + length + end > size:
        raise WeightsError(f"{path}: truncated safetensors file: {size} bytes of the {8 + length + end} its header "
                           f"describes")
    return header


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files a local model folder loads from (the shards its index names, or its single
    file), each checked (`check_safetensors`); `WeightsError` if there is none or a shard is missing."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise WeightsError(f"{index}: damaged index (no weight_map: {err})") from None
        files = [directory / shard for shard in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        pickles = [directory / name for name in PICKLE_NAMES if (directory / name).is_file()]
        if pickles:
            return pickles  # loaded by transformers through torch.load(weights_only=True)
        raise WeightsError(f"{directory} has no weights: no model.safetensors, {SAFETENSORS_INDEX} or "
                           f"pytorch_model.bin")
    for file in files:
        check_safetensors(file)
    return files


def load_model(directory: str | Path, model_class=None, **kwargs):
    """`model_class.from_pretrained(directory, **kwargs)` (AutoModelForCausalLM by default) that
    refuses a damaged folder (see the module docstring) instead of loading it half random."""
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    local = Path(directory).is_dir()
    files = weight_files(directory) if local else []
    try:
        model, info = model_class.from_pretrained(directory, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    except pickle.UnpicklingError as err:
        name = ", ".join(str(f) for f in files) or str(directory)
        raise WeightsError(f"{name}: refused by torch.load(weights_only=True): the pickle holds more than plain "
                           f"tensors (it could run code); convert trusted weights to safetensors") from None
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise WeightsError(f"{directory}: damaged safetensors weights ({err})") from None
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key, found, needed = mismatched[0]
        raise WeightsError(f"{directory}: tensor {key} has shape {list(found)} but the folder's config.json needs "
                           f"{list(needed)} ({len(mismatched)} tensor(s) of the wrong shape: weights of another model?)")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise WeightsError(f"{directory}: the weights lack {len(missing)} tensor(s) the config needs "
                           f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they would load as random "
                           f"numbers")
    return model


def load_tokenizer(directory: str | Path, vocab_size: int | None = None):
    """`AutoTokenizer.from_pretrained(directory)`, refusing a local folder without tokenizer files
    (transformers would build an empty tokenizer), an empty tokenizer, and one whose ids do not fit
    the model's `vocab_size`."""
    from transformers import AutoTokenizer

    directory_path = Path(directory)
    if directory_path.is_dir() and not any((directory_path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(f"{directory} has no tokenizer files (one of {', '.join(TOKENIZER_FILES[:3])}, ...)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as err:
        raise ModelFolderError(f"{directory}: cannot load the tokenizer: {str(err).splitlines()[0]}") from None
    except ImportError:
        raise
    except Exception as err:  # the Rust tokenizers library raises a bare Exception on a damaged tokenizer.json
        raise ModelFolderError(f"{directory}: damaged tokenizer files ({str(err).splitlines()[0]})") from None
    if len(tokenizer) < 2:
        raise ModelFolderError(f"{directory}: the tokenizer is empty ({len(tokenizer)} tokens): its files are "
                               f"damaged or incomplete")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ModelFolderError(f"{directory}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                               f"only {vocab_size}: a tokenizer of another model?")
    return tokenizer
