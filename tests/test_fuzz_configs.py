"""Fuzzing config validation (hypothesis): `AlgorithmConfig` and its groups, `SamplingConfig`, `EvalConfig`, the
data module's datasets/stages, and reward configs, each built from random values (NaN, infinities, negatives, huge
numbers, unknown names and keys).

Each test holds an independent model of the documented domain of every field (from the field docs and error
messages) and asserts exactly that: a value outside it raises ValueError naming that field's flag, a config inside it
is accepted, and an accepted config works where it is used (the policy loss is finite, the gradient clipper and KL
controller build, a weighted reward's weights are finite numbers).
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lmmr1.data.datamodule import DatasetSpec, PromptDataModule, Stage
from lmmr1.modules.algorithm_config import (
    FLAG,
    AlgorithmConfig,
    DynamicSamplingConfig,
    GradClipConfig,
    KLConfig,
    LossConfig,
    OverlongConfig,
)
from lmmr1.modules.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    build_kl_controller,
)
from lmmr1.modules.evaluation import EvalConfig
from lmmr1.modules.grad_clip import MODES
from lmmr1.rewards import build_reward
from lmmr1.rewards.composite import WeightedSum
from lmmr1.rollout.base import SamplingConfig

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

any_float = st.floats() | st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-9, 2.0, 100.0, 1e300])
any_int = st.integers(-3, 10**5) | st.sampled_from([0, 1, -1, 2])


def names(valid) -> st.SearchStrategy[str]:  # noqa: ANN001 - a registry or tuple of names
    return st.sampled_from(sorted(valid)) | st.text(max_size=5)


def finite(x: float) -> bool:
    return isinstance(x, int) or math.isfinite(x)


def _raises_naming(flags: set[str], build) -> BaseException | None:  # noqa: ANN001
    """Call build(); when `flags` is non-empty it must raise ValueError starting with one of them."""
    try:
        result = build()
    except ValueError as e:
        assert flags, f"rejected a valid config: {e}"
        assert any(str(e).startswith(f"{flag}:") or str(e).startswith(f"{flag} ") for flag in flags), (str(e), flags)
        return e
    assert not flags, f"accepted a config with bad {sorted(flags)}"
    return result


# ---- AlgorithmConfig -------------------------------------------------------------------------------------------------
GROUPS = {"kl": KLConfig, "loss": LossConfig, "grad_clip": GradClipConfig, "dynamic_sampling": DynamicSamplingConfig,
          "overlong": OverlongConfig}
VALUES = {  # field -> strategy of random values of its declared type
    "advantage": names(ADVANTAGE_ESTIMATORS), "gamma": any_float, "lam": any_float, "entropy_coef": any_float,
    "value_clip": st.none() | any_float, "ppo_epochs": any_int, "train_batch_size": st.none() | any_int,
    "shuffle": st.booleans(), "micro_batch_size": any_int, "micro_batch_tokens": st.none() | any_int,
    "tis_cap": st.none() | any_float, "recompute_old_logprobs": st.booleans(),
    "kl.estimator": names(KL_ESTIMATORS), "kl.coef": any_float, "kl.placement": names(("loss", "reward")),
    "kl.target": st.none() | any_float, "kl.horizon": any_int,
    "loss.name": names(POLICY_LOSSES), "loss.clip_low": any_float, "loss.clip_high": any_float,
    "loss.dual_clip": st.none() | any_float, "loss.aggregation": names(LOSS_AGGREGATIONS),
    "loss.max_len": st.none() | any_int,
    "grad_clip.mode": names(MODES), "grad_clip.max_norm": any_float, "grad_clip.percentile": any_float,
    "grad_clip.history": any_int, "grad_clip.warmup": any_int, "grad_clip.factor": any_float,
    "grad_clip.zscore": any_float, "grad_clip.ema_decay": any_float,
    "dynamic_sampling.enabled": st.booleans(), "dynamic_sampling.max_extra_rounds": any_int,
    "overlong.buffer": any_int, "overlong.factor": any_float, "overlong.mask_truncated": st.booleans(),
}


def _in_domain(name: str, v) -> bool:  # noqa: ANN001
    """The documented domain of each field (its docstring and its error message)."""
    pos, nonneg = lambda x: finite(x) and x > 0, lambda x: finite(x) and x >= 0  # noqa: E731
    rules = {
        "advantage": lambda x: x in ADVANTAGE_ESTIMATORS, "gamma": lambda x: finite(x) and 0 <= x <= 1,
        "lam": lambda x: finite(x) and 0 <= x <= 1, "entropy_coef": nonneg,
        "value_clip": lambda x: x is None or pos(x), "ppo_epochs": lambda x: x >= 1,
        "train_batch_size": lambda x: x is None or x >= 1, "micro_batch_size": lambda x: x >= 1,
        "micro_batch_tokens": lambda x: x is None or x >= 1, "tis_cap": lambda x: x is None or (finite(x) and x >= 1),
        "kl.estimator": lambda x: x in KL_ESTIMATORS, "kl.coef": nonneg, "kl.placement": lambda x: x in ("loss",
                                                                                                       "reward"),
        "kl.target": lambda x: x is None or pos(x), "kl.horizon": lambda x: x > 0,
        "loss.name": lambda x: x in POLICY_LOSSES, "loss.clip_low": lambda x: finite(x) and 0 <= x < 1,
        "loss.clip_high": nonneg, "loss.dual_clip": lambda x: x is None or (finite(x) and x > 1),
        "loss.aggregation": lambda x: x in LOSS_AGGREGATIONS, "loss.max_len": lambda x: x is None or x > 0,
        "grad_clip.mode": lambda x: x in MODES, "grad_clip.max_norm": pos,
        "grad_clip.percentile": lambda x: finite(x) and 0 < x <= 100, "grad_clip.history": lambda x: x >= 1,
        "grad_clip.warmup": lambda x: x >= 0, "grad_clip.factor": pos, "grad_clip.zscore": pos,
        "grad_clip.ema_decay": lambda x: finite(x) and 0 < x < 1, "dynamic_sampling.max_extra_rounds": lambda x: x >= 0,
        "overlong.buffer": lambda x: x >= 0, "overlong.factor": nonneg,
    }
    return rules.get(name, lambda x: True)(v)


def _expected_problems(values: dict, unknown: dict) -> set[str]:
    """Flags a config with these values must be rejected for (empty: it must be accepted, cross-group rules aside)."""
    bad = {f"{FLAG}.{name}" for name, v in values.items() if not _in_domain(name, v)}
    bad |= {f"{FLAG}.{group}" for group in unknown}
    get = lambda name: values.get(name, _default(name))  # noqa: E731
    # rules within one group (documented in the same places)
    if get("kl.target") is not None and _in_domain("kl.target", get("kl.target")) and get("kl.coef") == 0:
        bad.add(f"{FLAG}.kl.coef")  # an adaptive target needs a coefficient it can scale
    if get("loss.aggregation") == "seq-mean-token-sum-norm" and get("loss.max_len") is None:
        bad.add(f"{FLAG}.loss.max_len")
    if not bad and get("advantage") == "dr_grpo" and get("loss.aggregation") != "seq-mean-token-sum-norm":
        bad.add(f"{FLAG}.loss.aggregation")  # Dr. GRPO removes both normalisations
    return bad


def _default(name: str):  # noqa: ANN202
    group, _, field_name = name.rpartition(".")
    cls = GROUPS[group] if group else AlgorithmConfig
    (f,) = [f for f in fields(cls) if f.name == field_name]
    return f.default


# Combinations the RL module rejects because they would silently do nothing (issue 14, section 1); accepted here as
# the only reasons to reject a config whose fields are each in their domain.
CROSS_GROUP = {f"{FLAG}.loss.aggregation", f"{FLAG}.kl.placement", f"{FLAG}.tis_cap"}


@st.composite
def algorithm_values(draw: st.DrawFn) -> tuple[dict, dict]:
    """(field -> value for a random subset of fields, group -> unknown keys added to that group's dict)."""
    chosen = draw(st.sets(st.sampled_from(sorted(VALUES)), max_size=8))
    values = {name: draw(VALUES[name]) for name in sorted(chosen)}
    unknown = {}
    if draw(st.integers(0, 9)) == 0:
        unknown[draw(st.sampled_from(sorted(GROUPS)))] = {draw(st.sampled_from(["coeff", "clip", "Mode", "_flag"])): 1}
    return values, unknown


def _build(values: dict, unknown: dict) -> AlgorithmConfig:
    top = {k: v for k, v in values.items() if "." not in k}
    for group in GROUPS:
        nested = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(group + ".")}
        if nested or group in unknown:
            top[group] = {**nested, **unknown.get(group, {})}  # nested groups as dicts, as YAML layers hand them over
    return AlgorithmConfig(**top)


