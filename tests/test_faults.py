"""The fault suite's fast part (the long one is `bench/faults.py`): a NaN/inf training step is skipped
and training goes on; kill -9 and Ctrl-C of `tinyonn run` resume to outputs bitwise equal to an
uninterrupted run's; a disk full mid-write leaves the store readable and resumable; a deleted,
truncated or bit-flipped store chunk is detected and named."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tinyonn import load_probe_set, load_teacher
from tinyonn.clustering.plan import full_plan
from tinyonn.config import DataConfig
from tinyonn.model.assemble import assemble
from tinyonn.model.routing import RoutingConfig
from tinyonn.training import NonFiniteStepWarning, Phase1Config, Phase2Config, TrainConfig, train
from tinyonn.training.checkpoint import load_checkpoint


# ---------------------------------------------------------------- NaN / inf steps


def test_nan_loss_and_inf_gradient_steps_are_skipped_and_training_goes_on(tiny_teacher_dir, tiny_tokenizer, tmp_path):
    """Step 3's forward is poisoned (NaN in a MoE layer's output: NaN loss and gradients) and step 5's
    backward (an inf gradient of one expert weight, the loss finite): both steps leave every trained
    weight, Adam moment and step count as they were, the log and the summary count them, a warning
    names them, and the other steps train (finite weights that move). Fails without the skip: the
    NaN reaches the weights."""
    teacher, _ = load_teacher(tiny_teacher_dir)
    model = assemble(teacher, full_plan(2, 128, 8, groups=2, seed=0), RoutingConfig(mode="all"))
    config = TrainConfig(data=DataConfig(max_length=64, batch_size=8), max_steps=7, max_tokens=None, lr=3e-3,
                         router_lr=1e-2, warmup_steps=1, weight_decay=0.01, progress=False, checkpoint_every=1,
                         keep_checkpoints=10, phase1=Phase1Config(steps=2, min_k_fraction=0.25),
                         phase2=Phase2Config(routing="budget", active_fraction=0.5))
    layer = model.moe_layers()[0]
    poison = {"forward": 3, "gradient": 5}
    state = {"next_step": 1}
    layer.register_forward_hook(
        lambda module, args, output: output * float("nan") if state["next_step"] == poison["forward"] else output)
    layer.w_up.register_hook(lambda grad: grad * float("inf") if state["next_step"] == poison["gradient"] else grad)
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}

    def on_step(step, record):
        state["next_step"] = step + 1

    with pytest.warns(NonFiniteStepWarning) as caught:
        summary = train(model, teacher, tiny_tokenizer, load_probe_set("builtin", "train")[::300], config, tmp_path,
                        on_step=on_step)
    messages = [str(w.message) for w in caught if issubclass(w.category, NonFiniteStepWarning)]
    assert len(messages) == 2 and "training step 3:" in messages[0] and "training step 5:" in messages[1]
    assert "optimiser step skipped" in messages[0] and "(2 skipped so far)" in messages[1]

    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [False, False, True, False, True, False, False]
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 1, 2, 2, 2]
    assert summary["skipped_steps"] == 2 and summary["steps"] == 7
    assert math.isnan(log[2]["loss"])
    assert math.isfinite(log[4]["loss"]) and not math.isfinite(log[4]["grad_norm"])
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(log) if i not in (2,))

    checkpoints = {step: load_checkpoint(tmp_path / "checkpoints" / f"step-{step:08d}") for step in range(1, 8)}
    weights = {0: {name: initial[name] for name in checkpoints[1].model}, **{s: c.model for s, c in checkpoints.items()}}
    for step in (3, 5):  # nothing moved: weights, Adam moments, per-row step counts
        assert all(torch.equal(weights[step - 1][name], weights[step][name]) for name in weights[step]), step
        before, after = checkpoints[step - 1].optimizer, checkpoints[step].optimizer
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after), step
    for step in (1, 2, 4, 6, 7):  # the other steps train, with finite values
        moved = [name for name in weights[step] if not torch.equal(weights[step][name], weights[step - 1][name])]
        assert any(".mlp.w_up" in name for name in moved) and any(".router." in name for name in moved), step
        assert all(torch.isfinite(value).all() for value in weights[step].values()), step
        assert all(torch.isfinite(value.float()).all() for value in checkpoints[step].optimizer.values()), step
    assert torch.equal(model.moe_layers()[0].w_up.detach(), weights[7]["backbone.model.layers.0.mlp.w_up"])


def test_masked_adamw_finite_flag_skips_everything_and_is_bitwise_neutral_when_true():
    """`MaskedAdamW.step(finite=False)` leaves weights, moments and step counts as they were, with NaN
    gradients and a NaN learning rate, masked rows or not; `finite=True` is bitwise the flagless step."""
    from tinyonn.training.optim import MaskedAdamW

    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]

    def run(params, flags, lr_tensor):
        optimizer = MaskedAdamW(params, lr=1e-2, weight_decay=0.1)
        generator = torch.Generator().manual_seed(1)
        for flag in flags:
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            if flag is False:
                params[0].grad[1, 2] = float("nan")
                params[1].grad[0] = float("inf")
            lr = torch.tensor(float("nan") if flag is False else 1e-2) if lr_tensor else 1e-2
            for group in optimizer.param_groups:
                group["lr"] = lr
            finite = None if flag is None else torch.tensor(flag)
            optimizer.step({params[0]: torch.tensor([True, False, True, True])}, finite=finite)
        return params, optimizer

    for lr_tensor in (False, True):
        plain, plain_opt = run(make(), [None, None, None], lr_tensor)
        flagged, flagged_opt = run(make(), [True, True, True], lr_tensor)
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(plain, flagged))
        skipped, skipped_opt = run(make(), [True, False, True], lr_tensor)
        reference, reference_opt = run(make(), [True], lr_tensor)
        before = {k: v.clone() for k, v in reference_opt.state_tensors({p: str(i) for i, p in enumerate(reference)}).items()}
        weights = [p.detach().clone() for p in reference]
        params, optimizer = reference, reference_opt
        for p in params:
            p.grad = torch.full(p.shape, float("nan"))
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float("nan")) if lr_tensor else 1e-2
        optimizer.step({params[0]: torch.tensor([True, False, True, True])}, finite=torch.tensor(False))
        assert all(torch.equal(a, b) for a, b in zip(weights, params))
        after = optimizer.state_tensors({p: str(i) for i, p in enumerate(params)})
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(torch.isfinite(p).all() for p in skipped)
        assert int(skipped_opt.state[skipped[1]]["step"][0]) == 2  # the skipped step did not count


def test_a_fresh_training_run_starts_from_its_seed_whatever_ran_before(tiny_teacher_dir, tiny_tokenizer, tmp_path):
    """Two fresh runs after different RNG use in the process write the same checkpoint RNG states (a
    resumed run in a new process then equals an uninterrupted one bitwise, checkpoints included)."""
    import random

    import numpy as np
    from safetensors.torch import load_file

    teacher, _ = load_teacher(tiny_teacher_dir)
    config = TrainConfig(data=DataConfig(max_length=48, batch_size=8), max_steps=2, max_tokens=None, progress=False,
                         checkpoint_every=1, phase1=Phase1Config(steps=1))
    examples = load_probe_set("builtin", "train")[::600]
    for run, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        model = assemble(teacher, full_plan(2, 128, 8, groups=2, seed=0), RoutingConfig(mode="all"))
        train(model, teacher, tiny_tokenizer, examples, config, tmp_path / run)
    for name in ("rng.safetensors", "model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(str(tmp_path / run / "checkpoints" / "step-00000002" / name)) for run in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    states = [json.loads((tmp_path / run / "checkpoints" / "step-00000002" / "state.json").read_text())["rng"]
              for run in "ab"]
    assert states[0] == states[1]


# ---------------------------------------------------------------- kill -9, Ctrl-C, disk full, damage


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_teacher_dir):
    """bench/faults.py's world at its fast size and an uninterrupted run of it (in-process)."""
    from bench import faults

    root = tmp_path_factory.mktemp("faults")
    world = faults.build_world(root / "world", teacher_dir=tiny_teacher_dir, fast=True)
    reference = root / "reference" / "runs"
    faults.run_in_process(world.config(reference))
    return faults, world, reference, root


