"""Dynamic gradient clipping: spikes are clipped, ordinary steps are not; history survives resume; the norm hook;
and it runs inside a Lightning manual-optimization loop."""

from __future__ import annotations

import os
import socket

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lmmr1.modules.grad_clip import DynamicGradClip, sharded_grad_norm


def _params_with_grad_norm(norm: float, seed: int = 0) -> list[nn.Parameter]:
    """Two parameters whose gradients together have exactly the given global 2-norm."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5))]
    grads = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    total = torch.sqrt(sum((x**2).sum() for x in grads))
    for p, x in zip(params, grads):
        p.grad = x * norm / total
    return params


def _global_norm(params) -> float:
    return float(torch.sqrt(sum((p.grad**2).sum() for p in params)))


def _ordinary_norms(n: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (0.8 + 0.4 * torch.rand(n, generator=g)).tolist()  # uniform in [0.8, 1.2]


@pytest.mark.parametrize("clipper", [
    DynamicGradClip("adaptive", max_norm=100.0, percentile=90, history=50, warmup=10, factor=1.5),
    DynamicGradClip("zscore", max_norm=100.0, warmup=10, zscore=3.0),
], ids=["percentile90x1.5", "zscore"])
def test_spike_is_clipped_and_ordinary_steps_are_not(clipper):
    norms = _ordinary_norms(60)
    norms[30] = norms[45] = 50.0  # two synthetic spikes
    for step, norm in enumerate(norms):
        params = _params_with_grad_norm(norm, seed=step)
        before = [p.grad.clone() for p in params]
        stats = clipper(params)
        assert stats["grad_norm"].item() == pytest.approx(norm, rel=1e-5)
        if norm == 50.0:
            assert stats["grad_clipped"].item() == 1.0, step
            threshold = stats["grad_clip_threshold"].item()
            assert 1.0 < threshold < 2.0  # learned from the ordinary norms, far below the spike
            assert _global_norm(params) == pytest.approx(threshold, rel=1e-4)  # clipped to the threshold...
            cosine = sum((p.grad * b).sum() for p, b in zip(params, before)) / (threshold * norm)
            assert cosine.item() == pytest.approx(1.0, rel=1e-5)  # ...in the same direction
        else:
            assert stats["grad_clipped"].item() == 0.0, step
            assert all(torch.equal(p.grad, b) for p, b in zip(params, before)), step


def test_autoclip_defaults_trim_ordinary_steps_only_lightly():
    # factor 1 (AutoClip): ~10% of ordinary steps exceed the 90th percentile and are scaled down a little
    clipper = DynamicGradClip("adaptive", max_norm=100.0, percentile=90, history=50, warmup=10)
    norms = _ordinary_norms(60)
    norms[30] = 50.0
    scales = []
    for step, norm in enumerate(norms):
        params = _params_with_grad_norm(norm, seed=step)
        clipper(params)
        scales.append(_global_norm(params) / norm)
    assert scales[30] < 0.03  # the spike: 50 -> about 1.2
    ordinary = [s for k, s in enumerate(scales) if k != 30]
    assert min(ordinary) > 0.9 and sum(s < 1 - 1e-6 for s in ordinary) <= 12


def test_percentile_threshold_is_an_independent_quantile_of_the_history():
    clipper = DynamicGradClip("adaptive", percentile=90, history=20, warmup=5)
    norms = _ordinary_norms(35, seed=3)
    for n in norms:
        clipper(_params_with_grad_norm(n))
    expected = torch.quantile(torch.tensor(norms[-20:]), 0.9)  # only the last `history` norms count
    assert clipper.threshold().item() == pytest.approx(expected.item(), rel=1e-5)


def test_warmup_uses_max_norm():
    clipper = DynamicGradClip("adaptive", max_norm=0.5, warmup=3)
    for _ in range(3):
        params = _params_with_grad_norm(1.0)
        stats = clipper(params)
        assert stats["grad_clip_threshold"].item() == 0.5 and stats["grad_clipped"].item() == 1.0
        assert _global_norm(params) == pytest.approx(0.5, rel=1e-4)
    assert clipper(_params_with_grad_norm(1.0))["grad_clip_threshold"].item() == pytest.approx(1.0)  # history now


@pytest.mark.parametrize("norm", [0.3, 2.0])
def test_fixed_mode_matches_torch_clip_grad_norm(norm):
    params, reference = _params_with_grad_norm(norm), _params_with_grad_norm(norm)
    stats = DynamicGradClip("fixed", max_norm=1.0)(params)
    torch_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm=1.0)
    assert stats["grad_norm"].item() == pytest.approx(torch_norm.item(), rel=1e-6)
    assert stats["grad_clipped"].item() == float(norm > 1.0)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.grad, r.grad)


def test_none_mode_measures_but_never_touches_gradients():
    params = _params_with_grad_norm(1e4)
    before = [p.grad.clone() for p in params]
    stats = DynamicGradClip("none")(params)
    assert stats["grad_norm"].item() == pytest.approx(1e4, rel=1e-5) and stats["grad_clipped"].item() == 0.0
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_nonfinite_gradients_are_zeroed_and_kept_out_of_the_history():
    clipper = DynamicGradClip("adaptive", warmup=2, percentile=100)
    for n in (1.0, 2.0):
        clipper(_params_with_grad_norm(n))
    params = _params_with_grad_norm(1.0)
    params[0].grad[0, 0] = float("inf")
    stats = clipper(params)
    assert stats["grad_clipped"].item() == 1.0 and not torch.isfinite(stats["grad_norm"])
    assert all((p.grad == 0).all() for p in params)
    assert clipper.threshold().item() == pytest.approx(2.0)  # the inf did not enter the percentile


def test_history_survives_state_dict_round_trip():
    clipper = DynamicGradClip("adaptive", percentile=50, history=8, warmup=2)
    for n in _ordinary_norms(13, seed=1):
        clipper(_params_with_grad_norm(n))
    restored = DynamicGradClip("adaptive", percentile=50, history=8, warmup=2)
    restored.load_state_dict(clipper.state_dict())
    assert restored.threshold().item() == clipper.threshold().item() and restored.count == 13
    shorter = DynamicGradClip("adaptive", percentile=50, history=4, warmup=2)  # keeps the most recent norms
    shorter.load_state_dict(clipper.state_dict())
    expected = torch.quantile(torch.tensor(_ordinary_norms(13, seed=1)[-4:]), 0.5)
    assert shorter.threshold().item() == pytest.approx(expected.item(), rel=1e-6)
    z = DynamicGradClip("zscore", warmup=2)
    for n in _ordinary_norms(13, seed=1):
        z(_params_with_grad_norm(n))
    z2 = DynamicGradClip("zscore", warmup=2)
    z2.load_state_dict(z.state_dict())
    assert z2.threshold().item() == pytest.approx(z.threshold().item())


def test_global_norm_fn_hook_drives_the_decision():
    # e.g. a sharded model where this rank holds only part of the gradient: the hook reports the larger global norm
    params = _params_with_grad_norm(0.8)
    stats = DynamicGradClip("fixed", max_norm=1.0, global_norm_fn=lambda grads: torch.tensor(1.6))(params)
    assert stats["grad_norm"].item() == pytest.approx(1.6) and stats["grad_clipped"].item() == 1.0
    assert _global_norm(params) == pytest.approx(0.8 / 1.6, rel=1e-4)  # local shard scaled by the global coefficient


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match=r"grad clip mode 'auto' unknown; choose from \['none', 'fixed'"):
        DynamicGradClip("auto")
    with pytest.raises(ValueError, match="0 < percentile <= 100"):
        DynamicGradClip(percentile=0)


# ---- sharded gradients: two processes, each holding half of every gradient -------------------------------------------
def _sharded_worker(rank: int, port: int, full: list[torch.Tensor], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        shards = [nn.Parameter(torch.zeros(len(x) // 2)) for x in full]
        for p, x in zip(shards, full):
            p.grad = x.chunk(2)[rank].clone()
        stats = DynamicGradClip("fixed", max_norm=1.0, global_norm_fn=sharded_grad_norm())(shards)
        out[rank] = (stats["grad_norm"].item(), [p.grad for p in shards])
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_grad_norm_clips_partitioned_gradients_like_the_full_gradient():
    full = [torch.randn(6, generator=torch.Generator().manual_seed(0)) * 2, torch.randn(4) * 2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_sharded_worker, args=(port, full, out), nprocs=2, start_method="fork")  # fast: no re-import
        results = dict(out)
    reference = [nn.Parameter(torch.zeros_like(x)) for x in full]
    for p, x in zip(reference, full):
        p.grad = x.clone()
    total = torch.nn.utils.clip_grad_norm_(reference, max_norm=1.0)
    for rank in (0, 1):
        assert results[rank][0] == pytest.approx(total.item(), rel=1e-5)  # every rank sees the global norm
    for k, p in enumerate(reference):
        torch.testing.assert_close(torch.cat([results[0][1][k], results[1][1][k]]), p.grad)


# ---- Lightning manual optimization ---------------------------------------------------------------------------------
class _ManualModule(L.LightningModule):
    """Linear regression trained with manual optimization and two accumulated micro-batches; batch 6 is a spike."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(4, 1)
        self.grad_clip = DynamicGradClip("adaptive", max_norm=100.0, percentile=100, warmup=3, factor=1.5)
        self.stats: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            self.manual_backward(0.5 * nn.functional.mse_loss(self.layer(xs), ys))
        stats = self.grad_clip(self.parameters())
        optimizer.step()
        optimizer.zero_grad()
        self.log_dict({f"train/{k}": v for k, v in stats.items()})
        self.stats.append({k: v.item() for k, v in stats.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["grad_clip"] = self.grad_clip.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.grad_clip.load_state_dict(checkpoint["grad_clip"])


def test_works_in_a_lightning_manual_optimization_loop(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = []
    for step in range(10):
        x = torch.randn(8, 4, generator=g)
        y = x.sum(-1, keepdim=True) * (100.0 if step == 6 else 1.0)  # step 6: a spike in the targets
        batches.append((x, y))
    module = _ManualModule()
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    clipped = [s["grad_clipped"] for s in module.stats]
    assert clipped[6] == 1.0 and sum(clipped) == 1.0, module.stats
    assert module.stats[6]["grad_norm"] > 10 * module.stats[5]["grad_norm"]
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = _ManualModule()
    restored.on_load_checkpoint(torch.load(tmp_path / "last.ckpt", weights_only=False))
    assert restored.grad_clip.count == 10
    assert restored.grad_clip.threshold().item() == pytest.approx(module.grad_clip.threshold().item())