@settings(FUZZ, max_examples=400)
@given(algorithm_values())
@example(({"kl.coef": math.inf}, {}))  # an infinite coefficient made every loss inf/NaN
@example(({"entropy_coef": math.inf}, {}))
@example(({"overlong.factor": math.inf}, {}))  # -inf * 0 = NaN reward for every response below the ramp
@example(({"loss.clip_high": math.nan}, {}))
@example(({}, {"kl": {"coeff": 1}}))  # a typo in a nested YAML group raised TypeError from KLConfig.__init__
def test_algorithm_config_accepts_exactly_its_documented_domain(case):
    values, unknown = case
    bad = _expected_problems(values, unknown)
    try:
        cfg = _build(values, unknown)
    except ValueError as e:
        message = str(e)
        assert any(message.startswith(f"{flag}:") for flag in bad | (CROSS_GROUP if not bad else set())), \
            (message, bad)
        if not bad:
            event(f"cross-group rule: {message.split(':')[0]}")
        return
    assert not bad, f"accepted {values} {unknown} with bad {sorted(bad)}"
    _use(cfg)


def _use(cfg: AlgorithmConfig) -> None:
    """An accepted config works where the module uses it."""
    assert all(isinstance(getattr(cfg, g), cls) for g, cls in GROUPS.items())
    torch.manual_seed(0)
    logprobs = -torch.rand(3, 5) * 4
    old = logprobs + 0.3 * torch.randn(3, 5)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    loss, metrics = POLICY_LOSSES[cfg.loss.name](logprobs, old, torch.randn(3), mask, **cfg.loss.kwargs())
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in metrics.values())
    clip = cfg.grad_clip.build()  # the clipper's own checks agree with the config's
    assert clip.threshold() > 0
    controller = build_kl_controller(cfg.kl)
    assert math.isfinite(controller.coef) and controller.coef == cfg.kl.coef
    for group_size, has_critic in ((1, False), (4, True)):
        try:
            cfg.check(has_critic=has_critic, group_size=group_size, max_new_tokens=64)
        except ValueError as e:
            assert str(e).startswith(f"{FLAG}."), str(e)


