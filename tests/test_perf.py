"""Guards for the speed-ups: step-phase timing, the LM-head log-prob path, bf16 numerics and fp32 master weights.

Speed itself is measured by benchmarks/vs_trl.py, not timed here; these tests check what the fast paths compute.
"""

from __future__ import annotations

from tests.test_fit_e2e import _fit


def test_every_step_logs_the_seconds_of_each_phase(tiny_vl_path, mixed_rows, tmp_path):
    _, _, trainer = _fit(tiny_vl_path, mixed_rows, tmp_path, kl={"coef": 1e-3})
    seconds = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
    assert set(seconds) == {f"perf/{p}_s" for p in ("generate", "reward", "old_logprob", "ref", "train")}
    # every phase ran in this configuration (reference on, old log-probs recomputed), so each took some time
    assert all(s > 0 for s in seconds.values()), seconds
