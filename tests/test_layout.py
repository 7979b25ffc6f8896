"""The package's structure drawing (README, "Layout") has no arrow running back up: every module
imports only modules of its own layer or of layers below it, and the library never imports the
builtin teacher's recipe."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS = (
    ("tinyonn.errors", "tinyonn.assets", "tinyonn.config", "tinyonn.files", "tinyonn.runlock", "tinyonn.weights",
     "tinyonn.devices", "tinyonn.distributed"),
    ("tinyonn.teacher", "tinyonn.data"),
    ("tinyonn.store",),
    ("tinyonn.probe",),
    ("tinyonn.clustering",),
    ("tinyonn.inspection",),
    ("tinyonn.model", "tinyonn.kernels", "tinyonn.compile"),
    ("tinyonn.evaluation",),
    ("tinyonn.training",),
    ("tinyonn.explain", "tinyonn.release"),
    ("tinyonn.pipeline",),
    ("tinyonn.cli", "tinyonn"),
    ("tinyonn.testing",),
)
"""Bottom to top, as README's drawing shows them."""


def layer_of(module: str) -> int:
    best, length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    assert best is not None, f"{module} is in no layer of the drawing: add it to LAYERS and to the README"
    return best


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in (ROOT / "tinyonn").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    for path in (ROOT / "kernels").glob("*.py"):
        modules["tinyonn.kernels" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    return modules


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_import_runs_back_up():
    upward = []
    for module, path in package_modules().items():
        own = layer_of(module)
        for name in imported(path):
            if name.startswith("recipes"):
                upward.append(f"{module} imports the recipe {name}")
            elif (name == "tinyonn" or name.startswith("tinyonn.")) and module != "tinyonn" and name != "tinyonn":
                if layer_of(name) > own:
                    upward.append(f"{module} (layer {own}) imports {name} (layer {layer_of(name)})")
    assert not upward, "\n".join(upward)


def test_every_layer_is_in_the_readme_drawing():
    readme = (ROOT / "README.md").read_text()
    for prefixes in LAYERS[:-1]:
        for prefix in prefixes:
            short = prefix.removeprefix("tinyonn.")
            assert short in readme, f"{short} missing from the README's layout drawing"