# ---- SamplingConfig / EvalConfig -------------------------------------------------------------------------------------
SAMPLING = "--model.sampling"


def _sampling_problems(v: dict, documented: bool) -> set[str]:
    bad = set()
    if v["n"] < 1:
        bad.add(f"{SAMPLING}.n")
    if not v["temperature"] >= 0 or (documented and math.isinf(v["temperature"])):
        bad.add(f"{SAMPLING}.temperature")
    if v["max_new_tokens"] < 1:
        bad.add(f"{SAMPLING}.max_new_tokens")
    if documented:
        if not (finite(v["top_p"]) and 0 < v["top_p"] <= 1):
            bad.add(f"{SAMPLING}.top_p")
        if v["top_k"] < 0:
            bad.add(f"{SAMPLING}.top_k")
        if any(not s for s in v["stop"]):
            bad.add(f"{SAMPLING}.stop")
    return bad


sampling_values = st.fixed_dictionaries({
    "n": any_int, "temperature": any_float, "top_p": any_float, "top_k": any_int, "max_new_tokens": any_int,
    "stop": st.lists(st.text(max_size=3), max_size=2), "seed": st.integers(-2**40, 2**40)})


@settings(FUZZ, max_examples=200)
@given(st.fixed_dictionaries({
    "n": any_int, "temperature": any_float.filter(lambda t: not math.isnan(t)), "top_p": st.floats(0, 1).filter(bool),
    "top_k": st.integers(0, 100), "max_new_tokens": any_int, "stop": st.lists(st.text(min_size=1, max_size=3),
                                                                             max_size=2)}))
