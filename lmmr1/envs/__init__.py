"""Task environments: Sokoban (levels, simulator, solver, renderer) shared by rewards and data generators, and the
multi-turn agent environments (`Environment` protocol; Sokoban played step by step, number guessing)."""

from lmmr1.envs.environment import Environment, Observation, Step
from lmmr1.envs.guess import GuessNumber
from lmmr1.envs.sokoban import Level, PlayResult, generate_level, parse_plan, play, render, solve
from lmmr1.envs.sokoban_game import SokobanGame

ENVIRONMENTS: dict[str, type[Environment]] = {"sokoban": SokobanGame, "guess": GuessNumber}
"""Environments by name (`--model.engine.init_args.env sokoban`); any Environment subclass also works by class_path."""

__all__ = ["ENVIRONMENTS", "Environment", "GuessNumber", "Level", "Observation", "PlayResult", "SokobanGame", "Step",
           "generate_level", "parse_plan", "play", "render", "solve"]
