"""A SIGTERM that reaches only one of two training processes stops both, after the same step, with one checkpoint.

`trainer.save_checkpoint` is collective (a barrier under DDP; a broadcast plus every rank's shard under DeepSpeed), so a
rank that stopped on its own signal would leave the other rank waiting in its next step's collectives forever. These
tests run the real CLI on 2 CPU processes, signal rank 1 only (the process Lightning's launcher starts as a child of
rank 0, with LOCAL_RANK=1), and require a clean exit of both processes within a hard timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

LMMR1 = Path(sys.executable).parent / "lmmr1"
SMOKE = Path(__file__).parents[1] / "configs" / "demo" / "smoke.yaml"
MAX_STEPS = 50
START_TIMEOUT_S = 120  # until the first logged training step (start-up of 2 processes on a busy 2-core machine)
STOP_TIMEOUT_S = 120  # from the signal until both processes have exited; a hang ends here as a failure


def _command(tiny_vl_path: Path, strategy: str) -> list[str]:
    logger = ("[{class_path: lightning.pytorch.loggers.CSVLogger, "
              "init_args: {save_dir: run, name: csv, flush_logs_every_n_steps: 1}}]")
    return [str(LMMR1), "fit", "-c", str(SMOKE), "--trainer.devices", "2", "--trainer.strategy", strategy,
            "--trainer.max_steps", str(MAX_STEPS), "--trainer.default_root_dir", "run",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.logger", logger,
            # the smoke config's ModelCheckpoint/SampleTable are dropped: GracefulStop alone writes run/checkpoints/
            "--trainer.callbacks", "[lmmr1.callbacks.graceful_stop.GracefulStop]",
            "--model.policy.init_args.path", str(tiny_vl_path),
            "--data.datasets", "[{path: data/arith/data.jsonl, make: {kind: arith, n: 64, seed: 0}}]"]


def _wait_for(what: str, check, deadline: float, proc: subprocess.Popen, log: Path):  # noqa: ANN001, ANN202
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"training exited (rc {proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within the deadline:\n{_tail(log)}")


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no output)"


def _rank1(rank0: psutil.Process) -> psutil.Process | None:
    for child in rank0.children():
        try:
            if child.environ().get("LOCAL_RANK") == "1":
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _first_step_logged(root: Path) -> bool:
    return any("train/" in p.read_text(errors="replace") for p in root.glob("run/csv/version_*/metrics.csv"))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)  # the session this test started: rank 0, rank 1 and their workers
    except ProcessLookupError:
        pass


def _signal_rank1_and_wait(tmp_path: Path, tiny_vl_path: Path, strategy: str) -> tuple[Path, str, float]:
    """Runs 2-process training, SIGTERMs rank 1 once the first step is logged; returns (checkpoint, log, stop secs)."""
    log = tmp_path / "output.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(_command(tiny_vl_path, strategy), cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        rank0 = psutil.Process(proc.pid)
        rank1 = _wait_for("rank-1 process", lambda: _rank1(rank0), deadline, proc, log)
        _wait_for("logged training step", lambda: _first_step_logged(tmp_path), deadline, proc, log)
        os.kill(rank1.pid, signal.SIGTERM)  # rank 1 only: rank 0 never sees a signal
        signalled = time.monotonic()
        try:
            returncode = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait(timeout=30)
            pytest.fail(f"rank 0 did not stop within {STOP_TIMEOUT_S} s of SIGTERM to rank 1 (hang):\n{_tail(log)}")
        try:
            rank1.wait(timeout=30)
        except psutil.TimeoutExpired:
            pytest.fail(f"rank 0 exited but rank 1 (pid {rank1.pid}) is still running:\n{_tail(log)}")
        stopped = time.monotonic() - signalled
        assert returncode == 0, _tail(log)
        assert not rank0.is_running() and not rank1.is_running()  # both processes gone
    finally:
        _kill_group(proc.pid)  # nothing is left on success; on any failure, nothing we started outlives the test
        if proc.poll() is None:
            proc.wait(timeout=30)
    return tmp_path / "run" / "checkpoints" / "last.ckpt", log.read_text(errors="replace"), stopped


@pytest.mark.slow
def test_sigterm_to_rank1_only_stops_both_ddp_ranks_with_a_checkpoint(tiny_vl_path, tmp_path):
    checkpoint, output, stopped = _signal_rank1_and_wait(tmp_path, tiny_vl_path, "ddp")
    print(f"ddp: both ranks stopped {stopped:.1f} s after the signal")
    assert checkpoint.is_file(), output[-4000:]
    step = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    assert 1 <= step < MAX_STEPS
    assert f"after step {step}" in output
    assert "SIGTERM on rank 1 (stop agreed across 2 ranks)" in output


@pytest.mark.slow
def test_sigterm_to_rank1_only_stops_both_deepspeed_ranks_with_a_checkpoint_folder(tiny_vl_path, tmp_path):
    checkpoint, output, stopped = _signal_rank1_and_wait(tmp_path, tiny_vl_path, "deepspeed_stage_2")
    print(f"deepspeed_stage_2: both ranks stopped {stopped:.1f} s after the signal")
    assert (checkpoint / "latest").is_file(), output[-4000:]  # a DeepSpeed folder, not a file
    tag = (checkpoint / "latest").read_text().strip()
    shards = sorted(p.name for p in (checkpoint / tag).glob("*zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2, shards  # both ranks wrote their ZeRO-2 optimizer shard
    states = torch.load(checkpoint / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    step = states["global_step"]
    assert 1 <= step < MAX_STEPS
    assert f"after step {step}" in output
    assert "SIGTERM on rank 1 (stop agreed across 2 ranks)" in output
