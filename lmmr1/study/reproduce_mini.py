"""`make reproduce-mini`: the paper's key claim in miniature on a CPU — FRE->MGT vs direct MGT, several seeds.

    python -m lmmr1.study.reproduce_mini            # the full study (configs/reproduce_mini/study.yaml: full)
    python -m lmmr1.study.reproduce_mini --quick    # one seed, fewer steps

Arms, every one from the mini LMM whose vision tower reads numbers (configs/demo/align_vision.yaml, trained once and
exported to ~/.cache/lmmr1/models/smollm2-135m-vl-aligned; reused when present):
  base        no RL: `lmmr1 validate` on the held-out sets (greedy decoding is deterministic: one evaluation).
  direct_mgt  `lmmr1 fit` on mgt.yaml for S steps.
  fre_mgt     `lmmr1 fit` on fre.yaml for F steps (its final weights written as a Hugging Face folder), then a second
              `lmmr1 fit` on mgt.yaml for the same S steps starting from that folder.
FRE->MGT is two runs with the weights handed over between them, as the paper does: its MGT stage is then exactly the
direct_mgt run (same config, seed, prompt stream and fresh optimizer) with different starting weights, so the two arms
differ in nothing but the FRE stage. Each run validates once, at its last step (FRE's last step is the stage switch).

Each run's folder gets a `done.json` with its command and collected numbers; a rerun skips runs whose command is
unchanged, so an interrupted study continues. The study's numbers go to <out>/metrics.json, then
lmmr1.study.report turns them into <out>/report.md and figures — nothing in the report is written by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lmmr1.study.collect import collect_run
from lmmr1.study.report import write_report

CONFIGS = Path("configs/reproduce_mini")
ALIGN_CONFIG = Path("configs/demo/align_vision.yaml")
SETS = ["text", "mm_arith", "mm_word"]
"""The held-out sets of common.yaml, by name."""


def aligned_dir() -> Path:
    from lmmr1.models.mini import default_mini_dir

    base = Path(default_mini_dir())
    return base.with_name(base.name + "-aligned")


def lmmr1(*args: str, log: Path) -> float:
    """Run `python -m lmmr1 ARGS` (output to `log`); returns its wall time in seconds, raises if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as f:
        code = subprocess.call([sys.executable, "-m", "lmmr1", *args], stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"reproduce-mini: `lmmr1 {' '.join(args)}` failed (exit {code}); end of {log}:\n"
                         + "\n".join(tail))
    return time.monotonic() - start


Runner = Callable[..., float]
"""(*lmmr1 args, log=Path) -> seconds: how the study runs one `lmmr1` command (tests run them in-process)."""


def ensure_aligned(work: Path, model: Path | None = None) -> tuple[Path, float]:
    """The aligned mini model folder, trained and exported first if missing; returns (folder, seconds spent)."""
    model = model or aligned_dir()
    if (model / "config.json").is_file():
        return model, 0.0
    print(f"reproduce-mini: aligning the vision tower once ({ALIGN_CONFIG}, ~15-25 min on 2 cores) -> {model}",
          flush=True)
    root = work / "align_vision"
    seconds = lmmr1("fit", "-c", str(ALIGN_CONFIG), "--trainer.default_root_dir", str(root), log=root / "log.txt")
    partial = model.with_name(f".{model.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    seconds += lmmr1("model", "export", str(root / "checkpoints" / "last.ckpt"), str(partial),
                     log=root / "export.txt")
    partial.rename(model)
    return model, seconds


def inputs_fingerprint(args: list[str]) -> str:
    """A digest of what a command reads besides its arguments: the text of each `-c` config and the starting model's
    files (size and modification time), so an edited config or a retrained FRE stage reruns what depends on it."""
    digest = hashlib.sha256()
    for flag, value in zip(args, args[1:]):
        if flag == "-c":
            digest.update(Path(value).read_bytes())
        elif flag == "--model.policy.init_args.path":
            folder = Path(value).expanduser()
            for file in sorted(folder.glob("*")) if folder.is_dir() else []:
                stat = file.stat()
                digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def run_once(name: str, work: Path, args: list[str], run: Runner = lmmr1) -> dict[str, Any]:
    """One `lmmr1` run in work/name, skipped when done.json holds the same command and inputs; returns its numbers."""
    root = work / name
    done = root / "done.json"
    args = [*args, "--trainer.default_root_dir", str(root)]
    inputs = inputs_fingerprint(args)
    if done.is_file():
        record = json.loads(done.read_text())
        if record["args"] == args and record.get("inputs") == inputs:
            print(f"reproduce-mini: {name}: done before, reusing", flush=True)
            return record
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"reproduce-mini: {name}: lmmr1 {' '.join(args)}", flush=True)
    seconds = run(*args, log=root / "log.txt")
    record = {"args": args, "inputs": inputs, "wall_s": round(seconds, 1), "commit": _commit(),
              **collect_run(root, SETS)}
    done.write_text(json.dumps(record))
    print(f"reproduce-mini: {name}: {seconds:.0f} s, held-out accuracy {record['eval']}", flush=True)
    return record


