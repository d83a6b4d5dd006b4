"""Name -> function registries, so every estimator, KL form, loss and aggregation is chosen by name from YAML.

A registry is a plain dict with two guards: registering a name twice is an error (two plug-ins silently shadowing
each other is a bug), and looking up an unknown name raises a `ValueError` that lists the valid choices, so a typo
in a config reads as a config error rather than a bare `KeyError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class Registry(dict):
    """A dict of name -> function with a `register(name)` decorator and a helpful unknown-name error.

    >>> LOSSES = Registry("policy loss")
    >>> @LOSSES.register("zero")
    ... def zero(x): return 0 * x
    >>> LOSSES["zero"](3)
    0
    >>> LOSSES["nope"]
    Traceback (most recent call last):
    ...
    ValueError: unknown policy loss 'nope'; choose from ['zero']
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding `fn` under `name`; a second registration of the same name raises `ValueError`."""

        def deco(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice ({self[name].__qualname__} and "
                                 f"{fn.__qualname__})")
            self[name] = fn
            return fn

        return deco

    def __missing__(self, name: str):  # noqa: ANN204 - dict protocol
        raise ValueError(f"unknown {self.kind} {name!r}; choose from {sorted(self)}")


ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
"""fn(rewards (N,), response_mask (N, T), *, group_size, values, token_rewards, gamma, lam, eps) -> (adv, returns)."""
KL_ESTIMATORS = Registry("KL estimator")
"""fn(logprobs (N, T), ref_logprobs (N, T)) -> per-token KL estimate (N, T)."""
POLICY_LOSSES = Registry("policy loss")
"""fn(logprobs, old_logprobs, advantages, response_mask, *, clip_low, clip_high, dual_clip, aggregation, max_len)
-> (loss 0-dim, metrics dict of 0-dim tensors)."""
LOSS_AGGREGATIONS = Registry("loss aggregation")
"""fn(x (N, T), mask (N, T), *, max_len) -> 0-dim tensor; see `aggregation.py`."""
