"""Does scale-out pay on CPU? The same RL training (same config, same global batch) on 1 process and on 2 CPU
processes (gloo) under DDP, DeepSpeed ZeRO-2 and ZeRO-3, each run a fresh `lmmr1 fit` subprocess, printed side by
side: samples/s, the bytes of parameters and optimizer state each process holds, and each process's peak RSS, as
ratios to the 1-process run.

    .venv/bin/python benchmarks/scaling.py                    # tiny random VL model (models/tiny-vl), 4 steps each
    .venv/bin/python benchmarks/scaling.py --model mini       # the embedded mini LMM (configs/demo/mini_arith.yaml)
    .venv/bin/python benchmarks/scaling.py --runs 1 ddp       # a subset of: 1, 1x1t, ddp, zero2, zero3
    .venv/bin/python benchmarks/scaling.py -- --model.sampling.n 8    # more `lmmr1 fit` options for every run

Every process gets OMP_NUM_THREADS = CPUs // processes (Lightning's own rule for its 2 ranks, set explicitly for the
1-process run too), so each run uses the whole machine; `1x1t` is one process on one thread, to tell data-parallel
scaling apart from intra-op threading (which on a shared, busy machine can be far slower than one thread).

samples/s = data.batch_size x sampling.n per step over the median `train/step_time` (metrics.csv) of the steps after
the first (the median: other jobs on a shared machine make single steps spike; every step time is printed too).
`train/step_time` is the slowest rank's `training_step` (rollout, scoring, forward/backward, optimizer step); start-up,
data loading and checkpointing are outside it. Memory comes from `MemoryReport` (below), a callback every rank runs at
the end of training: `ru_maxrss` of the process, parameter bytes held by the process (ZeRO-3: its `ds_tensor`
partitions) and optimizer bytes (the torch optimizer's state plus DeepSpeed's fp32 master partitions, each address
range counted once: views of one flat buffer and aliases of parameters are not counted again).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
RUNS = {  # name -> (processes, strategy, torch threads per process; None: CPUS // processes, Lightning's own rule)
    "1": (1, "auto", None),
    "1x1t": (1, "auto", 1),  # one process on one core: scale-out measured apart from intra-op threading
    "ddp": (2, "ddp", None),
    "zero2": (2, "deepspeed_stage_2", None),
    "zero3": (2, "deepspeed_stage_3", None),
}
MODELS = {  # name -> (config, default steps)
    "tiny": ("configs/demo/smoke.yaml", 4),
    "mini": ("configs/demo/mini_arith.yaml", 3),
}


# ---- the callback every rank runs (imported by the `lmmr1 fit` subprocesses as benchmarks.scaling.MemoryReport) ----
def _tensor_bytes(tensors: Any, counted: list[tuple[int, int]]) -> int:
    """Bytes of `tensors` not already in `counted` (address ranges; views of one buffer and aliases count once)."""
    total = 0
    for t in tensors:
        if t is None or not hasattr(t, "data_ptr") or t.numel() == 0:
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        touching = [(s, e) for s, e in counted if s < end and e > start]  # `counted` stays disjoint
        total += end - start - sum(min(end, e) - max(start, s) for s, e in touching)
        for interval in touching:
            counted.remove(interval)
        counted.append((min([start] + [s for s, _ in touching]), max([end] + [e for _, e in touching])))
    return total


def memory_report(trainer: Any, module: Any) -> dict[str, Any]:
    """This process's rank, peak RSS and the bytes of parameters and optimizer state it holds."""
    import torch

    seen: list[tuple[int, int]] = []
    params = list({id(p): p for p in module.parameters()}.values())
    held = [getattr(p, "ds_tensor", p) for p in params]  # ZeRO-3: the local partition; p itself is an empty shell
    trainable = [getattr(p, "ds_tensor", p) for p in params if p.requires_grad]
    param_bytes = _tensor_bytes(held, seen)
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    optimizer = engine.optimizer if engine is not None else trainer.optimizers[0]
    inner = getattr(optimizer, "optimizer", None)  # the torch optimizer inside a ZeRO optimizer
    torch_optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
    state = [t for s in torch_optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    master = [t for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
              for t in getattr(optimizer, name, None) or []]
    master_bytes = _tensor_bytes(master, seen)
    state_bytes = _tensor_bytes(state, seen)
    return {
        "rank": trainer.global_rank,
        "world": trainer.world_size,
        "threads": torch.get_num_threads(),
        "optimizer": type(optimizer).__name__,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "param_bytes": param_bytes,
        "trainable_param_bytes": sum(t.numel() * t.element_size() for t in trainable),
        "full_param_count": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "master_bytes": master_bytes,
        "optimizer_state_bytes": state_bytes,
    }


class MemoryReport(Callback):
    """Writes `<default_root_dir>/memory/rank<r>.json` (see `memory_report`) when training ends, on every rank."""

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        report = memory_report(trainer, pl_module)
        out = Path(trainer.default_root_dir) / "memory"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{report['rank']}.json").write_text(json.dumps(report, indent=1))


# ---- the driver -------------------------------------------------------------------------------------------------
def cheap_overrides(run_dir: Path, steps: int) -> dict[str, Any]:
    """Trainer settings that keep each run small and inside `run_dir`: no validation, no checkpoints, CSV only."""
    return {"trainer": {
        "max_steps": steps, "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(run_dir),
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(run_dir), "name": "csv"}},
        "callbacks": [{"class_path": "benchmarks.scaling.MemoryReport"}],
    }}