def test_ctrl_c_then_kill_9_in_training_then_the_same_command_equals_an_uninterrupted_run(suite):
    """`tinyonn run`: Ctrl-C at step 6 (a checkpoint at the end of the step, exit 130 with how to
    resume), the same command killed with kill -9 after step 14 (between checkpoints), both in a
    subprocess, then the same command again (in this process, to save a start-up): every output (store, plan, models, checkpoints, log, reports) equals the
    uninterrupted run's, bitwise (timings left out, see bench/faults.py)."""
    import signal

    from tinyonn.training.checkpoint import latest_checkpoint

    faults, world, reference, root = suite
    runs = root / "chain" / "runs"
    run_dir = faults.prepare_run(reference, runs, "train")
    config = world.write_config(runs, root / "chain" / "config.json")
    log = run_dir / "train" / "log.jsonl"

    first = faults.Tinyonn(["run", "--config", str(config)], root / "chain" / "ctrl-c")
    assert faults.wait_for(faults.Trigger("train", "train_steps", 6), first, run_dir), first.stderr()
    first.proc.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130, first.stderr()
    assert "rerun the same command to resume" in faults.last_line(first.stderr())
    saved = int(latest_checkpoint(run_dir / "train" / "checkpoints").name.split("-")[1])
    assert saved >= 6  # the signal's own checkpoint, at the end of the step it arrived in
    assert faults._log_lines(log) == saved

    second = faults.Tinyonn(["run", "--config", str(config)], root / "chain" / "kill")
    assert faults.wait_for(faults.Trigger("train", "train_steps", 14), second, run_dir), second.stderr()
    second.proc.send_signal(signal.SIGKILL)
    assert second.wait(timeout=60) == -signal.SIGKILL
    assert faults._log_lines(log) >= 14 and (run_dir / "stages" / "train.json").exists() is False

    import contextlib
    import io

    from tinyonn.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the same command, in this process (no second start-up)
        assert main(["run", "--config", str(config)]) == 0
    assert "stages: probe skipped, cluster skipped, assemble skipped, train ran, evaluate ran" in out.getvalue()
    problems, _ = faults.compare_runs(reference / "r", run_dir)
    assert problems == []


