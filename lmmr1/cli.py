"""The `lmmr1` command: LightningCLI for fit/validate/test plus tool subcommands.

    lmmr1 fit -c configs/demo/smoke.yaml            # train (any option overridable: --model.sampling.n 4)
    lmmr1 fit -c configs/demo/smoke.yaml --print_config
    lmmr1 model tiny --out models/tiny-vl           # build a tiny random Qwen2.5-VL offline
    lmmr1 data make arith --n 256 --seed 0 --out data/arith
    lmmr1 score --reward math --input rows.jsonl --output scored.jsonl
    lmmr1 plot runs/smoke                            # PNG curves from the run's metrics.csv

`--trainer.default_root_dir DIR` moves the whole run: loggers without a `save_dir` and a ModelCheckpoint without a
`dirpath` are filled in from it (logs and samples under DIR/<logger name>/, checkpoints in DIR/checkpoints/, HF
folders in DIR/hf/). A config mistake is reported as one line naming the option (see lmmr1/config_errors.py).
"""

from __future__ import annotations

import importlib
import sys

TOOLS = {
    "score": "lmmr1.rewards.score",
    "serve-reward": "lmmr1.rewards.server",
    "data": "lmmr1.data.cli",
    "model": "lmmr1.models.cli",
    "plot": "lmmr1.plots",
}


def main(args: list[str] | None = None) -> int | None:
    """Entry point of the `lmmr1` console script; `args` lets tests call it with a list."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    from lmmr1.trainer_cli import run  # Lightning, transformers and torch: only the trainer subcommands need them

    run(argv, args)
    return None
