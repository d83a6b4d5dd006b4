"""Dynamic gradient clipping: a clip threshold that follows the recent history of global gradient norms.

Why: a fixed max-norm is either too loose to stop a rare spike (one degenerate rollout, a reward bug) or so tight
that it rescales every ordinary step. LMM-R1's system advertises adaptive clipping; its public code has only a fixed
max norm, so lmmr1 implements two published rules plus the plain ones:

    none      measure and log the norm, never touch gradients
    fixed     clip to `max_norm` (torch.nn.utils.clip_grad_norm_ semantics)
    adaptive  clip to factor x the `percentile`-th percentile of the last `history` norms (AutoClip,
              arXiv:2007.14469; factor 1 is AutoClip exactly, which trims the top 100 - percentile % of steps a
              little; factor 1.5 or so leaves ordinary steps alone and catches only spikes)
    zscore    clip to mu + zscore * sigma of an EMA of the norm's mean/variance (ZClip, arXiv:2504.02507)

The adaptive modes use `max_norm` until `warmup` norms have been seen. The threshold of a step is computed from
earlier steps only, so a spike is judged against what came before it. `adaptive` records raw norms (a persistent,
legitimate rise in norms raises the threshold instead of being clipped forever); `zscore` feeds the clipped norm
to its EMA after warm-up, as ZClip does, so one spike does not inflate the statistics. A non-finite norm zeroes
the gradients (that step becomes a no-op gradient) and is kept out of the history. Everything stays on the
gradients' device: no `.item()`, so no host sync per step.

Lightning manual optimization (what `RLModule` uses): call it after the last `manual_backward` of the step and
before `optimizer.step()`:

    for micro in micro_batches: self.manual_backward(loss(micro))
    stats = self.grad_clip(p for p in self.parameters() if p.requires_grad)   # {"grad_norm", ...} to log
    optimizer.step(); optimizer.zero_grad()

Single process and DDP: DDP all-reduces gradients during backward, so every rank holds the full averaged gradient;
the local norm *is* the global norm and every rank takes the same clipping decision (the default `global_norm_fn`).

DeepSpeed ZeRO: what counts is the norm of the *whole* gradient, but gradients are partitioned across ranks (stage 2/3)
and, under Lightning's DeepSpeedStrategy, live in the ZeRO optimizer's flat buffers rather than in `param.grad`. Two
ways to plug in, both using the same history logic:
  1. Let DeepSpeed clip (it already computes the global norm as sqrt(all_reduce(sum of squared partition norms))):
     start with `gradient_clipping: <max_norm>` in the DeepSpeed config (> 0, so the engine clips at all), then each
     step set the engine optimizer's threshold from our history and record the engine's global norm afterwards:
         engine.optimizer.clip_grad = float(self.grad_clip.threshold())
         optimizer.step()
         self.grad_clip.record(torch.tensor(engine.get_global_grad_norm()))
  2. Where partitioned gradients are visible as local shards (FSDP, or a ZeRO optimizer's partition tensors), pass
     `global_norm_fn=sharded_grad_norm(group)`: it all-reduces the squared local norm, so every rank sees the same
     global norm and scales its own shard by the same coefficient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

GlobalNormFn = Callable[[list[Tensor]], Tensor]
MODES = ("none", "fixed", "adaptive", "zscore")


def local_grad_norm(grads: list[Tensor]) -> Tensor:
    """2-norm of all gradients together, computed in float32 on the first gradient's device (0 when empty)."""
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()).to(device) for g in grads]))


def sharded_grad_norm(group: Any = None) -> GlobalNormFn:
    """A `global_norm_fn` for gradients partitioned across the ranks of `group`: sqrt(all_reduce(sum ||shard||^2)).
    Every rank must call it (it is a collective); outside an initialised process group it is the local norm."""

    def norm(grads: list[Tensor]) -> Tensor:
        local = local_grad_norm(grads)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return local
        squared = local**2
        torch.distributed.all_reduce(squared, op=torch.distributed.ReduceOp.SUM, group=group)
        return squared.sqrt()

    return norm