def test_sampling_config_checks_n_temperature_and_length(values):
    _raises_naming(_sampling_problems(values, documented=False), lambda: SamplingConfig(**values))


@settings(FUZZ, max_examples=200)
@given(sampling_values)
@example({"n": 4, "temperature": math.nan, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8, "stop": [], "seed": 0})
@example({"n": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8, "stop": [""], "seed": 0})
def test_sampling_config_accepts_exactly_its_documented_domain(values):
    _raises_naming(_sampling_problems(values, documented=True), lambda: SamplingConfig(**values))


@settings(FUZZ, max_examples=200)
@given(any_int, any_float, st.lists(any_int, max_size=3))
@example(1, math.nan, [1])  # NaN / negative sampling temperature for validation was accepted
@example(1, -1.0, [1])
def test_eval_config_accepts_exactly_its_documented_domain(n, temperature, k):
    flag = "--model.evaluation"
    bad = {f"{flag}.n"} if n < 1 else set()
    bad |= set() if finite(temperature) and temperature >= 0 else {f"{flag}.temperature"}
    bad |= {f"{flag}.k"} if any(not 1 <= x <= n for x in k) else set()
    _raises_naming(bad, lambda: EvalConfig(n=n, temperature=temperature, k=k))


# ---- data module: datasets, stages, sizes ----------------------------------------------------------------------------
paths = st.sampled_from(["data/a.jsonl", "b.parquet", "", "  "])
specs = st.builds(DatasetSpec, path=paths, prob=any_float)


@st.composite
def data_args(draw: st.DrawFn) -> dict:
    args = {}
    if draw(st.booleans()):
        args["datasets"] = draw(st.lists(specs, max_size=3))
    if draw(st.booleans()) or "datasets" not in args:
        args["stages"] = draw(st.lists(st.builds(Stage, name=st.sampled_from(["fre", "mgt"]),
                                                 datasets=st.lists(specs, max_size=2),
                                                 steps=st.none() | any_int), max_size=3))
    for name in ("batch_size", "val_batch_size", "anneal_steps", "num_workers", "min_pixels", "max_pixels"):
        if draw(st.booleans()):
            args[name] = draw(any_int)
    if draw(st.booleans()):
        args["val"] = draw(st.lists(specs, max_size=2))
    if draw(st.integers(0, 9)) == 0:
        args["on_bad_row"] = draw(st.sampled_from(["skip", "ignore"]))
    return args


def _data_problems(args: dict) -> set[str]:
    if bool(args.get("datasets")) == bool(args.get("stages")):
        return {"give exactly one of --data.datasets and --data.stages"}
    bad = set()
    stages = args.get("stages") or [Stage("train", args["datasets"])]
    for i, stage in enumerate(stages):
        flag = f"--data.stages[{i}]" if args.get("stages") else "--data"
        if not stage.datasets:
            bad.add(flag)
        if stage.steps is None and i < len(stages) - 1:
            bad.add(flag)
        if stage.steps is not None and stage.steps < 1:
            bad.add(f"{flag}.steps")
        for j, spec in enumerate(stage.datasets):
            if not spec.path.strip():
                bad.add(f"{flag}.datasets[{j}].path")
            if not (finite(spec.prob) and spec.prob >= 0):
                bad.add(f"{flag}.datasets[{j}].prob")
        if stage.datasets and all(finite(s.prob) and s.prob >= 0 for s in stage.datasets) \
                and sum(s.prob for s in stage.datasets) == 0:
            bad.add(f"{flag}.datasets")
    for j, spec in enumerate(args.get("val") or []):
        if not spec.path.strip():
            bad.add(f"--data.val[{j}].path")
        if not (finite(spec.prob) and spec.prob >= 0):
            bad.add(f"--data.val[{j}].prob")
    for name, least in (("batch_size", 1), ("val_batch_size", 1), ("anneal_steps", 0), ("num_workers", 0),
                        ("min_pixels", 1)):
        if args.get(name, least) < least:
            bad.add(f"--data.{name}")
    if args.get("max_pixels", 16384 * 28 * 28) < args.get("min_pixels", 4 * 28 * 28):
        bad.add("--data.max_pixels")
    if args.get("on_bad_row", "error") not in ("error", "skip"):
        bad.add("--data.on_bad_row")
    return bad


