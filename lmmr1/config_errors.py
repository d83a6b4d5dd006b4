"""Config mistakes as one readable line each: the option, what is wrong, and the fix.

jsonargparse reports a bad value inside a `class_path` component as a nested "Does not validate against any of the
Union subtypes" tree (ending in `Given value: Namespace(...)`), and an error raised by a component's constructor as a
40-line traceback; the useful line is buried in both. This module digs it out:

    lmmr1 fit: error: --model.algorithm.advantage: 'grpoo' is not one of gae, reinforce_pp, reinforce_baseline, rloo,
    grpo, dr_grpo; did you mean 'grpo'?

`LMMR1_TRACEBACK=1` keeps the full traceback of errors raised while building the components.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import os
import re
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^(?:- )?Problem with given class_path '([^']+)':\s*$")
_NOISE = re.compile(
    r"^(?:- )?(?:Does not validate against any of the Union subtypes|Subtypes: |Errors:$|Given value(?: type)?: |"
    r"Expected a <class 'NoneType'>|Expected a path but .* either not accessible or invalid$)"
)
_LITERAL = re.compile(r"^Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$")
_TYPE = re.compile(r"^Expected a <class '([\w.]+)'>\. Got value: (.*)$")
_OPTION = re.compile(r"^(?:.*: )?Option '([^']+)' is not accepted(?:\. Got value: Namespace\(class_path='([^']+)'.*)?$")
_CHOICE = re.compile(r"^(.*)invalid choice: '([^']*)' \(choose from (.*)\)$")
_GENERIC = re.compile(r"^(?:Expected a <class '[\w.]+'>|Not a valid subclass of .*|Subclass types expect one of:|"
                      r"a class path \(str\)|a dict with.*|a dict without.*)$")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)$", re.DOTALL)
_PACKAGE = str(Path(__file__).parent)

TRACEBACK_ENV = "LMMR1_TRACEBACK"
"""Set to 1 to see the full traceback instead of the one-line error of a component's constructor."""


def parse_error(message: str, option_strings: Iterable[str] = ()) -> list[str]:
    """The problems in a jsonargparse parse error, one `--option: what is wrong; the fix` line each.

    Args:
        message: the text jsonargparse passes to `ArgumentParser.error`.
        option_strings: the options the parser knows, for "did you mean" on an unrecognized one.
    """
    unrecognized = _UNRECOGNIZED.match(message.strip())
    if unrecognized:
        options = list(option_strings)
        args = unrecognized.group(1).split()
        named = [_unrecognized(arg, options) for arg in args if arg.startswith("-")]
        return named or [f"unexpected argument(s): {' '.join(args)}"]
    problems: list[str] = []
    generic: list[str] = []  # "Expected a <class 'bool'>": what the other members of a Union wanted
    stack: list[tuple[int, str, str]] = []  # (indent, "key" | "class", value) of the enclosing lines
    for raw in message.splitlines():
        line = raw.strip()
        if not line:
            continue
        indent = len(raw) - len(raw.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if key := _KEY.match(line):
            stack.append((indent, "key", key.group(1)))
            line = key.group(2)
            if not line:
                continue
        if cls := _CLASS.match(line):
            stack.append((indent, "class", cls.group(1)))
            continue
        if _NOISE.match(line):
            continue
        keys = [value for _, kind, value in stack if kind == "key"]
        classes = [value for _, kind, value in stack if kind == "class"]
        text = line.removeprefix("- ")
        problem = _describe(".".join(keys), text, classes[-1] if classes else None)
        found = generic if _GENERIC.match(text) else problems
        if problem not in found:
            found.append(problem)
    return problems or generic or [message.strip()]


def _describe(key: str, text: str, class_path: str | None) -> str:
    flag = f"--{key}" if key else ""
    if not flag:
        if choice := _CHOICE.match(text):
            choices = ast.literal_eval(f"[{choice.group(3)}]")
            return f"{text}{_did_you_mean(choice.group(2), choices)}"
        return text
    if literal := _LITERAL.match(text):
        choices, got = [str(c) for c in ast.literal_eval(f"[{literal.group(1)}]")], literal.group(2)
        return f"{flag}: {got!r} is not one of {', '.join(choices)}{_did_you_mean(got, choices)}"
    if wrong_type := _TYPE.match(text):
        return f"{flag}: expected {_article(wrong_type.group(1))}, got {wrong_type.group(2)!r}"
    if option := _OPTION.match(text):
        name, class_path = option.group(1), option.group(2) or class_path
        accepted = _parameters(class_path)
        known = f" (options: {', '.join(accepted)})" if accepted else ""
        where = class_path.rsplit(".", 1)[-1] if class_path else "this component"
        return f"{flag}: {where} has no option {name!r}{_did_you_mean(name, accepted)}{known}"
    return f"{flag}: {text}" if not text.startswith("--") else text


def _article(type_name: str) -> str:
    name = type_name.rsplit(".", 1)[-1]
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(name, name)


def _did_you_mean(got: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(got, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _parameters(class_path: str | None) -> list[str]:
    """The init parameters of a `class_path` component (what `Option 'x' is not accepted` could have meant)."""
    if not class_path:
        return []
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        if dataclasses.is_dataclass(cls):
            return [f.name for f in dataclasses.fields(cls) if f.init]
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except Exception:  # noqa: BLE001  a hint only: never hide the error being reported
        return []


def _unrecognized(arg: str, option_strings: list[str]) -> str:
    name = arg.split("=", 1)[0]
    close = difflib.get_close_matches(name, [o for o in option_strings if o.startswith("--")], n=1, cutoff=0.6)
    return f"{name}: no such option" + (f"; did you mean {close[0]}?" if close else "")


def constructor_error(err: BaseException) -> str | None:
    """One line for an error that a component's constructor raised about its configuration (a `ValueError` naming
    the option, a missing file or package, Lightning's MisconfigurationException); None for anything else, a
    probable bug that keeps its traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if os.environ.get(TRACEBACK_ENV):
        return None
    root = err
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    if not isinstance(root, ValueError | FileNotFoundError | ImportError | MisconfigurationException):
        return None
    message = str(root).strip()
    if root is err and "Does not validate against any of the Union subtypes" in message:
        return "; ".join(parse_error(message))  # raised by jsonargparse itself: the same tree as at parse time
    if message.startswith("--"):
        return message
    where = _component(root.__traceback__)
    return f"{where}: {message}" if where else message


def run_error(err: BaseException) -> str | None:
    """One line for a config error raised while running (a `ValueError` from lmmr1 code that names its option,
    `--...: ...`); None for anything else."""
    if os.environ.get(TRACEBACK_ENV) or not isinstance(err, ValueError) or not str(err).startswith("--"):
        return None
    frames = list(_frames(err.__traceback__))
    return str(err) if frames and frames[-1].f_code.co_filename.startswith(_PACKAGE) else None


def _component(tb: TracebackType | None) -> str | None:
    """The config group whose constructor raised (`--model`, `--data`, `--trainer`, ...), else the class's name."""
    import lightning as L
    from lightning.pytorch.loggers import Logger

    groups = ((L.Trainer, "--trainer"), (L.LightningModule, "--model"), (L.LightningDataModule, "--data"),
              (L.Callback, "--trainer.callbacks"), (Logger, "--trainer.logger"))
    for frame in _frames(tb):  # outermost first: a component's own constructor, not the helpers it calls
        instance = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if instance is None:
            continue
        for base, flag in groups:
            if isinstance(instance, base):
                return flag
        return f"{type(instance).__module__}.{type(instance).__qualname__}"
    return None


def _frames(tb: TracebackType | None):
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next
