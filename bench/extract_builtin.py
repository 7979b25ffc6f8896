"""The training-free extraction table on the builtin teacher → bench/results/extract_builtin.json.

Probes every 10th example of the builtin train split (2,000 samples) into
`stores/runs/builtin/scores.zarr` (resumes or skips when it is already there), then builds every
partition (PIDiff-guided HDBSCAN, random, co-activation k-means, CMoE-style) on the same budget and
measures each × routing (oracle, analytic, warmed learned router) × output compensation (off, on)
at 25%, 50% and 75% of the FFN units active per token: held-out perplexity per category beside the
teacher's, and the conversion time on this machine (`tinyonn.evaluation.extract.evaluate_partitions`,
the same as `tinyonn extract --run builtin`). Its plans (`stores/runs/builtin/plans/<method>/`) are
the ones the SMK quality table trains.

    OMP_NUM_THREADS=1 .venv/bin/python bench/extract_builtin.py --eval-per-category 20
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
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--eval-per-category", type=int, default=100,
                        help="the first N validation examples of each category (teacher and rows alike)")
    parser.add_argument("--out", default=str(RESULTS / "extract_builtin.json"))
    args = parser.parse_args()

    run_dir = Path(args.run)
    examples = load_probe_set("builtin", "train")[::10][: args.samples]
    store = probe("builtin", examples, ProbeConfig(), run_dir / "scores.zarr")
    report = evaluate_partitions(store, "builtin", run_dir, fractions=tuple(args.fractions),
                                 eval_per_category=args.eval_per_category)
    threads = torch.get_num_threads()
    report["device"] = f"cpu ({platform.machine()}, {threads} thread{'s' if threads > 1 else ''}, shared 2-core VM)" \
        if not torch.cuda.is_available() else torch.cuda.get_device_name()
    report["command"] = (f"probe('builtin', every 10th train example ({len(examples):,}), ProbeConfig()) -> "
                         f"{run_dir / 'scores.zarr'}; evaluate_partitions(store, 'builtin', '{run_dir}', "
                         f"fractions={tuple(args.fractions)}, eval_per_category={args.eval_per_category}) "
                         f"(OMP_NUM_THREADS={threads} python bench/extract_builtin.py --eval-per-category "
                         f"{args.eval_per_category})")
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(report_table(report))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