def fit_args(stage: str, seed: int, steps: int, model: Path, extra: list[str]) -> list[str]:
    return ["fit", "-c", str(CONFIGS / "common.yaml"), "-c", str(CONFIGS / f"{stage}.yaml"), *extra,
            "--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--model.policy.init_args.path", str(model)]


def study(variant: str, work: Path, settings: dict[str, Any] | None = None, model: Path | None = None,
          extra: list[str] = (), run: Runner = lmmr1) -> dict[str, Any]:
    """Run every arm of `variant` (a section of study.yaml, or `settings`) and return the study's metrics. `model`
    replaces the aligned mini model and `extra` is added to every command (tests: a tiny model, smaller data)."""
    settings = settings or yaml.safe_load((CONFIGS / "study.yaml").read_text())[variant]
    seeds, fre_steps, mgt_steps = settings["seeds"], settings["fre_steps"], settings["mgt_steps"]
    val_batches = settings.get("val_batches")  # None: the whole held-out sets
    extra = list(extra) + ([] if val_batches is None else ["--trainer.limit_val_batches", str(val_batches)])
    start = time.monotonic()
    align_s = 0.0
    if model is None:
        model, align_s = ensure_aligned(work)
    base = run_once("base", work, ["validate", "-c", str(CONFIGS / "common.yaml"), *extra,
                                   "--model.policy.init_args.path", str(model)], run)
    runs = []
    for seed in seeds:
        direct = run_once(f"seed{seed}/direct_mgt", work, fit_args("mgt", seed, mgt_steps, model, extra), run)
        runs.append({"arm": "direct_mgt", "seed": seed, "stage": "mgt", "first_step": 0, **direct})
        fre = run_once(f"seed{seed}/fre", work, fit_args("fre", seed, fre_steps, model, extra), run)
        runs.append({"arm": "fre_mgt", "seed": seed, "stage": "fre", "first_step": 0, **fre})
        handed = work / f"seed{seed}" / "fre" / "hf" / "final"
        mgt = run_once(f"seed{seed}/fre_mgt", work, fit_args("mgt", seed, mgt_steps, handed, extra), run)
        runs.append({"arm": "fre_mgt", "seed": seed, "stage": "mgt", "first_step": fre_steps, **mgt})
    common = yaml.safe_load((CONFIGS / "common.yaml").read_text())
    limit = None if val_batches is None else val_batches * common["data"]["val_batch_size"]

    def evaluated(n: int) -> int:  # problems of a held-out set actually evaluated
        return n if limit is None else min(n, limit)

    return {
        "variant": variant,
        "settings": {"model": str(model),"seeds": seeds, "fre_steps": fre_steps, "mgt_steps": mgt_steps,
                     "held_out": {spec["name"]: {"kind": spec["make"]["kind"], "n": evaluated(spec["make"]["n"]),
                                                 "difficulty": spec["make"]["difficulty"]}
                                  for spec in common["data"]["val"]},
                     "train": {stage: [{k: spec["make"][k] for k in ("kind", "n", "difficulty")}
                                       | {"prob": spec.get("prob", 1.0)}
                                       for spec in yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())
                                       ["data"]["datasets"]] for stage in ("fre", "mgt")},
                     "batch_size": common["data"]["batch_size"], "sampling": common["model"]["sampling"],
                     "algorithm": common["model"]["algorithm"],
                     "lr": common["model"]["optimizer"]["init_args"]["lr"]},
        "base": base["eval"],
        "runs": [{k: v for k, v in run.items() if k not in ("args", "inputs")} for run in runs],
        "wall_s": {"study": round(time.monotonic() - start - align_s, 1), "alignment": round(align_s, 1),
                   "base_eval": base["wall_s"], "runs": round(base["wall_s"] + sum(r["wall_s"] for r in runs), 1)},
        "machine": {"cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "torch": _version("torch")},
        "commit": _commit(),
        "run_commits": sorted({r["commit"] for r in [base, *runs] if r.get("commit")}),  # a reused run keeps its own
    }


def _commit() -> str | None:
    """The current git commit (with "+changes" when the work tree differs from it); None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmmr1.study.reproduce_mini", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps (study.yaml: quick)")
    parser.add_argument("--out", default=None, help="report folder (default reports/reproduce-mini[-quick])")
    parser.add_argument("--work", default=None, help="run folders (default runs/reproduce-mini/<variant>)")
    parser.add_argument("--model", default=None, help="the starting model folder (default: the aligned mini model, "
                        "aligned first if missing)")
    args = parser.parse_args(argv)
    variant = "quick" if args.quick else "full"
    out = Path(args.out or ("reports/reproduce-mini" + ("-quick" if args.quick else "")))
    work = Path(args.work or f"runs/reproduce-mini/{variant}")
    metrics = study(variant, work, model=None if args.model is None else Path(args.model).expanduser())
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    written = write_report(metrics, out)
    print(f"reproduce-mini: wrote {', '.join(map(str, written))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
