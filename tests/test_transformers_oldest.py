"""The oldest supported transformers (5.17, the GPU image's): TinyONN imports, trains, saves, reloads
and generates there too. The pinned version is installed once into `.cache/` (from PyPI) and put
first on the PYTHONPATH of a subprocess that runs `tests/scripts/tinyonn_round_trip.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLDEST = ("transformers==5.17.0", "huggingface_hub==1.33.0")
"""The oldest transformers that pyproject allows, with the hub client it needs (the GPU image's pair)."""
ITS_NEEDS = ("httpx", "httpcore", "h11", "anyio", "idna", "certifi", "typing_extensions")
"""What that transformers imports beyond the newer one's needs (installed beside it)."""


def oldest_site() -> Path:
    site = ROOT / ".cache" / "transformers-5.17.0"
    if not (site / "transformers" / "__init__.py").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        *OLDEST, *ITS_NEEDS], check=True)
    return site


def test_tinyonn_round_trip_on_the_oldest_transformers(tiny_teacher_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(oldest_site()), str(ROOT)])}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "tinyonn_round_trip.py"),
                          str(tiny_teacher_dir), str(tmp_path / "model")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["transformers"] == "5.17.0"
    assert result["dense_error"] < 1e-4  # every expert on: the teacher's logits
    assert result["router_outputs"] == 2 and result["loss"] > 0
    assert result["routing_reloaded"] == ["topk", "budget"]
    assert result["reload_equal"] and result["generated"] == 11
