"""Recipe of the embedded teacher: tokenizer, token shards, resumable pretraining, export.

    tinyonn teacher data       probe/eval sets            → stores/builtin/{probe,eval}/
    tinyonn teacher tokenizer  corpus sample + probe      → <run>/tokenizer/
    tinyonn teacher shards     corpus + probe (chat form) → <run>/shards/  (zstd, ≤ 40 MiB each)
    tinyonn teacher train      shards                     → <run>/checkpoints/latest.pt (resumable)
    tinyonn teacher export     checkpoint                 → stores/builtin/teacher/ (bf16, < 16 MiB files)

Training stops by itself after `--max-minutes` with a checkpoint of model, optimiser, step, data
sampler and torch RNG; running it again continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recipes.config import PretrainConfig, TeacherModelConfig
from recipes.corpus import WindowSampler, encode_chat_stream, read_text, read_token_shards, source_name

SFT_SOURCE = "sft_chat"


def qwen3_config(cfg: TeacherModelConfig):
    """The `Qwen3Config` of the teacher shape."""
    from transformers import Qwen3Config

    from recipes.tokenizer import EOS_TOKEN, IM_END, SPECIAL_TOKENS

    return Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index(IM_END),
        pad_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
    )


def build_model(cfg: TeacherModelConfig, seed: int = 0):
    """A freshly initialised `Qwen3ForCausalLM` of the teacher shape (fp32)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(qwen3_config(cfg))


def train_teacher_tokenizer(corpus_files, probe_examples, out_dir, vocab_size: int = 8192,
                            chars_per_source: int = 1_500_000):
    """Train the BPE on an equal-size sample of every corpus source plus the probe train split."""
    from recipes.tokenizer import chunked, save_tokenizer, train_bpe

    def texts():
        for path in corpus_files:
            yield from chunked([read_text(path, chars_per_source)])
        for example in probe_examples:
            yield "\n".join(m["content"] for m in example.messages)

    tokenizer = train_bpe(texts(), vocab_size=vocab_size)
    return save_tokenizer(tokenizer, out_dir)


def build_teacher_shards(tokenizer_dir, corpus_files, probe_examples, out_dir,
                         max_chars_per_source: dict[str, int] | None = None):
    """Token shards of every corpus file plus the probe train split in chat form (`sft_chat`)."""
    from transformers import AutoTokenizer

    from recipes.corpus import build_token_shards

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    chat = encode_chat_stream(hf, probe_examples)
    return build_token_shards(hf.backend_tokenizer, corpus_files, out_dir, max_chars_per_source,
                              extra_streams={SFT_SOURCE: chat})


