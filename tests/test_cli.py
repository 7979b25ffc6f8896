"""The command line and the README's commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tinyonn.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_run_on_the_builtin_teacher_chains_the_stages(tmp_path, capsys):
    from tinyonn.evaluation.evaluate import EvaluateConfig
    from tinyonn.pipeline import EvalConfig, RunConfig

    # a light evaluation (no nf4 row, no sweep beyond the saved model, tiny speed run): the full one
    # is tests/test_evaluate.py's
    light = EvaluateConfig(nf4=False, sweep=(0.5,), bench_prompt_length=8, bench_new_tokens=2)
    (tmp_path / "light.json").write_text(json.dumps(RunConfig(eval=EvalConfig(measure=light)).to_dict()))
    run_args = ["run", "--runs", str(tmp_path), "--run", "smoke", "--samples", "40", "--no-train",
                "--config", str(tmp_path / "light.json")]
    assert main(run_args) == 0
    out = capsys.readouterr().out
    assert "12,288 FFN units" in out
    assert "stages: probe ran, cluster ran, assemble ran, evaluate ran, explain ran" in out
    assert not re.search(r"not built yet:.*explain", out)
    match = re.search(r"teacher ([0-9.]+); TinyONN at 50% of FFN units per token "
                      r"\(learned routing \+ compensation\) ([0-9.]+)", out)
    assert match and 1 < float(match.group(1)) < float(match.group(2))
    run = tmp_path / "smoke"
    assert (run / "scores.zarr" / "zarr.json").is_file()
    assert (run / "plan" / "plan.json").is_file() and (run / "plan" / "cells.png").is_file()
    assert (run / "model" / "config.json").is_file()
    config = json.loads((run / "run_config.json").read_text())
    assert config["probe_samples"] == 40 and config["cluster"]["method"] == "coact-kmeans"
    # the saved model is the measured one: its router picks experts within 50% of the units, with
    # compensation, and reloading it gives the perplexity the run printed
    saved = json.loads((run / "model" / "config.json").read_text())
    assert {(r["mode"], r["router"], r["compensate"]) for r in saved["routing"]} == {("budget", "analytic", True)}
    report = json.loads((run / "report" / "evaluate.json").read_text())
    assert abs(report["model_ppl"]["all"] - float(match.group(2))) < 0.01
    from transformers import AutoModelForCausalLM

    from tinyonn.config import DataConfig
    from tinyonn.evaluation.metrics import heldout_perplexity
    from tinyonn.pipeline import RunConfig, _examples
    from tinyonn.teacher import load_teacher

    config = RunConfig.load(run / "run_config.json")
    reloaded = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    ppl = heldout_perplexity(reloaded, load_teacher("builtin")[1], _examples(config)[1],
                             DataConfig(max_length=config.eval.max_length), config.eval.batch_size)
    assert f"{ppl['all']['ppl']:.2f}" == match.group(2)
    assert 0.3 < report["measured_active_fraction"] <= 0.5  # what the saved model really runs

    # the same config again: nothing is redone
    assert main(run_args) == 0
    assert "stages: probe skipped, cluster skipped, assemble skipped, evaluate skipped, explain skipped, release skipped  " \
        "(nothing to redo)" in capsys.readouterr().out
    # one stage by its own command, with the run's settings: a changed partition reruns cluster,
    # and then `run` redoes exactly the stages downstream of it
    assert main(["cluster", "--runs", str(tmp_path), "--run", "smoke", "--method", "random"]) == 0
    assert json.loads((run / "plan" / "plan.json").read_text())["method"] == "random"
    assert main([*run_args, "--method", "random"]) == 0
    assert "stages: probe skipped, cluster skipped, assemble ran, evaluate ran, explain ran" in capsys.readouterr().out
    assert main(["evaluate", "--runs", str(tmp_path), "--run", "smoke"]) == 0
    # `tinyonn release`: the run's release stage wrote one; the command redoes it for the new evaluation
    assert (run / "release" / "model.safetensors").is_file()
    assert main(["release", "--runs", str(tmp_path), "--run", "smoke"]) == 0
    evaluated = json.loads((run / "report" / "evaluate.json").read_text())
    assert f"| all | {evaluated['teacher_ppl']['all']:.2f} | {evaluated['model_ppl']['all']:.2f} |" in \
        (run / "release" / "README.md").read_text()
    assert json.loads((run / "release" / "provenance.json").read_text())["method"] == "random"
    # `tinyonn explain` with a hand-written label: the report shows it, the stage record has its hash
    explained = json.loads((run / "report" / "explain.json").read_text())
    assert (run / "report" / "index.html").is_file() and explained["model_dir"] == "model"
    (tmp_path / "labels.json").write_text(json.dumps({"L2·E0": "hand-written"}))
    assert main(["explain", "--runs", str(tmp_path), "--run", "smoke", "--labels", str(tmp_path / "labels.json")]) == 0
    explained = json.loads((run / "report" / "explain.json").read_text())
    assert [e["label"] for e in explained["experts"] if e["expert"] == "L2·E0"] == ["L2·E0 — hand-written"]
    assert "L2·E0 — hand-written" in (run / "report" / "index.html").read_text()
    assert json.loads((run / "stages" / "explain.json").read_text())["inputs"]["labels"] is not None
    assert main(["assemble", "--runs", str(tmp_path), "--run", "smoke", "--active-fraction", "0.25"]) == 0
    saved = json.loads((run / "model" / "config.json").read_text())
    assert all(r["unit_budget"] < 0.3 for r in saved["routing"])

    # `tinyonn train` on a tiny budget: phase 1 is capped at half the run, so the saved model is the
    # phase-2 (budget-routed) one, and the summary says so
    assert main(["train", "--runs", str(tmp_path), "--run", "smoke", "--train-tokens", "3000"]) == 0
    summary = json.loads((run / "train" / "summary.json").read_text())
    assert summary["phase"] == 2 and 0 < summary["phase2_start_step"] <= summary["steps"] // 2
    trained = json.loads((run / "train" / "model" / "config.json").read_text())
    assert {r["mode"] for r in trained["routing"]} == {"budget"}


def test_stage_without_its_input_is_a_clear_error(tmp_path, capsys):
    assert main(["cluster", "--runs", str(tmp_path), "--run", "empty"]) == 2
    assert "has no finished probe stage: run `tinyonn probe" in capsys.readouterr().err


def test_run_config_round_trips_and_rejects_bad_fields(tmp_path):
    from tinyonn.clustering import ClusterConfig
    from tinyonn.errors import TinyONNError
    from tinyonn.pipeline import RunConfig

    config = RunConfig(run="x", probe_samples=12, cluster=ClusterConfig(method="random"), active_fraction=0.25)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_dict()))
    assert RunConfig.load(path) == config
    with pytest.raises(TinyONNError, match="unknown field"):
        RunConfig.from_dict({"run": "x", "sample": 3})
    with pytest.raises(TinyONNError, match="active_fraction"):
        RunConfig.from_dict({"active_fraction": 1.5})
    with pytest.raises(TinyONNError, match="cluster: .*method"):
        RunConfig.from_dict({"cluster": {"method": "astrology"}})


def test_missing_teacher_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "--teacher", str(tmp_path / "missing"), "--runs", str(tmp_path)]) == 2
    assert f"teacher directory not found: {tmp_path / 'missing'}" in capsys.readouterr().err


def test_ci_runs_the_readme_commands_exactly():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    setup, test = blocks[0].strip(), blocks[2].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert any(line.startswith(setup) for line in ci_lines), setup
    assert test in ci_lines, test
