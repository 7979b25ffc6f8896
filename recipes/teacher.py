"""The builtin teacher's recipe as steps: `python -m recipes.teacher STEP` from the repository root.

data → tokenizer → shards → train (resumable in chunks) → export → eval → card; the teacher card
(`stores/builtin/teacher/README.md`) says what each produced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

DEFAULT_CORPORA = Path("..") / "shared" / "corpora"
"""The public corpora beside this checkout (the recipe's input; the library never reads it)."""


def cmd_teacher(args) -> int:
    from recipes import pretrain

    if args.step == "data":
        from recipes.builtin_data import build_builtin_data

        print(json.dumps(build_builtin_data(args.corpora), indent=1))
        return 0
    from tinyonn.data import load_probe_set

    work = Path(args.work)
    if args.step == "tokenizer":
        files = pretrain.corpus_files(Path(args.corpora) / "pretrain")
        pretrain.train_teacher_tokenizer(files, load_probe_set("builtin", "train"), work / "tokenizer",
                                         vocab_size=args.vocab_size)
    elif args.step == "shards":
        files = pretrain.corpus_files(Path(args.corpora) / "pretrain")
        limits = {"code__go-stdlib": args.go_chars}
        infos = pretrain.build_teacher_shards(work / "tokenizer", files, load_probe_set("builtin", "train"),
                                              work / "shards", limits)
        print(f"{len(infos)} shards, {sum(i.n_tokens for i in infos):,} tokens")
    elif args.step == "train":
        from recipes.config import PretrainConfig

        cfg = PretrainConfig()
        overrides = json.loads(args.overrides) if args.overrides else {}
        if "model" in overrides:
            from recipes.config import TeacherModelConfig

            overrides["model"] = TeacherModelConfig(**overrides["model"])
        cfg = dataclasses.replace(cfg, **overrides)
        summary = pretrain.pretrain(cfg, work / "shards", work, max_minutes=args.max_minutes,
                                    max_steps=args.max_steps)
        print(json.dumps(summary, indent=1))
        if not summary["done"]:
            print("stopped at the time limit with a checkpoint: run the same command again to continue")
    elif args.step == "export":
        out = pretrain.export_teacher(work, work / "tokenizer", args.out)
        print(f"exported to {out}")
    elif args.step == "eval":
        from recipes.teacher_card import evaluate_teacher, write_teacher_card

        metrics = evaluate_teacher(args.out, work / "shards", device=args.device)
        (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
        write_teacher_card(metrics, args.out)
        print(json.dumps(metrics, indent=1))
    elif args.step == "card":
        from recipes.teacher_card import write_teacher_card

        metrics = json.loads((Path(args.out) / "metrics.json").read_text())
        write_teacher_card(metrics, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipes.teacher", description=__doc__)
    teacher = parser
    teacher.add_argument("step", choices=["data", "tokenizer", "shards", "train", "export", "eval", "card"])
    teacher.add_argument("--corpora", default=str(DEFAULT_CORPORA), help="the shared corpora folder")
    teacher.add_argument("--work", default="stores/runs/teacher", help="tokenizer, shards and checkpoints")
    teacher.add_argument("--out", default="stores/builtin/teacher", help="exported teacher directory")
    teacher.add_argument("--vocab-size", type=int, default=16384)
    teacher.add_argument("--go-chars", type=int, default=20_000_000, help="cap on Go stdlib characters")
    teacher.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this")
    teacher.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this")
    teacher.add_argument("--overrides", default=None, help="JSON of PretrainConfig fields to change")
    teacher.add_argument("--device", default=None)
    teacher.set_defaults(func=cmd_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
