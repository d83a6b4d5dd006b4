"""The `lmmr1` command: LightningCLI for fit/validate/test plus tool subcommands.

    lmmr1 fit -c configs/demo/smoke.yaml            # train (any option overridable: --model.sampling.n 4)
    lmmr1 fit -c configs/demo/smoke.yaml --print_config
    lmmr1 model tiny --out models/tiny-vl           # build a tiny random Qwen2.5-VL offline
    lmmr1 data make arith --n 256 --seed 0 --out data/arith
    lmmr1 score --reward math --input rows.jsonl --output scored.jsonl
    lmmr1 plot runs/smoke                            # PNG curves from the run's metrics.csv
"""

from __future__ import annotations

import importlib
import sys
import warnings

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import ArgsType, LightningCLI

from lmmr1.data.datamodule import CurriculumDataModule
from lmmr1.distributed import strategy as _strategy  # noqa: F401  registers the CPU-capable deepspeed* names

TOOLS = {
    "score": "lmmr1.rewards.score",
    "serve-reward": "lmmr1.rewards.server",
    "data": "lmmr1.data.cli",
    "model": "lmmr1.models.cli",
    "plot": "lmmr1.plots",
}


class RLCLI(LightningCLI):
    """`model` is RL training (`RLModule`) unless a config names another module by `model.class_path`, e.g.
    `lmmr1.modules.sft_module.SFTModule` for vision alignment; `--model.x` overrides work either way."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        parser.set_defaults({"model": {"class_path": "lmmr1.modules.rl_module.RLModule"}})
        # The prompts must be tokenized with the policy's own tokenizer / image processor: set once, used twice.
        parser.link_arguments("model.init_args.policy.init_args.path", "data.processor_path")


# Known-benign warnings: checkpoints are meant to hold the post-update state; the frozen reference is in eval mode.
_QUIET = ("Using ModelCheckpoint with manual optimization", "Found .* module\\(s\\) in eval mode",
          "`isinstance\\(treespec, LeafSpec\\)` is deprecated")


def main(args: ArgsType = None) -> int | None:
    """Entry point of the `lmmr1` console script; `args` lets tests call it with a list."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    for message in _QUIET:
        warnings.filterwarnings("ignore", message=message)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    RLCLI(
        L.LightningModule,
        CurriculumDataModule,
        subclass_mode_model=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module builds its optimizer from --model.optimizer
        parser_kwargs={"description": __doc__},
    )
    return None
