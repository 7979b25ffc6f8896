"""The command line and the README's commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tinyonn.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_run_on_the_builtin_teacher_chains_the_built_stages(tmp_path, capsys):
    assert main(["run", "--runs", str(tmp_path), "--run", "smoke", "--samples", "40"]) == 0
    out = capsys.readouterr().out
    assert "12,288 FFN units" in out
    for stage in ("probe", "cluster", "assemble"):
        assert re.search(rf"{stage}\s+built", out), stage
    assert re.search(r"train\s+not built yet", out)
    match = re.search(r"teacher ([0-9.]+); TinyONN at 50% of FFN units per token \(oracle routing\) ([0-9.]+)", out)
    assert match and 1 < float(match.group(1)) < float(match.group(2))
    assert (tmp_path / "smoke" / "scores.zarr" / "zarr.json").is_file()
    assert (tmp_path / "smoke" / "plan" / "plan.json").is_file()
    assert (tmp_path / "smoke" / "model" / "config.json").is_file()
    info = json.loads((tmp_path / "smoke" / "teacher.json").read_text())
    assert info["model_type"] == "qwen3" and info["num_layers"] == 8


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