def lmmr1() -> str:
    script = Path(sys.executable).parent / "lmmr1"
    return str(script) if script.exists() else (shutil.which("lmmr1") or "lmmr1")


def run_one(name: str, config: str, run_dir: Path, steps: int, timeout: float, extra: list[str]) -> dict[str, Any]:
    """One `lmmr1 fit` subprocess (its own process group, killed whole on timeout); step times and memory reports."""
    processes, strategy, threads = RUNS[name]
    threads = threads or max(1, CPUS // processes)
    run_dir.mkdir(parents=True)
    overrides = run_dir / "overrides.json"  # JSON is YAML: a second -c replaces the trainer's logger and callbacks
    overrides.write_text(json.dumps(cheap_overrides(run_dir, steps), indent=1))
    cmd = [lmmr1(), "fit", "-c", config, "-c", str(overrides), "--trainer.devices", str(processes),
           "--trainer.strategy", strategy, *extra]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # benchmarks.scaling importable
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}  # explicit, also for the 1-process run
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    log = run_dir / "log.txt"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # rank 1 and the reward workers live in this process group
            proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - start
    result: dict[str, Any] = {"name": name, "processes": processes, "strategy": strategy, "threads": threads,
                              "wall": wall, "rc": rc}
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"{name}: failed ({rc}) after {wall:.0f} s, see {log}\n  " + "\n  ".join(tail), file=sys.stderr)
        return result
    metrics = sorted(run_dir.glob("csv/version_*/metrics.csv"))[-1]
    with metrics.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/step_time")]
    result["step_times"] = [float(r["train/step_time"]) for r in sorted(rows, key=lambda r: int(r["step"]))]
    result["samples_per_step"] = float(rows[0]["train/samples"])
    result["ranks"] = [json.loads(p.read_text()) for p in sorted((run_dir / "memory").glob("rank*.json"))]
    return result


def mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (tiny 4, mini 3); the first is "
                        "not timed")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run (tiny 300, mini 1800)")
    parser.add_argument("--out", default=None, help="run directory (default: a new temporary one, kept)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `lmmr1 fit` options for every run")
    args = parser.parse_args()
    config, default_steps = MODELS[args.model]
    steps = args.steps or default_steps
    if steps < 2:
        parser.error("--steps must be >= 2 (the first step is not timed)")
    timeout = args.timeout or (300 if args.model == "tiny" else 1800)
    extra = [a for a in args.extra if a != "--"]

    if args.model == "tiny":
        if not (ROOT / "models/tiny-vl/config.json").exists():
            subprocess.run([lmmr1(), "model", "tiny", "--out", "models/tiny-vl"], cwd=ROOT, check=True)
    else:
        subprocess.run([lmmr1(), "model", "prepare-mini", "--if-missing"], cwd=ROOT, check=True)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lmmr1-scaling-"))
    print(f"runs under {root}; model {args.model} ({config}), {steps} steps per run, "
          f"{CPUS} CPUs", flush=True)

    start = time.perf_counter()
    results = {}
    for name in args.runs:
        results[name] = r = run_one(name, config, root / name, steps, timeout, extra)
        print(f"  {name}: {'ok' if r['rc'] == 0 else r['rc']} in {r['wall']:.0f} s", flush=True)
    total = time.perf_counter() - start

    done = {k: r for k, r in results.items() if r["rc"] == 0}
    if not done:
        sys.exit("no run finished")
    for r in done.values():
        timed = r["step_times"][1:]
        r["step_s"] = statistics.median(timed)  # other jobs on a shared machine make single steps spike
        r["samples_s"] = r["samples_per_step"] / r["step_s"]
        r["held"] = max(k["param_bytes"] + k["master_bytes"] + k["optimizer_state_bytes"] for k in r["ranks"])
        r["rss"] = max(k["peak_rss"] for k in r["ranks"])
    base = done.get("1") or next(iter(done.values()))
    samples = int(base["samples_per_step"])
    print(f"\n{samples} samples per step (global: data.batch_size x sampling.n, the same for every run); samples/s "
          f"from the median metrics.csv train/step_time of steps 2..{steps} (slowest rank's training_step; start-up "
          "excluded)")
    print("memory per process, max over ranks; params + optimizer = parameters held + fp32 master partitions + "
          f"optimizer state; ratios vs run '{base['name']}'\n")
    head = (f"{'run':6s} {'procs':>5s} {'thr':>3s} {'strategy':18s} {'s/step':>7s} {'samples/s':>9s} {'ratio':>6s} "
            f"{'params MB':>9s} {'master MB':>9s} {'opt MB':>7s} {'sum MB':>7s} {'ratio':>6s} "
            f"{'peak RSS MB':>11s} {'ratio':>6s} {'wall s':>6s}")
    print(head)
    print("-" * len(head))
    for r in done.values():
        worst = max(r["ranks"], key=lambda k: k["param_bytes"] + k["master_bytes"] + k["optimizer_state_bytes"])
        print(f"{r['name']:6s} {r['processes']:5d} {r['threads']:3d} {r['strategy']:18s} {r['step_s']:7.2f} "
              f"{r['samples_s']:9.2f} {r['samples_s'] / base['samples_s']:5.2f}x {mb(worst['param_bytes']):>9s} "
              f"{mb(worst['master_bytes']):>9s} {mb(worst['optimizer_state_bytes']):>7s} {mb(r['held']):>7s} "
              f"{r['held'] / base['held']:5.2f}x {mb(r['rss']):>11s} {r['rss'] / base['rss']:5.2f}x "
              f"{r['wall']:6.0f}")
    single = done.get("1x1t")
    if single and base is not single:
        print(f"\nsamples/s vs one process on one thread ({single['samples_s']:.2f}/s): " + ", ".join(
            f"{r['name']} {r['samples_s'] / single['samples_s']:.2f}x" for r in done.values() if r is not single))
    print("\nper rank:")
    for r in done.values():
        for k in r["ranks"]:
            print(f"  {r['name']:6s} rank {k['rank']}/{k['world']}: {k['threads']} torch threads, {k['optimizer']}, "
                  f"params {mb(k['param_bytes'])} MB (trainable {mb(k['trainable_param_bytes'])} MB of "
                  f"{k['full_param_count'] / 1e6:.2f} M parameters in the module), master {mb(k['master_bytes'])} MB, "
                  f"optimizer state {mb(k['optimizer_state_bytes'])} MB, peak RSS {mb(k['peak_rss'])} MB")
        print(f"  {r['name']:6s} step times (s): " + ", ".join(f"{t:.2f}" for t in r["step_times"]))
    for name, r in results.items():
        if r["rc"] != 0:
            print(f"  {name}: failed ({r['rc']}), log {root / name / 'log.txt'}")
    print(f"\ntotal {total:.0f} s for {len(results)} runs")


if __name__ == "__main__":
    main()
