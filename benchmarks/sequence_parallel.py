"""Does sequence parallelism shrink what one process holds? One packed row of L tokens through the mini LMM's training
forward and backward (log-probs + entropy of every response token, gradient checkpointing on), with the row whole in
one process (SP 1) and split over 2 processes (SP 2), each configuration a fresh torchrun launch, printed side by side:
peak RSS per process, the part of it above the warmed-up model (activations, attention, communication buffers), and
as ratios SP 2 / SP 1; then what each extra 1k tokens adds to it between consecutive lengths (the part that grows
with the row, which sequence parallelism splits), and the longest measured row whose peak stays under a per-process
memory cap.

    .venv/bin/python benchmarks/sequence_parallel.py                          # L = 2048 4096 8192, cap 3 GB
    .venv/bin/python benchmarks/sequence_parallel.py --lengths 1024 2048 --cap-gb 2.5 --dtype float32

The row holds `--sequences` packed sequences of L / sequences tokens, each half prompt and half response. Every
process gets OMP_NUM_THREADS = CPUs // processes. The peak is VmHWM of each process (the largest over the
ranks is printed) over the measured step only (the count restarts there), the baseline its RSS before that step,
after a short warm-up step that allocates the gradient buffers and the kernels' caches (oneDNN packs bf16 weights
on first use: a few hundred MB that do not grow with the row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: the peak since the last reset) in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    """Restart the peak-RSS count here (Linux clear_refs 5), so loading the model does not set the peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(args: argparse.Namespace) -> None:
    """One rank: load the model, run one training forward/backward on the packed row, report memory and time."""
    import torch
    import torch.distributed as dist

    from lmmr1.distributed.sequence_parallel import init_sequence_parallel
    from lmmr1.modules.policy import Policy

    dist.init_process_group("gloo")
    size = dist.get_world_size()
    init_sequence_parallel(size)
    policy = Policy(args.model, dtype=args.dtype, packing=True, gradient_checkpointing=True,
                    sequence_parallel_size=size, logprob_chunk=args.logprob_chunk)
    gen = torch.Generator().manual_seed(0)

    def step(length: int) -> None:
        input_ids = torch.randint(100, 40000, (args.sequences, length // args.sequences), generator=gen)
        logprobs, entropy = policy.logprobs(input_ids, torch.ones_like(input_ids), length // args.sequences // 2)
        (logprobs.sum() + entropy.sum()).backward()

    step(64 * args.sequences)  # warm-up: gradient buffers and the kernels' caches (bf16 weight packing) exist now
    baseline = _status_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    step(args.length)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    report = [None] * size
    dist.all_gather_object(report, {"peak_mb": peak, "baseline_mb": baseline, "seconds": seconds})
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(report), flush=True)
    dist.destroy_process_group()


def launch(args: argparse.Namespace, length: int, processes: int) -> dict[str, float]:
    port = 29500 + (os.getpid() + length + processes) % 2000
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}",
           __file__, "--worker", "--length", str(length), "--model", args.model, "--dtype", args.dtype,
           "--sequences", str(args.sequences), "--logprob-chunk", str(args.logprob_chunk)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, CPUS // processes)), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr or result.stdout)[-300:].strip().splitlines()[-1]}
    ranks = json.loads(lines[-1].removeprefix("RESULT "))
    return {"peak_mb": max(r["peak_mb"] for r in ranks),
            "above_model_mb": max(r["peak_mb"] - r["baseline_mb"] for r in ranks),
            "seconds": max(r["seconds"] for r in ranks)}


def main() -> None:
    from lmmr1.models.mini import default_mini_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=str(default_mini_dir()))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--length", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--sequences", type=int, default=4, help="packed sequences in the row")
    parser.add_argument("--logprob-chunk", type=int, default=32,
                        help="response positions per row per LM-head chunk (small: the vocabulary-wide logits of one "
                             "chunk are a constant that would hide how activations grow with the row)")
    parser.add_argument("--cap-gb", type=float, default=3.0, help="per-process memory cap for the longest-row line")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"{args.model}: no model; run `lmmr1 model prepare-mini` first")
    print(f"mini LMM ({args.dtype}), one packed row of {args.sequences} sequences, gradient checkpointing, LM-head "
          f"chunks of {args.logprob_chunk} positions per row, {CPUS} CPUs; per process:")
    header = f"{'tokens':>7} | {'SP1 peak':>9} {'SP2 peak':>9} {'ratio':>6} | {'SP1 >model':>10} {'SP2 >model':>10} " \
             f"{'ratio':>6} | {'SP1 s':>6} {'SP2 s':>6}"
    print(header)
    print("-" * len(header))
    results: dict[int, dict[int, dict[str, float]]] = {}
    for length in args.lengths:
        results[length] = {k: launch(args, length, k) for k in (1, 2)}
        one, two = results[length][1], results[length][2]
        if "error" in one or "error" in two:
            print(f"{length:>7} | failed: {one.get('error') or two.get('error')}")
            continue
        print(f"{length:>7} | {one['peak_mb']:>7.0f}MB {two['peak_mb']:>7.0f}MB {two['peak_mb'] / one['peak_mb']:>6.2f}"
              f" | {one['above_model_mb']:>8.0f}MB {two['above_model_mb']:>8.0f}MB "
              f"{two['above_model_mb'] / one['above_model_mb']:>6.2f} | {one['seconds']:>6.1f} {two['seconds']:>6.1f}",
              flush=True)
    measured = [n for n in args.lengths if all("error" not in results[n][k] for k in (1, 2))]
    for short, long in zip(measured, measured[1:]):  # what each extra token costs: the part that grows with the row
        grow = {k: (results[long][k]["above_model_mb"] - results[short][k]["above_model_mb"]) / (long - short) * 1024
                for k in (1, 2)}
        print(f"growth {short}->{long} tokens, MB per 1k tokens: SP1 {grow[1]:.0f}, SP2 {grow[2]:.0f}, "
              f"ratio {grow[2] / grow[1]:.2f}" if grow[1] > 0 else f"growth {short}->{long}: none measured")
    cap = args.cap_gb * 1024
    for k in (1, 2):
        fits = [n for n in args.lengths if results[n][k].get("peak_mb", float("inf")) <= cap]
        print(f"longest measured row under {args.cap_gb:g} GB per process, SP {k}: {max(fits) if fits else 'none'}")


if __name__ == "__main__":
    main()
