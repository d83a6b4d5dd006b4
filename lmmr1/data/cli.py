"""`lmmr1 data ...`: generate synthetic datasets and validate data files before training.

    lmmr1 data make arith --n 256 --seed 0 --out data/arith [--difficulty 1-3] [--split train|val|test]
    lmmr1 data check data/arith/data.jsonl data/geometry/data.jsonl [--tokenizer models/tiny-vl]
    lmmr1 data convert-sokoban sokoban_levels/ levels_xsb/

`check` runs the same validation as training (`lmmr1.data.records`), prints a summary per file (rows,
datasources, text vs image rows, images per row, image sizes, prompt token lengths with --tokenizer) and lists every
bad row as `file:row: field: what is wrong`; the exit code is 1 when any row or file is bad.

`convert-sokoban IN_DIR OUT_DIR` writes each gym-sokoban `.npy` grid of IN_DIR (LMM-R1's Sokoban levels, from its
`gen_sokoban_tasks.py`) as OUT_DIR/<name>.xsb. Rows can keep pointing at the `.npy` files (the loader reads them);
this is for users who want the levels in XSB. Files that are not levels are listed; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import statistics
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from lmmr1.data.records import DataError, load_rows_report, row_images, row_text


def describe(values: Sequence[float]) -> str:
    """'min a, mean b, p50 c, p95 d, max e' with nearest-rank percentiles; 'none' for no values."""
    if not values:
        return "none"
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, -(-len(ordered) * q // 100) - 1)]  # nearest rank: ceil(q% of n), 1-based

    return (f"min {ordered[0]:g}, mean {statistics.fmean(ordered):.1f}, p50 {rank(50):g}, p95 {rank(95):g}, "
            f"max {ordered[-1]:g}")


def _image_size(ref: str) -> tuple[int, int]:
    source: Any = io.BytesIO(base64.b64decode(ref.partition(",")[2])) if ref.startswith("data:") else ref
    with Image.open(source) as image:
        return image.size


class _TokenCounter:
    """Prompt length in tokens: the chat template when the tokenizer has one (one placeholder per image, before the
    processor expands it to the image's patch count), else the plain prompt text."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def __call__(self, row: dict[str, Any]) -> int:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                         [{"type": "image"} if item["type"] == "image" else item for item in m["content"]]}
                        for m in row["message"]]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = row_text(row)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def summarize(rows: list[dict[str, Any]], count_tokens: _TokenCounter | None = None,
              image_sizes: bool = True) -> list[str]:
    """Summary lines for the good rows of one file; `image_sizes` opens each image's header (only when verified)."""
    images_per_row = [len(row_images(row)) for row in rows]
    sizes = [_image_size(ref) for row in rows for ref in row_images(row)] if image_sizes else []
    sources = Counter(row.get("datasource") or "(none)" for row in rows)
    lines = [
        "datasources: " + (", ".join(f"{name} {count}" for name, count in sources.most_common()) or "none"),
        f"text-only rows: {images_per_row.count(0)}, rows with images: {len(rows) - images_per_row.count(0)}",
        f"images per row: {describe(images_per_row)}",
    ]
    if sizes:
        lines.append(f"image width (px): {describe([w for w, _ in sizes])}")
        lines.append(f"image height (px): {describe([h for _, h in sizes])}")
    if count_tokens is not None:
        lines.append(f"prompt tokens (images as one placeholder each): {describe([count_tokens(r) for r in rows])}")
    lines.append(f"answer length (chars): {describe([len(row['answer']) for row in rows])}")
    return lines


