"""Task environments that rewards and data generators share (Sokoban: levels, simulator, solver, renderer)."""

from lmmr1.envs.sokoban import Level, PlayResult, generate_level, parse_plan, play, render, solve

__all__ = ["Level", "PlayResult", "generate_level", "parse_plan", "play", "render", "solve"]