def test_disk_full_mid_probe_leaves_a_readable_store_that_resumes_to_the_uninterrupted_one(suite):
    """ENOSPC on the third probe chunk's first array write (half the bytes written, as a full disk
    would): the probe stage fails with the OSError, the unfinished store opens with a clear error
    (or not at all: never a crash), and the rerun finishes it equal to the uninterrupted store."""
    import contextlib
    import errno
    import os

    from tinyonn.pipeline import probe_stage
    from tinyonn.store import ScoreStore

    faults, world, reference, root = suite
    runs = root / "enospc" / "runs"
    run_dir = faults.prepare_run(reference, runs, "probe")
    config = world.config(runs)
    disk = faults.DiskFull("zarr", after=0, match="/per_sample/act/c/2/")
    with disk.active(), pytest.raises(OSError) as raised, open(os.devnull, "w") as sink, \
            contextlib.redirect_stdout(sink):
        probe_stage(config, log=lambda *args: None)
    assert raised.value.errno == errno.ENOSPC and disk.raised.endswith("/per_sample/act/c/2/0")
    store = run_dir / "scores.zarr"
    assert json.loads((store / "progress.json").read_text())["complete_chunks"] == [0, 1]
    assert faults.store_readable(store) is None and not ScoreStore.open(store).finalized
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        probe_stage(config, log=lambda *args: None)
    assert faults.compare_stores(reference / "r" / "scores.zarr", store) == []


@pytest.mark.parametrize("kind, array", [("deleted", "units/layer"), ("truncated", "per_sample/grad"),
                                         ("bitflip", "partials/act")])
def test_a_damaged_store_chunk_is_detected_and_named(suite, kind, array):
    """One chunk file of the finished store deleted, cut in half or with one bit flipped: reading the
    store (`open`, `summary`, `verify`) raises an error naming the array and the chunk key, and
    nothing reads the damage as data."""
    import random

    faults, world, reference, root = suite
    rng = random.Random(f"{kind}-{array}")
    chunk = rng.choice([c for a, c in faults.chunk_files(reference / "r" / "scores.zarr") if a == array])
    case = faults.damage_case(world, reference, root / "damage", f"{kind}-{array.replace('/', '-')}", kind, array,
                              chunk, rng, cluster=False)
    assert case.outcome == "detected", case.detail
    assert f"chunk {chunk} of array {array!r}" in case.detail


def test_a_run_config_that_trains_by_steps_without_a_token_budget_trains(suite):
    """`TrainConfig(max_tokens=None, max_steps=N)` is a valid config: the train stage used to fail
    formatting its budget (`None:,`) before training."""
    import contextlib
    import dataclasses
    import os

    from tinyonn.pipeline import train_stage

    faults, world, reference, root = suite
    runs = root / "by-steps" / "runs"
    run_dir = faults.prepare_run(reference, runs, "train")
    config = world.config(runs)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_tokens=None, max_steps=3))
    lines = []
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        train_stage(config, log=lines.append)
    assert json.loads((run_dir / "train" / "summary.json").read_text())["steps"] == 3
    assert any("on up to 3 steps of" in line for line in lines), lines
