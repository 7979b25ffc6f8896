"""The training-free extraction table on the builtin teacher → bench/results/extract_builtin.json.

Probes every 10th example of the builtin train split (2,000 samples) into
`stores/runs/builtin/scores.zarr` (resumes or skips when it is already there), then compares the
partitions at 50% of the FFN units active per token with oracle routing and with the warmed router
(`tinyonn.evaluation.extract.evaluate_partitions`, the same as `tinyonn extract --run builtin`).
Its plans (`stores/runs/builtin/plans/<method>/`) are the ones the SMK quality table trains.

    OMP_NUM_THREADS=2 .venv/bin/python bench/extract_builtin.py
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from tinyonn import ProbeConfig, load_probe_set, probe
from tinyonn.evaluation.extract import evaluate_partitions, report_table

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="stores/runs/builtin")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--active-fraction", type=float, default=0.5)
    parser.add_argument("--out", default=str(RESULTS / "extract_builtin.json"))
    args = parser.parse_args()

    run_dir = Path(args.run)
    examples = load_probe_set("builtin", "train")[::10][: args.samples]
    store = probe("builtin", examples, ProbeConfig(), run_dir / "scores.zarr")
    report = evaluate_partitions(store, "builtin", run_dir, active_fraction=args.active_fraction)
    threads = torch.get_num_threads()
    report["device"] = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)" \
        if not torch.cuda.is_available() else torch.cuda.get_device_name()
    report["command"] = (f"probe('builtin', every 10th train example ({len(examples):,}), ProbeConfig()) -> "
                         f"{run_dir / 'scores.zarr'}; evaluate_partitions(store, 'builtin', '{run_dir}', "
                         f"active_fraction={args.active_fraction}) (python bench/extract_builtin.py, "
                         f"{threads} threads)")
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(report_table(report))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