def learning_rate(step: int, total_steps: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def stream_weights(streams: dict[str, np.ndarray], sft_fraction: float) -> dict[str, float]:
    """Corpus sources by size; the chat stream gets `sft_fraction` of all windows."""
    corpus = {name: float(len(s)) for name, s in streams.items() if name != SFT_SOURCE}
    total = sum(corpus.values())
    weights = {name: (1 - sft_fraction) * n / total for name, n in corpus.items()}
    if SFT_SOURCE in streams:
        weights[SFT_SOURCE] = sft_fraction
    return weights


def make_optimizer(model, cfg: PretrainConfig, device: torch.device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def save_checkpoint(path: Path, model, optimizer, sampler: WindowSampler, step: int, tokens: int,
                    elapsed_s: float, cfg: PretrainConfig, last_loss: float = float("nan")) -> None:
    """Write the whole training state atomically (temp file, then rename)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "tokens": tokens,
        "elapsed_s": elapsed_s,
        "last_loss": last_loss,
        "config": dataclasses.asdict(cfg),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def pretrain(cfg: PretrainConfig, shard_dir: str | Path, run_dir: str | Path,
             max_minutes: float | None = None, device: str | None = None, log_every: int = 10,
             max_steps: int | None = None) -> dict:
    """Train (or resume training) the teacher; returns a summary with `done` and the last loss.

    Stops with a checkpoint after `max_minutes` of wall time or `max_steps` steps in this call.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    streams = read_token_shards(shard_dir)
    sampler = WindowSampler(streams, cfg.seq_len, stream_weights(streams, cfg.sft_fraction), cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps = math.ceil(cfg.total_tokens / tokens_per_step)

    model = build_model(cfg.model, cfg.seed).to(dev)
    model.config.use_cache = False
    optimizer = make_optimizer(model, cfg, dev)
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    step, tokens, elapsed_before = 0, 0, 0.0
    loss_value = float("nan")
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        loss_value = state.get("last_loss", float("nan"))
        print(f"resumed from {checkpoint} at step {step} ({tokens:,} tokens)")
    (run_dir / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    amp_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            hidden = model.model(input_ids=inputs).last_hidden_state
            logits = model.lm_head(hidden)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    step_fn = torch.compile(loss_fn) if (cfg.compile and dev.type == "cuda") else loss_fn
    micro = min(cfg.micro_batch_size, cfg.batch_size)
    accumulation = cfg.batch_size // micro
    log_path = run_dir / "train_log.jsonl"
    start = time.time()
    last_save = start
    deadline = start + max_minutes * 60 if max_minutes else None
    first_step = step
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step")
    model.train()
    while step < total_steps:
        step_start = time.time()
        lr = learning_rate(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=dev)
        for _ in range(accumulation):
            window = torch.from_numpy(sampler.sample(micro))
            if dev.type == "cuda":
                window = window.pin_memory().to(dev, non_blocking=True)
            try:
                loss = step_fn(window[:, :-1], window[:, 1:])
            except Exception as err:  # compile failure: fall back to eager, say so
                if step_fn is loss_fn:
                    raise
                print(f"torch.compile failed ({type(err).__name__}: {err}); continuing in eager mode")
                step_fn = loss_fn
                loss = step_fn(window[:, :-1], window[:, 1:])
            (loss / accumulation).backward()
            loss_sum += loss.detach() / accumulation
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        bar.update(1)
        if step % log_every == 0 or step == total_steps:
            loss_value = float(loss_sum)
            step_s = time.time() - step_start
            record = {"step": step, "tokens": tokens, "loss": loss_value, "lr": lr,
                      "grad_norm": float(grad_norm), "tok_s": tokens_per_step / step_s,
                      "elapsed_s": elapsed_before + time.time() - start}
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tok_s']:,.0f}")
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
        now = time.time()
        out_of_time = (deadline is not None and now >= deadline) or (
            max_steps is not None and step - first_step >= max_steps)
        if out_of_time or step == total_steps or now - last_save >= cfg.checkpoint_every_s:
            save_checkpoint(checkpoint, model, optimizer, sampler, step, tokens,
                            elapsed_before + now - start, cfg, loss_value)
            last_save = now
        if out_of_time:
            break
    bar.close()
    summary = {"done": step >= total_steps, "step": step, "total_steps": total_steps, "tokens": tokens,
               "last_logged_loss": loss_value, "elapsed_s": elapsed_before + time.time() - start,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    (run_dir / "pretrain_status.json").write_text(json.dumps(summary, indent=1))
    return summary


def export_teacher(run_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path,
                   max_shard_size: str = "12MB") -> Path:
    """Save the trained teacher as a bf16 Hugging Face model directory in < 16 MiB files."""
    from transformers import AutoTokenizer, GenerationConfig

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    state = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    cfg = state["config"]
    model = build_model(TeacherModelConfig(**cfg["model"]))
    model.load_state_dict(state["model"])
    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out_dir))
    run_status = json.loads((run_dir / "pretrain_status.json").read_text()) if (
        run_dir / "pretrain_status.json").is_file() else {}
    status = {"step": state["step"], "tokens": state["tokens"], "elapsed_s": state["elapsed_s"],
              "device": run_status.get("device"), "final_loss": run_status.get("last_logged_loss"),
              "sft_fraction": cfg["sft_fraction"], "vocab_size": len(tokenizer)}
    (out_dir / "training_state.json").write_text(json.dumps(status, indent=1))
    training = out_dir / "training"
    training.mkdir(exist_ok=True)
    for name in ("pretrain_config.json", "train_log.jsonl", "pretrain_status.json"):
        if (run_dir / name).is_file():
            (training / name).write_bytes((run_dir / name).read_bytes())
    return out_dir


def corpus_files(corpus_dir: str | Path) -> list[Path]:
    """The pretraining text files of a corpora folder, sorted by name."""
    files = sorted(Path(corpus_dir).glob("*.txt.zst")) + sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt or *.txt.zst corpus files in {corpus_dir}")
    return files


__all__ = [
    "build_model", "qwen3_config", "train_teacher_tokenizer", "build_teacher_shards", "pretrain",
    "export_teacher", "learning_rate", "corpus_files", "source_name",
]
