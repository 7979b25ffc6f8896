"""The project as a user gets it: a wheel built from this checkout, installed into a fresh venv with no
editable install on the path, runs `tinyonn probe` on the builtin default from a folder outside the
repository. Also: the wheel holds every module and every builtin asset, nothing in the package climbs
out of the checkout, and CI runs exactly the README's commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILTIN = "stores/builtin"
PACKAGE_DIRS = {"tinyonn": "tinyonn", "kernels": "tinyonn/kernels", BUILTIN: "tinyonn/builtin"}
"""Checkout folder → its place in the wheel (pyproject's package-dir)."""


def checkout_files() -> list[str]:
    """The checkout's tracked files and its untracked ones that git does not ignore."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sorted(name for name in listed if name and (REPO / name).is_file())


def wheel_paths(files: list[str]) -> set[str]:
    """Where the package's modules (every .py) and builtin assets (every file) among `files` belong
    inside the wheel."""
    placed = set()
    for name in files:
        for folder, target in PACKAGE_DIRS.items():
            if name.startswith(folder + "/") and (folder == BUILTIN or name.endswith(".py")):
                placed.add(target + name[len(folder):])
    return placed


def has_setuptools() -> bool:
    """setuptools ≥ 70.1 (which builds wheels without the `wheel` package) in this interpreter."""
    try:
        import setuptools
    except ImportError:
        return False
    return tuple(int(part) for part in setuptools.__version__.split(".")[:2]) >= (70, 1)


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> tuple[Path, list[str]]:
    """(wheel, checkout files): the wheel is built from a copy of the files, so no stale build/ folder
    of the checkout can leak into it."""
    files = checkout_files()
    source = tmp_path_factory.mktemp("source")
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    # without build isolation when setuptools is here (fast, offline); else pip fetches it from PyPI
    isolation = ["--no-build-isolation"] if has_setuptools() else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist), str(source)],
                   check=True, cwd=source)
    (wheel,) = dist.glob("tinyonn-*.whl")
    return wheel, files


def test_wheel_holds_every_module_and_builtin_asset(built_wheel):
    wheel, files = built_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = wheel_paths(files)
    missing = sorted(expected - names)
    assert not missing, f"missing from the wheel (pyproject's packages or package-data): {missing}"
    builtin = {name for name in names if name.startswith("tinyonn/builtin/")}
    assert builtin == wheel_paths([f for f in files if f.startswith(BUILTIN + "/")]), "wheel ≠ git ls-files"
    teacher = "tinyonn/builtin/teacher/"
    assert {teacher + "config.json", teacher + "tokenizer.json", teacher + "model.safetensors.index.json"} <= names
    shards = json.loads((REPO / BUILTIN / "teacher/model.safetensors.index.json").read_text())["weight_map"].values()
    assert shards and {teacher + shard for shard in shards} <= names
    assert {"tinyonn/builtin/probe/train.jsonl.gz", "tinyonn/builtin/probe/validation.jsonl.gz",
            "tinyonn/builtin/eval/eval.jsonl.gz"} <= names


def test_wheel_in_a_fresh_venv_probes_the_builtin_default(built_wheel, tmp_path):
    """`pip install --no-deps` of the wheel into a new venv whose dependencies come from this venv's
    site-packages through a .pth line (which adds the folder to sys.path but runs none of its .pth
    files, so the editable install's finder stays off), then the venv's `tinyonn probe`."""
    wheel, _ = built_wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    Path(site, "tinyonn_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")

    work = tmp_path / "work"  # outside the repository: the checkout is not on sys.path
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = subprocess.run(
        [str(python), "-c", "import json, sys, tinyonn, tinyonn.assets, tinyonn.kernels; print(json.dumps("
         "[tinyonn.__file__, tinyonn.kernels.__file__, str(tinyonn.assets.builtin_dir()), "
         "[type(f).__module__ for f in sys.meta_path]]))"],
        cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    package, kernels, builtin, finders = json.loads(where)
    for path in (package, kernels, builtin):
        assert Path(path).is_relative_to(site), (path, site)
    assert not any("editable" in finder for finder in finders), finders

    script = venv / "bin" / "tinyonn"
    store = tmp_path / "s.zarr"
    result = subprocess.run([str(script), "probe", "--teacher", "builtin", "--data", "builtin", "--max-samples", "4",
                             "--out", str(store)], cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from tinyonn import ScoreStore

    opened = ScoreStore.open(store)
    assert opened.n_samples == 4 and opened.finalized
    assert opened.array("per_sample/grad").shape[0] == 4


def test_no_module_reaches_outside_the_checkout():
    """Builtin assets resolve through `tinyonn.assets` (package data); nothing climbs out of the
    package to the repository or beyond (`../shared`, `Path(__file__).parent.parent`, ...)."""
    climbing = re.compile(r"shared/|\.parent\.parent|\.parents\[|['\"]\.\./|os\.pardir")
    offenders = []
    for folder in ("tinyonn", "kernels"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if climbing.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_ci_runs_the_readme_commands():
    """Every command of the README's set-up and test blocks starts a line of .ci/run, verbatim (CI may
    append `|| exit 1`)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Three commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    setup = [command for command in commands if "pip install" in command]
    tests = [command for command in commands if "pytest" in command]
    assert setup and tests, commands
    ci_lines = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    missing = [command for command in setup + tests
               if not any(line == command or line.startswith(command + " ") for line in ci_lines)]
    assert not missing, f"README commands missing from .ci/run: {missing}"
