"""Train a run folder's tiny TinyONN model with `train_run` (used by tests/test_training.py).

    python tests/scripts/train_tiny_run.py RUN_DIR TEACHER_DIR CONFIG_JSON [--resume] [--pause SECONDS]

`--pause` sleeps after every step (so a test can kill the process mid-run). Prints the summary's
step count when training ends.
"""

import argparse
import json
import time

import torch

from tinyonn.training import TrainConfig, train_run

parser = argparse.ArgumentParser()
parser.add_argument("run_dir")
parser.add_argument("teacher_dir")
parser.add_argument("config_json")
parser.add_argument("--resume", action="store_true")
parser.add_argument("--pause", type=float, default=0.0)
args = parser.parse_args()

torch.set_num_threads(1)
config = TrainConfig.from_dict(json.loads(args.config_json))
summary = train_run(args.run_dir, config, teacher=args.teacher_dir, resume=args.resume,
                    on_step=lambda step, record: time.sleep(args.pause))
print(json.dumps({"steps": summary["steps"], "resumed_from_step": summary["resumed_from_step"]}))
