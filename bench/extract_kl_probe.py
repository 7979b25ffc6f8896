"""PIDiff with the KL-gradient probe: the same probe samples probed twice, per-sample gradients
against the data's labels and against targets drawn from the teacher's own next-token distribution
(`ProbeConfig(grad_target="teacher")`), each clustered by pidiff-hdbscan and converted
training-free at 50% of the FFN units active → bench/results/extract_kl_probe.json.

A smaller probe than the extraction table's (every 40th train example, 300 samples): two probes of
2,000 samples cost too much on this CPU. Everything else as `bench/extract_builtin.py`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/extract_kl_probe.py --eval-per-category 20
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from tinyonn import ProbeConfig, load_probe_set, load_teacher, probe
from tinyonn.clustering import Calibration, CalibrationConfig, ClusterConfig, cluster
from tinyonn.config import DataConfig
from tinyonn.data import encode_examples
from tinyonn.evaluation.extract import convert, first_per_category, ppl_ratio_max, response_perplexity

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="stores/runs/kl_probe")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--active-fraction", type=float, default=0.5)
    parser.add_argument("--eval-per-category", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "extract_kl_probe.json"))
    args = parser.parse_args()

    run_dir = Path(args.run)
    teacher, tokenizer = load_teacher("builtin")
    examples = load_probe_set("builtin", "train")[::40][: args.samples]
    validation = first_per_category(load_probe_set("builtin", "validation"), args.eval_per_category)
    samples, _ = encode_examples(tokenizer, validation, DataConfig(max_length=512))
    calibration = Calibration.collect(teacher, tokenizer, load_probe_set("builtin", "train"), CalibrationConfig())
    teacher_ppl = response_perplexity(teacher, samples, tokenizer.pad_token_id)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s), shared 2-core VM)",
              "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python bench/extract_kl_probe.py "
                         f"--samples {args.samples} --eval-per-category {args.eval_per_category}",
              "probe_samples": len(examples), "validation_examples": len(validation),
              "active_fraction": args.active_fraction, "teacher_ppl_by_category": teacher_ppl, "rows": []}
    grads = {}
    for target in ("label", "teacher"):
        start = time.perf_counter()
        store = probe(teacher, examples, ProbeConfig(grad_target=target), run_dir / f"{target}.zarr",
                      tokenizer=tokenizer)
        probe_s = time.perf_counter() - start
        grads[target] = store.summary_of("grad")
        plan = cluster(store, ClusterConfig())
        for routing in ("oracle", "learned"):
            model, info = convert(teacher, plan, calibration, args.active_fraction, routing, True)
            ppl = response_perplexity(model, samples, tokenizer.pad_token_id)
            row = {"grad_target": target, "partition": "pidiff-hdbscan", "routing": routing, "compensation": True,
                   "active_fraction": args.active_fraction, "ppl_by_category": ppl,
                   "ppl_ratio_max": ppl_ratio_max(ppl, teacher_ppl), "probe_seconds": probe_s,
                   "plan": plan.summary()}
            report["rows"].append(row)
            print(f"{target:8s} {routing:8s} all {ppl['all']:.2f} worst ratio {row['ppl_ratio_max']:.3f}", flush=True)
    report["grad_spearman_label_vs_teacher"] = float(spearmanr(grads["label"], grads["teacher"]).statistic)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"Spearman(grad label, grad teacher) = {report['grad_spearman_label_vs_teacher']:.3f}; written {args.out}")


if __name__ == "__main__":
    main()
