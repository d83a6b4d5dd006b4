"""Policy/value losses and aggregation modes vs reference loops; clipping gradients; micro-batch invariance."""

from __future__ import annotations

import math

import pytest
import torch

from lmmr1.modules.algorithms import POLICY_LOSSES, aggregate, loss_units, micro_batch_share, value_loss

GARBAGE = 1e6
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
MAX_LEN = 11


def _batch(seed: int, N: int = 8, T: int = 6, empty_row: bool = True):
    """Random log-probs near the old ones (so every clip region occurs), per-token advantages, a right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).float()
    if empty_row:
        mask[1] = 0
    old = -torch.rand(N, T, generator=g) * 3
    logprobs = old + 0.4 * torch.randn(N, T, generator=g)
    advantages = torch.randn(N, T, generator=g)
    pad = ~mask.bool()
    return (logprobs.masked_fill(pad, GARBAGE), old.masked_fill(pad, -GARBAGE), advantages.masked_fill(pad, GARBAGE),
            mask)


# ---- references: loops over rows and tokens, 0-dim torch scalars so autograd gives the reference gradient ----------
def _reference_aggregate(rows: list[list], mode: str):
    """rows: per row, the list of its valid per-token terms."""
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / max(n, 1)
    per_row = []
    for r in rows:
        if mode == "seq-mean-token-mean":
            per_row.append(sum(r) / len(r) if r else 0.0)
        elif mode == "seq-mean-token-sum":
            per_row.append(sum(r))
        else:
            per_row.append(sum(r) / MAX_LEN)
    return sum(per_row) / len(rows)


def _ppo_token(lp, olp, a, clip_low, clip_high, dual_clip):
    ratio = torch.exp(lp - olp)
    clipped_ratio = min(max(ratio, 1 - clip_low), 1 + clip_high)  # a float (no grad) when clipped
    loss = max(-a * ratio, -a * clipped_ratio)
    if dual_clip is not None and a < 0:
        loss = min(loss, -a * dual_clip)
    return loss


def _reference_ppo(logprobs, old, adv, mask, mode, clip_low, clip_high, dual_clip):
    rows = [[_ppo_token(logprobs[i, t], float(old[i, t]), float(adv[i, t]), clip_low, clip_high, dual_clip)
             for t in range(mask.shape[1]) if mask[i, t]] for i in range(mask.shape[0])]
    return _reference_aggregate(rows, mode)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip_low,clip_high,dual_clip", [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 1.5)])
def test_ppo_value_and_gradient_match_reference(seed, mode, clip_low, clip_high, dual_clip):
    logprobs, old, adv, mask = _batch(seed)
    logprobs.requires_grad_(True)
    loss, metrics = POLICY_LOSSES["ppo"](logprobs, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                                         dual_clip=dual_clip, aggregation=mode, max_len=MAX_LEN)
    (grad,) = torch.autograd.grad(loss, logprobs)
    ref_lp = logprobs.detach().clone().requires_grad_(True)
    ref = _reference_ppo(ref_lp, old, adv, mask, mode, clip_low, clip_high, dual_clip)
    (ref_grad,) = torch.autograd.grad(ref, ref_lp)
    torch.testing.assert_close(loss, ref.to(loss.dtype))
    torch.testing.assert_close(grad, ref_grad)
    assert (grad[~mask.bool()] == 0).all()
    assert 0 < metrics["clip_frac"] < 1  # this batch has both clipped and unclipped tokens


def test_ppo_padding_never_changes_any_result():
    logprobs, old, adv, mask = _batch(3)
    pad = ~mask.bool()
    outs = []
    for garbage in (GARBAGE, 0.0, float("nan")):
        lp = logprobs.masked_fill(pad, garbage).requires_grad_(True)
        loss, metrics = POLICY_LOSSES["ppo"](lp, old.masked_fill(pad, -garbage), adv.masked_fill(pad, garbage), mask,
                                             dual_clip=3.0)
        outs.append((loss, torch.autograd.grad(loss, lp)[0], metrics))
    for loss, grad, metrics in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])
        assert all(torch.equal(metrics[k], outs[0][2][k]) for k in metrics)


def test_gradient_is_zero_exactly_where_a_clipped_branch_is_active():
    # clip_low 0.2, clip_high 0.28, dual clip 3: one token per region, advantage +-1
    ratios = torch.tensor([1.5, 1.25, 0.7, 1.0, 0.7, 0.9, 1.5, 5.0])
    advs = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    clipped = torch.tensor([
        True,   # A > 0, ratio > 1.28: upper clip (PPO would not push it further up)
        False,  # A > 0, ratio 1.25: inside clip-higher's range [0.8, 1.28] (a symmetric 0.2 clip would stop it)
        False,  # A > 0, ratio < 0.8: the unclipped term is the pessimistic one, gradient flows
        False,  # ratio 1: on-policy
        True,   # A < 0, ratio < 0.8: lower clip
        False,  # A < 0, ratio 0.9: inside
        False,  # A < 0, ratio 1.5 > 1.28 but < 3: unclipped (pessimistic), gradient flows
        True,   # A < 0, ratio 5 > dual clip 3: the loss is capped at 3 |A|, no gradient
    ])
    old = torch.full((1, 8), -1.0)
    logprobs = (old + ratios.log()).requires_grad_(True)
    mask = torch.ones(1, 8)
    loss, metrics = POLICY_LOSSES["ppo"](logprobs, old, advs.unsqueeze(0), mask, clip_low=0.2, clip_high=0.28,
                                         dual_clip=3.0)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert (grad[0, clipped] == 0).all()
    assert (grad[0, ~clipped] != 0).all()
    # unclipped tokens: d/dlogp of -A * ratio / 8 tokens = -A * ratio / 8
    torch.testing.assert_close(grad[0, ~clipped], (-advs * ratios / 8)[~clipped])
    assert metrics["clip_frac"] == pytest.approx(3 / 8)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 8) and metrics["clip_frac_low"] == pytest.approx(1 / 8)
    assert metrics["dual_clip_frac"] == pytest.approx(1 / 8)
    # without clip-higher, the ratio-1.25 token is clipped too
    _, symmetric = POLICY_LOSSES["ppo"](logprobs, old, advs.unsqueeze(0), mask, clip_low=0.2, clip_high=0.2)
    assert symmetric["clip_frac"] == pytest.approx(3 / 8)  # tokens 0, 1, 4 (no dual clip now: token 7 flows)


def test_ppo_approx_kl_is_k3_of_the_ratio():
    logprobs, old, adv, mask = _batch(4, empty_row=False)
    _, metrics = POLICY_LOSSES["ppo"](logprobs, old, adv, mask)
    terms = [math.exp(float(logprobs[i, t] - old[i, t])) - 1 - float(logprobs[i, t] - old[i, t])
             for i in range(8) for t in range(6) if mask[i, t]]
    assert metrics["approx_kl"] == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert set(metrics) >= {"clip_frac", "approx_kl"} and all(v.dim() == 0 for v in metrics.values())


def _reference_gspo(logprobs, old, seq_adv, mask, clip_low, clip_high):
    """Sequence-level GSPO objective (arXiv:2507.18071 eq. 5-7): one ratio and one clip per sequence."""
    losses = []
    for i in range(mask.shape[0]):
        pos = [t for t in range(mask.shape[1]) if mask[i, t]]
        s = torch.exp(sum(logprobs[i, t] - old[i, t] for t in pos) / len(pos))
        a = float(seq_adv[i])
        losses.append(max(-a * s, -a * min(max(s, 1 - clip_low), 1 + clip_high)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_equals_sequence_level_objective(seed):
    logprobs, old, _, mask = _batch(seed, empty_row=False)
    seq_adv = torch.randn(8, generator=torch.Generator().manual_seed(seed))
    lp = logprobs.requires_grad_(True)
    # clip 0.05: with these ratios some sequences fall outside the range, some inside
    loss, metrics = POLICY_LOSSES["gspo"](lp, old, seq_adv.unsqueeze(-1).expand(8, 6), mask, clip_low=0.05,
                                          clip_high=0.05, aggregation="seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss, lp)
    ref_lp = logprobs.detach().clone().requires_grad_(True)
    ref = _reference_gspo(ref_lp, old, seq_adv, mask, 0.05, 0.05)
    (ref_grad,) = torch.autograd.grad(ref, ref_lp)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert 0 < metrics["clip_frac"] < 1


def _reference_value(values, old, returns, mask, clip, mode):
    rows = []
    for i in range(mask.shape[0]):
        row = []
        for t in range(mask.shape[1]):
            if mask[i, t]:
                v, vo, r = values[i, t], float(old[i, t]), float(returns[i, t])
                v_clip = vo + min(max(v - vo, -clip), clip)
                row.append(0.5 * max((v - r) ** 2, (v_clip - r) ** 2))
        rows.append(row)
    return _reference_aggregate(rows, mode)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_value_loss_matches_reference(seed, mode):
    values, old, returns, mask = _batch(seed)
    values.requires_grad_(True)
    loss, metrics = value_loss(values, old, returns, mask, clip=0.2, aggregation=mode, max_len=MAX_LEN)
    (grad,) = torch.autograd.grad(loss, values)
    ref_v = values.detach().clone().requires_grad_(True)
    ref = _reference_value(ref_v, old, returns, mask, 0.2, mode)
    (ref_grad,) = torch.autograd.grad(ref, ref_v)
    torch.testing.assert_close(loss, ref.to(loss.dtype))
    torch.testing.assert_close(grad, ref_grad)
    assert 0 < metrics["value_clip_frac"] < 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_aggregate_matches_reference_and_ignores_padding(mode, seed):
    x, _, _, mask = _batch(seed)  # padding of x holds 1e6
    rows = [[float(x[i, t]) for t in range(6) if mask[i, t]] for i in range(8)]
    got = aggregate(x, mask, mode, max_len=MAX_LEN)
    assert got.item() == pytest.approx(_reference_aggregate(rows, mode), rel=1e-6)
    assert torch.equal(got, aggregate(x.masked_fill(~mask.bool(), float("inf")), mask, mode, max_len=MAX_LEN))


def test_aggregate_errors():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="needs a positive max_len"):
        aggregate(x, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"unknown loss aggregation 'mean'; choose from \['seq-mean-token-mean'"):
        aggregate(x, mask, "mean")


# ---- micro-batch invariance ---------------------------------------------------------------------------------------
def _grads(mode, micro_size, weighting):
    """Gradient of the PPO loss w.r.t. the log-probs: the full batch, or accumulated over micro-batches of `micro_size`
    rows weighted by `weighting` ("equal": plain average of the micro losses; "share": micro_batch_share)."""
    logprobs, old, adv, mask = _batch(7, N=8, T=6, empty_row=False)
    lp = logprobs.requires_grad_(True)
    kwargs = dict(clip_low=0.2, clip_high=0.28, aggregation=mode, max_len=MAX_LEN)
    if micro_size is None:
        POLICY_LOSSES["ppo"](lp, old, adv, mask, **kwargs)[0].backward()
        return lp.grad
    n_micro = 8 // micro_size
    for k in range(n_micro):
        rows = slice(k * micro_size, (k + 1) * micro_size)
        loss, _ = POLICY_LOSSES["ppo"](lp[rows], old[rows], adv[rows], mask[rows], **kwargs)
        weight = 1 / n_micro if weighting == "equal" else micro_batch_share(mask[rows], loss_units(mask, mode), mode)
        (loss * weight).backward()
    return lp.grad


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("micro_size", [1, 2, 4])
def test_seq_mean_modes_are_micro_batch_invariant_under_plain_averaging(mode, micro_size):
    torch.testing.assert_close(_grads(mode, micro_size, "equal"), _grads(mode, None, None))


def test_token_mean_is_not_micro_batch_invariant_under_plain_averaging():
    # micro-batches hold different numbers of valid tokens, so averaging their token-means re-weights tokens
    assert not torch.allclose(_grads("token-mean", 2, "equal"), _grads("token-mean", None, None), atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("micro_size", [1, 2, 4])
def test_micro_batch_share_makes_every_mode_invariant(mode, micro_size):
    torch.testing.assert_close(_grads(mode, micro_size, "share"), _grads(mode, None, None))


def test_loss_argument_errors():
    logprobs, old, adv, mask = _batch(0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        POLICY_LOSSES["ppo"](logprobs, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="need 0 <= clip_low < 1"):
        POLICY_LOSSES["gspo"](logprobs, old, adv, mask, clip_low=1.5)
