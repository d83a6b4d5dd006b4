"""`build_reward(spec)`: turn a name, plug-in, YAML file or mapping from the config into a `Reward`.

Accepted specs:
- a built-in name: `format`, `accuracy`, `math` (0.5*format + 1.0*accuracy, LMM-R1's weights), `sokoban`
  (0.5*format + 1.0*solved); LMM-R1's own verifiers, rule for rule: `lmm_r1_math`, `lmm_r1_sokoban`, and `lmm_r1`
  (rows holding a level to `lmm_r1_sokoban`, the rest to `lmm_r1_math`);
- a plug-in `path/to/file.py:fn` or `package.module:fn` (see `plugin.py`);
- a URL `http://host:port` of a reward server (see `remote.py`); a URL ending in `/get_reward` is an OpenRLHF-style
  server (LMM-R1's verifiers), spoken to in that protocol;
- a path to a YAML file holding any mapping below (plug-in paths in it resolve against the file's folder);
- a mapping, e.g.
    {"routes": {"geo*": ["format", "math"], "sokoban": ["format", "sokoban"], "*": "math"},
     "weights": {"format": 0.5}, "options": {"accuracy": {"timeout": 5.0}, "solved": {"noop_penalty": 0.05}}}
  A route lists names (built-ins are expanded into the components `format`, `accuracy`, `solved`, each used once) or
  plug-ins. A component's weight is `weights[name]`, else its default (format 0.5, accuracy 1.0, solved 1.0, plug-ins
  1.0), a finite number; a weight for a component no route uses is an error (a typo would keep the default);
  `options[name]` are constructor arguments of that component's class. Without routes, `{"reward": <name or list>,
  "weights": ..., "options": ...}` builds one weighted sum. `{"url": ..., "timeout": ..., "retries": ..., "backoff":
  ..., "token": ..., "protocol": "lmmr1" | "openrlhf", "prompt_template": ...}` builds the remote client (better than
  `token`: the LMMR1_REWARD_TOKEN environment variable), and
  `{"class_path": ..., "init_args": {...}}` any Reward class;
- a Reward object, returned as is.

>>> build_reward({"reward": "math", "weights": {"format": 0.2}}).weights
[0.2, 1.0]
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping
from typing import Any

from lmmr1.rewards.accuracy import AccuracyReward
from lmmr1.rewards.base import Reward
from lmmr1.rewards.composite import MathReward, RoutedReward, WeightedSum
from lmmr1.rewards.format import FormatReward
from lmmr1.rewards.lmm_r1_math import LmmR1MathReward
from lmmr1.rewards.lmm_r1_sokoban import LmmR1SokobanReward
from lmmr1.rewards.plugin import PluginReward
from lmmr1.rewards.remote import RemoteReward
from lmmr1.rewards.sokoban import SokobanReward

COMPONENTS: dict[str, type[Reward]] = {"format": FormatReward, "accuracy": AccuracyReward, "solved": SokobanReward,
                                       "lmm_r1_math": LmmR1MathReward, "lmm_r1_sokoban": LmmR1SokobanReward}
DEFAULT_WEIGHTS = {"format": 0.5, "accuracy": 1.0, "solved": 1.0}  # the lmm_r1_* rewards weigh their own parts: 1.0
PRESETS = {"math": ["format", "accuracy"], "sokoban": ["format", "solved"]}
LMM_R1_ROUTES = {"has:env": "lmm_r1_sokoban", "*": "lmm_r1_math"}  # the `lmm_r1` name: each row to its verifier
BUILTINS = ["format", "accuracy", "math", "sokoban", "lmm_r1_math", "lmm_r1_sokoban", "lmm_r1"]
_REMOTE_KEYS = ("timeout", "retries", "backoff", "token", "protocol", "prompt_template")
_MAPPING_KEYS = {"routes", "weights", "options", "key", "reward", "url", "class_path", "init_args", *_REMOTE_KEYS}


def _choices() -> str:
    return (f"choose a built-in name {BUILTINS}, a plug-in 'path/to/file.py:fn' or 'package.module:fn', a YAML file, "
            f"or a reward server URL")


class _Builder:
    """Builds from one config; component instances are shared across routes (one math worker pool per run)."""

    def __init__(self, weights: Mapping[str, float] | None, options: Mapping[str, Any] | None, base_dir: str) -> None:
        for key, value in (("weights", weights), ("options", options)):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{key}: expected a mapping of component name -> "
                                 f"{'weight' if key == 'weights' else 'constructor arguments'}, got {value!r}")
        self.weights, self.options, self.base_dir = dict(weights or {}), dict(options or {}), base_dir
        for name, weight in self.weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ValueError(f"weights.{name}: must be a finite number, got {weight!r}")
            self.weights[name] = float(weight)
        unknown = sorted(set(self.options) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"options: unknown component(s) {unknown}; options apply to {sorted(COMPONENTS)}")
        for name, kwargs in self.options.items():
            if kwargs is not None and not isinstance(kwargs, Mapping):
                raise ValueError(f"options.{name}: expected a mapping of constructor arguments, got {kwargs!r}")
        self.cache: dict[str, Reward] = {}
        self.used: set[str] = set()  # components and plug-ins some reward uses: the names `weights` may give

    def component(self, name: str) -> Reward:
        if name not in self.cache:
            kwargs = self.options.get(name) or {}
            try:
                self.cache[name] = COMPONENTS[name](**kwargs)
            except (TypeError, ValueError) as e:
                raise ValueError(f"options.{name}: {e}") from e
        return self.cache[name]

    def plugin(self, target: str) -> Reward:
        if target not in self.cache:
            path, _, fn = target.rpartition(":")
            local = os.path.join(self.base_dir, path)
            if not os.path.isabs(path) and path.endswith(".py") and os.path.isfile(local):
                target = f"{local}:{fn}"
            self.cache[target] = PluginReward(target)
        return self.cache[target]

    def weighted(self, names: str | list[str]) -> WeightedSum:
        if not isinstance(names, str | list | tuple):
            raise ValueError(f"reward {names!r} is not a name or a list of names; {_choices()}")
        names = [names] if isinstance(names, str) else list(names)
        members: dict[str, Reward] = {}
        for name in names:
            if not isinstance(name, str):
                raise ValueError(f"reward list item {name!r} is not a name or plug-in")
            for leaf in PRESETS.get(name, [name]):
                if leaf in COMPONENTS:
                    members.setdefault(leaf, self.component(leaf))
                elif ":" in leaf:
                    plugin = self.plugin(leaf)
                    members.setdefault(plugin.name, plugin)
                else:
                    raise ValueError(f"unknown reward {leaf!r}; {_choices()}")
        weights = [float(self.weights.get(k, DEFAULT_WEIGHTS.get(k, 1.0))) for k in members]
        self.used.update(members)
        return WeightedSum(list(members.values()), weights, name="+".join(names))

    def check_weights_used(self) -> None:
        """A weight for a component no reward uses is a typo that would silently keep the default weight."""
        unused = sorted(set(self.weights) - self.used)
        if unused:
            raise ValueError(f"weights: {unused} is not a component of this reward; its components are "
                             f"{sorted(self.used)}")


def _from_mapping(spec: Mapping[str, Any], base_dir: str) -> Reward:
    unknown = sorted(set(spec) - _MAPPING_KEYS)
    if unknown:
        raise ValueError(f"reward config: unknown key(s) {unknown}; accepted keys are {sorted(_MAPPING_KEYS)}")
    if "class_path" in spec:
        module, _, cls_name = str(spec["class_path"]).rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise ValueError(f"class_path: {spec['class_path']!r} is not a Reward class")
        return cls(**(spec.get("init_args") or {}))
    if "url" in spec:
        extra = {k: spec[k] for k in _REMOTE_KEYS if k in spec}
        return RemoteReward(str(spec["url"]), **extra)
    builder = _Builder(spec.get("weights"), spec.get("options"), base_dir)
    if "routes" in spec:
        routes = spec["routes"]
        if not isinstance(routes, Mapping) or not routes:
            raise ValueError("routes: expected a mapping of datasource pattern -> reward name or list of names")
        reward: Reward = RoutedReward({str(p): builder.weighted(names) for p, names in routes.items()},
                                      key=spec.get("key", "datasource"))
    elif "reward" in spec:
        reward = builder.weighted(spec["reward"])
    else:
        raise ValueError("reward config: give 'routes', 'reward', 'url' or 'class_path'")
    builder.check_weights_used()
    return reward


def build_reward(spec: str | Mapping[str, Any] | Reward, base_dir: str = ".") -> Reward:
    """Build a Reward from a name, plug-in, URL, YAML path, mapping or Reward (see the module docstring)."""
    if isinstance(spec, Reward):
        return spec
    if isinstance(spec, Mapping):
        return _from_mapping(spec, base_dir)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward: {spec!r} is not a reward spec; {_choices()}")
    spec = spec.strip()
    if spec == "math":
        return MathReward()
    if spec in ("format", "accuracy", "lmm_r1_math", "lmm_r1_sokoban"):
        return COMPONENTS[spec]()
    if spec == "lmm_r1":
        return _from_mapping({"routes": LMM_R1_ROUTES}, base_dir)
    if spec == "sokoban":
        return _Builder(None, None, base_dir).weighted("sokoban")
    if spec.startswith(("http://", "https://")):
        return RemoteReward(spec, protocol="openrlhf" if spec.rstrip("/").endswith("/get_reward") else "lmmr1")
    if spec.endswith((".yaml", ".yml")):
        return _from_yaml(spec)
    if ":" in spec:
        return _Builder(None, None, base_dir).plugin(spec)
    raise ValueError(f"unknown reward {spec!r}; {_choices()}")


def _from_yaml(path: str) -> Reward:
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"reward config {path} does not exist")
    with open(path) as f:
        spec = yaml.safe_load(f)
    if isinstance(spec, Mapping) and set(spec) == {"rewards"}:  # allow a file holding `rewards: {...}` as in configs
        spec = spec["rewards"]
    if isinstance(spec, str | list):
        spec = {"reward": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: expected a mapping (routes/weights/options, url or class_path)")
    try:
        return _from_mapping(spec, os.path.dirname(os.path.abspath(path)))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