@settings(FUZZ, max_examples=200)
@given(data_args())
@example({"datasets": [DatasetSpec("a.jsonl", prob=-1.0)]})  # a negative weight skewed random.choices silently
@example({"datasets": [DatasetSpec("a.jsonl", prob=math.nan)]})  # failed only when the stream started
@example({"datasets": [DatasetSpec("a.jsonl")], "batch_size": 0})  # ZeroDivisionError in the sampler
@example({"stages": [Stage("fre", [DatasetSpec("a.jsonl")], steps=-5), Stage("mgt", [DatasetSpec("b.jsonl")])]})
def test_data_module_accepts_exactly_its_documented_domain(args):
    bad = _data_problems(args)
    if bad == {"give exactly one of --data.datasets and --data.stages"}:
        with pytest.raises(ValueError, match="give exactly one of"):
            PromptDataModule(**args)
        return
    _raises_naming(bad, lambda: PromptDataModule(**args))


# ---- reward configs --------------------------------------------------------------------------------------------------
reward_names = st.sampled_from(["format", "accuracy", "math", "sokoban", "solved", "nope", "", "no_such_module:fn",
                                "missing_file.py:fn"])
reward_lists = reward_names | st.lists(reward_names | st.integers(0, 3), max_size=3) | st.integers(0, 3) | st.none()
weights = st.dictionaries(st.sampled_from(["format", "accuracy", "solved", "other"]), any_float | st.text(max_size=3),
                          max_size=3) | st.lists(any_float, max_size=2) | st.text(max_size=3)
options = st.dictionaries(st.sampled_from(["format", "accuracy", "solved", "math"]),
                          st.dictionaries(st.sampled_from(["timeout", "noop_penalty", "think_tag", "boxes_weight",
                                                           "bogus"]), any_float | st.text(max_size=3), max_size=2)
                          | st.integers(), max_size=2) | st.lists(st.integers(), max_size=2)


@settings(FUZZ, max_examples=300)
@given(st.fixed_dictionaries({}, optional={"reward": reward_lists, "weights": weights, "options": options,
                                           "routes": st.dictionaries(st.sampled_from(["geo*", "*", "sokoban"]),
                                                                     reward_lists, max_size=2) | st.integers(),
                                           "key": st.sampled_from(["datasource", "kind"]), "bogus": st.integers()}))
@example({"reward": "math", "weights": {"format": math.nan}})  # a NaN weight made every total NaN
@example({"reward": "math", "weights": [0.5, 1.0]})  # weights as a list: TypeError from dict()
@example({"reward": 3})  # a reward that is not a name or list: TypeError from list()
@example({"reward": "sokoban", "options": {"solved": {"noop_penalty": math.inf}}})  # -inf totals
@example({"reward": "math", "options": {"accuracy": {"timeout": math.nan}}})  # NaN per-item timeout never fires
@example({"reward": "math", "weights": {"fromat": 0.2}})  # a misspelt weight was silently ignored
def test_reward_config_builds_or_names_the_problem(spec):
    try:
        reward = build_reward(spec)
    except ValueError as e:  # names the key or reward it is about
        assert any(word in str(e) for word in ("weights", "options", "reward", "routes", "plug-in")), str(e)
        return
    members = reward.routes.values() if hasattr(reward, "routes") else [reward]
    for member in members:  # every total is then a finite weighted sum of components in [0, 1]
        assert isinstance(member, WeightedSum) and all(math.isfinite(w) for w in member.weights), member.weights
        for component in member.rewards:
            for attr in ("boxes_weight", "move_cost", "noop_penalty"):
                assert math.isfinite(getattr(component, attr, 0.0)), (component, attr)
            assert 0 < getattr(component, "timeout", 1.0) < math.inf
    assert set(spec.get("weights") or {}) <= {n for m in members for n in ("format", "accuracy", "solved")
                                              if any(r.name == {"solved": "sokoban"}.get(n, n) for r in m.rewards)}
    reward.close()
