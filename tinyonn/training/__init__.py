"""Training of an assembled TinyONN model (SMK and the baselines run by the same loop).

- `config`:     `TrainConfig` with `Phase1Config` (forced differentiation) and `Phase2Config` (adaptive emergence)
- `surprise`:   per-expert surprise from the gradients, global surprise, PI, min_k = f(PI, act_k);
                `ExpertRows`, every layer's experts as one grid for the per-step bookkeeping
- `rules`:      smk / samk / selective / full → per-layer expert keep masks, gradients zeroed outside them
- `optim`:      `MaskedAdamW` (masked rows keep weights, moments and step counts), warm-up + cosine schedule
- `losses`:     response CE, KL to the teacher, Switch load balance, router distillation, router z-loss
- `parameters`: parameter roles, which train, optimiser groups
- `phases`:     each phase's routing, the phase switch
- `batches`:    the deterministic data plan (epochs, steps, packed or length-grouped micro-batches
                under a token budget) and the micro-batch tensors with host-side loss positions
- `checkpoint`: atomic safetensors checkpoints, RNG states, log truncation
- `loop`:       `train(model, teacher, tokenizer, examples, config, out_dir)`
- `run`:        `train_run(run_dir, config, teacher)` over a run folder
"""

from tinyonn.training.config import Phase1Config, Phase2Config, TrainConfig
from tinyonn.training.loop import TIMING_FIELDS, NonFiniteStepWarning, train
from tinyonn.training.run import train_run

__all__ = ["NonFiniteStepWarning", "Phase1Config", "Phase2Config", "TIMING_FIELDS", "TrainConfig", "train", "train_run"]