class DynamicGradClip:
    """Measure the global gradient norm, clip in place above the current threshold, and remember the norm."""

    def __init__(self, mode: str = "adaptive", max_norm: float = 1.0, percentile: float = 90.0, history: int = 100,
                 warmup: int = 10, factor: float = 1.0, zscore: float = 2.5, ema_decay: float = 0.97,
                 global_norm_fn: GlobalNormFn | None = None) -> None:
        """
        Args:
            mode: "none" | "fixed" | "adaptive" | "zscore" (see the module docstring).
            max_norm: the threshold of "fixed", and of the adaptive modes during warm-up.
            percentile: "adaptive": which percentile (0, 100] of the recent norms is the threshold.
            history: "adaptive": how many recent norms are kept.
            warmup: adaptive modes: norms to see before the history sets the threshold.
            factor: "adaptive": multiplier on the percentile (headroom above ordinary norms).
            zscore: "zscore": threshold = EMA mean + zscore * EMA std.
            ema_decay: "zscore": EMA decay of the norm's mean and variance, in (0, 1).
            global_norm_fn: maps the list of gradients to the global 2-norm (default: local norm, right for one
                process and DDP; see `sharded_grad_norm` for partitioned gradients).
        """
        if mode not in MODES:
            raise ValueError(f"grad clip mode {mode!r} unknown; choose from {list(MODES)}")
        if max_norm <= 0 or not 0 < percentile <= 100 or history < 1 or warmup < 0 or factor <= 0 or zscore <= 0 \
                or not 0 < ema_decay < 1:
            raise ValueError(f"grad clip needs max_norm > 0, 0 < percentile <= 100, history >= 1, warmup >= 0, "
                             f"factor > 0, zscore > 0, 0 < ema_decay < 1; got max_norm={max_norm}, "
                             f"percentile={percentile}, history={history}, warmup={warmup}, factor={factor}, "
                             f"zscore={zscore}, ema_decay={ema_decay}")
        self.mode, self.max_norm, self.percentile, self.history = mode, float(max_norm), float(percentile), history
        self.warmup, self.factor, self.zscore, self.ema_decay = warmup, float(factor), float(zscore), float(ema_decay)
        self.global_norm_fn = global_norm_fn or local_grad_norm
        self.count = 0  # norms recorded so far (Python int: decides warm-up without a device sync)
        self._norms = torch.full((history,), float("nan"))  # ring buffer, NaN = empty or non-finite
        self._mean = torch.zeros(())
        self._var = torch.zeros(())

    # ---- threshold and history ----------------------------------------------------------------------------------
    def threshold(self, device: torch.device | str | None = None) -> Tensor:
        """The clip threshold for the next step, from the norms recorded so far. 0-dim float32 tensor."""
        device = device or self._norms.device
        if self.mode == "none":
            return torch.tensor(float("inf"), device=device)
        fallback = torch.tensor(self.max_norm, device=device)
        if self.mode == "fixed" or self.count < max(self.warmup, 1):
            return fallback
        if self.mode == "adaptive":
            value = self.factor * torch.nanquantile(self._norms, self.percentile / 100.0).to(device)
        else:
            value = (self._mean + self.zscore * self._var.clamp(min=0).sqrt()).to(device)
        return torch.where(torch.isfinite(value) & (value > 0), value, fallback)  # all-NaN history: stay safe

    def record(self, norm: Tensor | float, threshold: Tensor | float | None = None) -> None:
        """Add one global norm to the history (`threshold`: the one it was clipped at, used by "zscore").
        Public so an engine that clips itself (DeepSpeed) can feed its own global norm in."""
        norm = torch.as_tensor(norm, dtype=torch.float32).detach()
        if self._norms.device != norm.device:
            self._norms, self._mean, self._var = (t.to(norm.device) for t in (self._norms, self._mean, self._var))
        finite = torch.isfinite(norm)
        self._norms[self.count % self.history] = torch.where(finite, norm, float("nan"))
        if self.mode == "zscore":
            # raw norms through warm-up (the threshold there is only the max_norm fallback), clipped ones after
            seen = float("inf") if threshold is None or self.count < self.warmup else threshold
            x = torch.minimum(norm, torch.as_tensor(seen, dtype=torch.float32, device=norm.device))
            # Welford running mean/variance through warm-up, then an EMA (ZClip, arXiv:2504.02507 sec. 3).
            decay = 1.0 - 1.0 / (self.count + 1) if self.count < self.warmup else self.ema_decay
            delta = x - self._mean
            mean = self._mean + (1.0 - decay) * delta
            var = decay * (self._var + (1.0 - decay) * delta**2)
            self._mean = torch.where(finite, mean, self._mean)
            self._var = torch.where(finite, var, self._var)
        self.count += 1

    # ---- one step ----------------------------------------------------------------------------------------------
    def __call__(self, parameters: Iterable[Tensor] | Iterable[nn.Parameter]) -> dict[str, Tensor]:
        """Compute the global grad norm, clip in place if above the current threshold, record the norm in history.
        Returns {"grad_norm", "grad_clip_threshold", "grad_clipped"} as 0-dim tensors (clipped is 0. or 1.)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = self.global_norm_fn(grads).to(torch.float32)
        threshold = self.threshold(norm.device)
        finite = torch.isfinite(norm)
        clipped = (norm > threshold) | ~finite
        if self.mode != "none":
            coef = torch.where(finite, (threshold / (norm + 1e-6)).clamp(max=1.0), 0.0)
            for g in grads:  # coef 0 for a non-finite norm; nan_to_num_ then clears the inf * 0 = NaN entries
                g.mul_(coef.to(device=g.device, dtype=g.dtype)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if self.mode == "none":
            clipped = torch.zeros_like(clipped)
        self.record(norm, threshold)
        return {"grad_norm": norm.detach(), "grad_clip_threshold": threshold, "grad_clipped": clipped.float()}

    # ---- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """History and statistics as plain Python values (saved in the Lightning checkpoint)."""
        return {"mode": self.mode, "count": self.count, "norms": self._norms.cpu().tolist(),
                "mean": float(self._mean), "var": float(self._var)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history; a checkpoint from a different `history` length keeps its most recent norms."""
        old = torch.tensor(state["norms"], dtype=torch.float32)
        count = int(state["count"])
        # unroll the old ring buffer oldest -> newest, then refill ours in order
        ordered = torch.cat([old[count % len(old):], old[: count % len(old)]]) if count >= len(old) else old[:count]
        ordered = ordered[-self.history:]
        self._norms = torch.full((self.history,), float("nan"))
        self.count = count
        start = count - len(ordered)
        for i, value in enumerate(ordered.tolist()):
            self._norms[(start + i) % self.history] = value
        self._mean, self._var = torch.tensor(float(state["mean"])), torch.tensor(float(state["var"]))
