"""Wall time of probing the builtin teacher over 2,000 probe samples on this machine's CPU.

Runs the whole `tinyonn.probe.run` (teacher load, encoding, statistics, Zarr store, finalize) with
the default config (fp32, per-sample arrays and heads on) over 2,000 samples spread evenly over
the builtin train split, and writes bench/results/probe_cpu.json.

    OMP_NUM_THREADS=2 python bench/probe_cpu.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    from tinyonn import ProbeConfig, load_probe_set, probe

    examples = load_probe_set("builtin", "train")
    picked = examples[:: len(examples) // 2000][:2000]
    config = ProbeConfig()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        store = probe("builtin", picked, config, f"{tmp}/scores.zarr")
        seconds = time.time() - started
        tokens = int(store.array("samples/n_tokens")[...].sum())
        log = [json.loads(line) for line in Path(f"{tmp}/probe_log.jsonl").read_text().splitlines()]
    all_tokens = sum(r["tokens"] for r in log)
    result = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"torch threads {torch.get_num_threads()})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "OMP_NUM_THREADS=2 python bench/probe_cpu.py",
        "samples": len(picked),
        "categories": sorted({e.category for e in picked}),
        "seconds": seconds,
        "target_seconds": 180,
        "tokens_all_positions": all_tokens,
        "response_tokens": tokens,
        "tok_s": all_tokens / seconds,
    }
    out = Path(__file__).parent / "results" / "probe_cpu.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if seconds <= 180 else 1


if __name__ == "__main__":
    sys.exit(main())