def check(files: list[str], *, input_key: str = "message", label_key: str = "answer", check_images: bool = True,
          tokenizer: str | None = None) -> int:
    """Validate and summarize `files`; prints to stdout, bad rows to stderr. Returns the exit code."""
    count_tokens = _TokenCounter(tokenizer) if tokenizer else None
    failed = False
    for file in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # bad rows are listed below, one per line
                rows, problems = load_rows_report(file, input_key=input_key, label_key=label_key,
                                                  on_bad_row="skip", check_images=check_images)
        except DataError as e:
            print(f"{file}: cannot be checked", file=sys.stderr)
            print("\n".join(e.problems), file=sys.stderr)
            failed = True
            continue
        row_of = re.compile(re.escape(str(Path(file))) + r":(\d+): ")
        bad_rows = len({match.group(1) for p in problems if (match := row_of.match(p))})
        print(f"{file}")
        print(f"  rows: {len(rows)} ok, {bad_rows} bad")
        for line in summarize(rows, count_tokens, image_sizes=check_images) if rows else []:
            print(f"  {line}")
        if problems:
            failed = True
            print(f"{file}: {bad_rows} bad rows:", file=sys.stderr)
            print("\n".join(problems), file=sys.stderr)
    return 1 if failed else 0


def convert_sokoban(in_dir: str, out_dir: str) -> int:
    """Write every `*.npy` grid of `in_dir` as `out_dir/<name>.xsb`; returns the exit code (1 if any file is bad)."""
    from lmmr1.envs.sokoban import read_level_text

    source = Path(in_dir)
    if not source.is_dir():
        print(f"lmmr1 data convert-sokoban: {in_dir} is not a folder", file=sys.stderr)
        return 2
    files = sorted(source.glob("*.npy"))
    if not files:
        print(f"lmmr1 data convert-sokoban: no .npy files in {in_dir}", file=sys.stderr)
        return 1
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    bad = []
    for file in files:
        try:
            xsb = read_level_text(file)
        except (OSError, ValueError) as e:
            bad.append(f"{file}: {getattr(e, 'strerror', None) or e}")
            continue
        (target / f"{file.stem}.xsb").write_text(xsb + "\n", encoding="utf-8")
    print(f"converted {len(files) - len(bad)} of {len(files)} levels from {source} to {target}")
    if bad:
        print(f"{len(bad)} files are not Sokoban levels:", file=sys.stderr)
        print("\n".join(bad), file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmmr1 data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from lmmr1.data.synthetic import GENERATORS

    make = sub.add_parser("make", help="generate a synthetic dataset: DIR/data.jsonl (+ DIR/images/)")
    make.add_argument("kind", choices=sorted(GENERATORS))
    make.add_argument("--n", type=int, required=True, help="number of rows")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", required=True, help="output folder")
    make.add_argument("--difficulty", default=None,
                      help="a level (1..5 arith, 1..3 geometry/sokoban), a range like 1-3, easy|medium|hard, or "
                           "mixed (default: all levels)")
    make.add_argument("--split", choices=["train", "val", "test"], default="train",
                      help="problem split; splits of one kind never share a problem")
    chk = sub.add_parser("check", help="validate data files and print a summary; exit 1 if any row is bad")
    chk.add_argument("files", nargs="+")
    chk.add_argument("--input-key", default="message", help="column holding the message list")
    chk.add_argument("--label-key", default="answer", help="column holding the label")
    chk.add_argument("--tokenizer", default=None, help="model folder whose tokenizer measures prompt lengths")
    chk.add_argument("--no-image-check", action="store_true", help="skip opening and verifying every image")
    conv = sub.add_parser("convert-sokoban", help="write the .npy Sokoban grids of a folder (LMM-R1's levels) as XSB")
    conv.add_argument("in_dir", help="folder of .npy grids (gym-sokoban codes 0-5)")
    conv.add_argument("out_dir", help="folder to write <name>.xsb files to")
    args = parser.parse_args(argv)
    if args.command == "convert-sokoban":
        return convert_sokoban(args.in_dir, args.out_dir)
    if args.command == "make":
        from lmmr1.data.synthetic import make as make_data

        try:
            path = make_data(args.kind, args.n, args.seed, args.out, difficulty=args.difficulty, split=args.split)
        except ValueError as e:
            print(f"lmmr1 data make: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.n} {args.kind} rows ({args.split}) to {path}")
        return 0
    return check(args.files, input_key=args.input_key, label_key=args.label_key,
                 check_images=not args.no_image_check, tokenizer=args.tokenizer)
