"""Atomic training checkpoints: weights, optimiser state, RNG states, step and data position.

A checkpoint is a folder `step-00000123/` holding `model.safetensors` (the trained parameters),
`optimizer.safetensors` (`MaskedAdamW.state_tensors`), `rng.safetensors` (torch CPU/CUDA generator
states) and `state.json` (step, phase, data position, log length, python/numpy RNG states, the
config). It is written into a temporary folder, every file fsynced, then renamed into place, so a
folder named `step-*` is always complete; a killed writer leaves only a `.tmp-*` folder, removed by
the next save. Everything loads through safetensors and JSON: no pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tinyonn.files import fsync_path, write_text_atomic

PREFIX = "step-"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state: dict


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(path))
    fsync_path(path)


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """The python, numpy and torch (CPU and every CUDA device) RNG states: JSON-ready parts and tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(position), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    return plain, tensors


def seed_rng(seed: int) -> None:
    """Seed the python, numpy and torch (CPU and CUDA) generators: a run starts from the same RNG
    state whatever ran before it in the process, so its checkpoints' RNG states are reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Put back what `rng_state` captured."""
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    state = plain["numpy"]
    np.random.set_state((state["kind"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: Path, step: int, model: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
                    state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically into `directory` and keep only the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / checkpoint_name(step)
    temporary = directory / f".tmp-{final.name}-{os.getpid()}"
    temporary.mkdir()
    plain_rng, tensor_rng = rng_state()
    _save_tensors(model, temporary / "model.safetensors")
    _save_tensors(optimizer, temporary / "optimizer.safetensors")
    _save_tensors(tensor_rng, temporary / "rng.safetensors")
    with open(temporary / "state.json", "w") as handle:
        json.dump({**state, "step": step, "rng": plain_rng}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_path(temporary)
    if final.exists():  # the same step saved again (e.g. on a signal right after a periodic save)
        replaced = directory / f".tmp-replaced-{final.name}-{os.getpid()}"
        final.rename(replaced)
        temporary.rename(final)
        shutil.rmtree(replaced)
    else:
        temporary.rename(final)
    fsync_path(directory)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder (safetensors and JSON only); a missing, truncated or damaged file
    raises `WeightsError` naming it."""
    from tinyonn.errors import WeightsError
    from tinyonn.weights import check_safetensors

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path / 'state.json'}: damaged checkpoint state ({err}); delete {path} to resume from "
                           f"the checkpoint before it") from None
    tensors = {}
    for name in ("model", "optimizer", "rng"):
        file = path / f"{name}.safetensors"
        try:
            check_safetensors(file)
            tensors[name] = load_file(str(file))
        except WeightsError as err:
            raise WeightsError(f"{err}; delete {path} to resume from the checkpoint before it") from None
        except FileNotFoundError:
            raise WeightsError(f"{file}: missing from the checkpoint; delete {path} to resume from the checkpoint "
                               f"before it") from None
        except Exception as err:
            if type(err).__name__ != "SafetensorError":
                raise
            raise WeightsError(f"{file}: damaged checkpoint file ({err}); delete {path} to resume from the "
                               f"checkpoint before it") from None
    return Checkpoint(path=path, state=state, **tensors)


def truncate_log(path: Path, lines: int) -> None:
    """Keep the first `lines` complete lines of a JSONL log (what a checkpoint recorded), atomically."""
    path = Path(path)
    kept = path.read_text().splitlines(keepends=True)[:lines] if path.exists() else []
    if len(kept) < lines or (kept and not kept[-1].endswith("\n")):
        raise ValueError(f"{path} has fewer than the {lines} complete lines the checkpoint recorded")
    write_text_atomic(path, "".join(kept))
