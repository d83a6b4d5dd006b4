"""`lmmr1 fit|validate|test`: LightningCLI with lmmr1's defaults, run roots and one-line config errors. Imported only
for those subcommands, so the tool subcommands (`lmmr1 plot`, `score`, `serve-reward`, ...) start without Lightning."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lmmr1 import cli
from lmmr1.config_errors import constructor_error, parse_error, run_error
from lmmr1.data.datamodule import CurriculumDataModule
from lmmr1.distributed import strategy as _strategy  # noqa: F401  registers the CPU-capable deepspeed* names


class RLCLI(LightningCLI):
    """`model` is RL training (`RLModule`) unless a config names another module by `model.class_path`, e.g.
    `lmmr1.modules.sft_module.SFTModule` for vision alignment; `--model.x` overrides work either way."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        parser.set_defaults({"model": {"class_path": "lmmr1.modules.rl_module.RLModule"}})
        # The prompts must be tokenized with the policy's own tokenizer / image processor: set once, used twice.
        parser.link_arguments("model.init_args.policy.init_args.path", "data.processor_path")

    def instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if (problem := _missing_policy_folder(config.model)) is not None:
            _exit_with(self.subcommand, problem)
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001  only config errors are shortened; the rest re-raise as they are
            line = constructor_error(err)
            if line is None:
                raise
            _exit_with(self.subcommand, line, hint=True)


class _Parser(LightningArgumentParser):
    """LightningCLI's parser, plus: the run's root fills the loggers' and checkpoints' folders before validation
    (a logger's `save_dir` is required), and a parse error is one line per problem instead of the usage text and
    jsonargparse's nested report."""

    def validate(self, namespace: Namespace, *args: Any, **kwargs: Any) -> None:
        subcommand = namespace.get("subcommand")
        config = namespace.get(subcommand) if isinstance(subcommand, str) else namespace  # `lmmr1 fit ...`: cfg.fit
        if isinstance(config, Namespace) and isinstance(config.get("trainer"), Namespace):
            _root_the_run(config.trainer)
        super().validate(namespace, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):  # trying alternatives, or debugging
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [option for action in parser._actions for option in action.option_strings]
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write("".join(f"{prog}: error: {line}\n" for line in parse_error(message, options)))
        sys.stderr.write(f"(`{prog} --help` lists every option)\n")
        self.exit(2)


def _root_the_run(trainer: Namespace) -> None:
    """One option moves the run: loggers with no `save_dir` and ModelCheckpoints with no `dirpath` get theirs from
    `trainer.default_root_dir` (the current folder if unset); a value a config sets itself is kept."""
    root = str(trainer.get("default_root_dir") or os.getcwd())
    for logger in _components(trainer.get("logger")):
        cls = _class(logger.get("class_path"))
        if cls is not None and "save_dir" in inspect.signature(cls).parameters and logger.init_args.get("save_dir") \
                is None:
            logger.init_args.save_dir = root
    for callback in _components(trainer.get("callbacks")):
        cls = _class(callback.get("class_path"))
        if cls is not None and issubclass(cls, ModelCheckpoint) and callback.init_args.get("dirpath") is None:
            callback.init_args.dirpath = str(Path(root) / "checkpoints")


def _components(value: Any) -> list[Namespace]:
    """The `class_path` entries of a component list (or a single one), each given an `init_args`."""
    items = [item for item in (value if isinstance(value, list) else [value])
             if isinstance(item, Namespace) and isinstance(item.get("class_path"), str)]
    for item in items:
        if not isinstance(item.get("init_args"), Namespace):
            item.init_args = Namespace()
    return items


def _class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # jsonargparse reports it
    return cls if isinstance(cls, type) else None


def _missing_policy_folder(model: Namespace) -> str | None:
    """A missing policy folder without a `make` recipe, said before anything loads, with both ways to get one."""
    policy = model.get("init_args", Namespace()).get("policy") if isinstance(model, Namespace) else None
    init_args = policy.get("init_args") if isinstance(policy, Namespace) else None
    if not isinstance(init_args, Namespace) or "make" not in init_args or init_args.make is not None:
        return None
    path = init_args.get("path")
    if not isinstance(path, str) or Path(path).expanduser().is_dir():
        return None
    return (f"--model.policy.init_args.path: {path!r} is not a folder; build it (`lmmr1 model tiny --out {path}`), "
            f"or add `make: {{kind: tiny-vl}}` to the policy's init_args to build it on first use")


def _exit_with(subcommand: str | None, line: str, hint: bool = False) -> NoReturn:
    prog = f"lmmr1 {subcommand}" if subcommand else "lmmr1"
    sys.stderr.write(f"{prog}: error: {line}\n")
    if hint:
        sys.stderr.write("(LMMR1_TRACEBACK=1 shows the full traceback)\n")
    raise SystemExit(2)


# Known-benign warnings: checkpoints are meant to hold the post-update state; the frozen reference is in eval mode.
_QUIET = ("Using ModelCheckpoint with manual optimization", "Found .* module\\(s\\) in eval mode",
          "`isinstance\\(treespec, LeafSpec\\)` is deprecated")


def run(argv: list[str], args: ArgsType) -> None:
    """`lmmr1 fit|validate|test ...`: the LightningCLI run, with config errors said in one line."""
    for message in _QUIET:
        warnings.filterwarnings("ignore", message=message)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        RLCLI(
            L.LightningModule,
            CurriculumDataModule,
            subclass_mode_model=True,
            args=None if args is None else argv,  # None: LightningCLI reads sys.argv (given both, it warns)
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the module builds its optimizer from --model.optimizer
            parser_kwargs={"description": cli.__doc__, "prog": "lmmr1"},  # also for `python cli.py`, tests
            parser_class=_Parser,
        )
    except ValueError as err:
        line = run_error(err)
        if line is None:
            raise
        _exit_with(argv[0] if argv else None, line, hint=True)

