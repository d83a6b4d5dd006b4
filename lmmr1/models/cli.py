"""`lmmr1 model ...`: build models offline.

    lmmr1 model tiny --out models/tiny-vl [--kind vl|text] [--seed 0]
"""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmmr1 model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="a tiny random Qwen2.5-VL (or Qwen2 with --kind text) with a BPE tokenizer")
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument("--kind", choices=["vl", "text"], default="vl")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "tiny":
        from lmmr1.models.tiny import build_tiny

        print(build_tiny(args.out, kind=args.kind, seed=args.seed))
    return 0
