"""lmmr1 against TRL's GRPOTrainer on identical work, side by side in one run: seconds per step, completion tokens/s
and peak RSS, with ratios, and lmmr1's step phases (perf/*_s).

The work (issue 16): SmolLM2-135M-Instruct (the weights the mini LMM carries, saved here as a plain Llama causal-LM
folder, built locally from the mini model: nothing is downloaded), 8 two-digit additions x 4 samples, <= 64 new tokens,
temperature 1 (no top-k/top-p), GRPO with KL 0.04 (k3, in the loss, against a reference model), clip 0.2/0.28,
token-mean loss, one optimizer step per rollout (AdamW, lr 1e-6, no weight decay, grad-norm clip 1.0), the same
rule reward (lmmr1's `math`: format 0.5 + accuracy 1.0) on both sides. Each configuration runs in its own process
(so peak RSS is its own), in alternating order; s/step is the median of steps 2..N (step 1 warms up). "cpu s/step"
is the process's CPU time per step (all threads; reward workers excluded), which says less about contention from
other work on a shared machine than wall time does; the load average is printed with the results.

    pip install -c constraints.txt -e ".[bench]"          # adds TRL (benchmark-only extra)
    .venv/bin/python benchmarks/vs_trl.py                  # trl-fp32, lmmr1-fp32, trl-bf16, lmmr1-bf16; 4 steps each
    .venv/bin/python benchmarks/vs_trl.py --configs trl-fp32,lmmr1-bf16 --steps 6 --rounds 2
    .venv/bin/python benchmarks/vs_trl.py --configs lmmr1-bf16 --lmmr1-options '{"policy": {"share_prompts": false}}'

Dtypes: TRL's bf16 is its own (`bf16=True`: fp32 weights under autocast); lmmr1's bf16 is `policy.dtype: bfloat16`
(bf16 weights, fp32 master weights in the optimizer, log-probs and loss in fp32). lmmr1 packs each micro-batch with
shared prompts (`packing`, `share_prompts`), as its CPU configs do; `--lmmr1-options` overrides that.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SYSTEM = ("You are a helpful assistant. Think briefly inside <think> </think> tags, then give only the final number "
          "inside <answer> </answer> tags.")
FEW_SHOT = [{"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "<think>3 plus 4 is 7.</think><answer>7</answer>"}]
CONFIGS = ("trl-fp32", "lmmr1-fp32", "trl-bf16", "lmmr1-bf16")
PHASES = ("generate", "reward", "old_logprob", "ref", "train")
LLAMA_NAME = "smollm2-135m-llama"


def problems(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n two-digit additions (question, answer)."""
    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    return [(f"What is {a} + {b}?", str(a + b)) for a, b in pairs]


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, *FEW_SHOT, {"role": "user", "content": question}]


def llama_folder(out: Path) -> Path:
    """The mini LMM's language model as a LlamaForCausalLM folder (SmolLM2's own architecture; the Qwen2.5-VL copy's
    q/k/v biases are zero and its mrope sections compute plain RoPE for text), built once from the local mini model."""
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from lmmr1.models.mini import ensure_mini

    mini = ensure_mini()
    vl = json.loads((mini / "config.json").read_text())
    tc = vl["text_config"]
    config = LlamaConfig(vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"],
                         intermediate_size=tc["intermediate_size"], num_hidden_layers=tc["num_hidden_layers"],
                         num_attention_heads=tc["num_attention_heads"], num_key_value_heads=tc["num_key_value_heads"],
                         max_position_embeddings=tc["max_position_embeddings"], rms_norm_eps=tc["rms_norm_eps"],
                         rope_parameters={"rope_type": "default", "rope_theta": tc["rope_parameters"]["rope_theta"]},
                         tie_word_embeddings=vl["tie_word_embeddings"], bos_token_id=tc["bos_token_id"],
                         eos_token_id=tc["eos_token_id"], pad_token_id=tc["pad_token_id"], hidden_act=tc["hidden_act"])
    weights = load_file(mini / "model.safetensors")
    state = {}
    for name, tensor in weights.items():
        if name.startswith("visual."):
            continue
        if name.endswith("_proj.bias"):  # the Qwen copy's zero q/k/v biases; Llama has none
            assert not tensor.any(), f"{name} is not zero"
            continue
        state[name.replace("model.language_model.", "model.")] = tensor
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(mini).save_pretrained(out)
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_lmmr1(model_dir: str, dtype: str, steps: int, args: argparse.Namespace, options: dict) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from lmmr1.data.processor import PromptProcessor
    from lmmr1.modules.algorithm_config import AlgorithmConfig
    from lmmr1.modules.policy import Policy
    from lmmr1.modules.rl_module import RLModule
    from lmmr1.rollout.base import SamplingConfig

    rows = [{"message": messages(q), "answer": a} for q, a in problems(args.prompts)]
    batch = PromptProcessor(model_dir)(rows)
    rollout_rows = args.prompts * args.samples
    algorithm = {"kl": {"estimator": "k3", "coef": 0.04, "placement": "loss"},
                 "loss": {"name": "ppo", "clip_low": 0.2, "clip_high": 0.28, "aggregation": "token-mean"},
                 "micro_batch_size": rollout_rows, "recompute_old_logprobs": False,
                 "grad_clip": {"mode": "fixed", "max_norm": 1.0}, **options.get("algorithm", {})}
    policy = {"packing": True, "share_prompts": True, **options.get("policy", {})}  # the CPU configs' layout
    module = RLModule(policy=Policy(model_dir, dtype=dtype, **policy), reward="math",
                      sampling=SamplingConfig(n=args.samples, temperature=1.0, top_k=0, top_p=1.0,
                                              max_new_tokens=args.new_tokens),
                      algorithm=AlgorithmConfig(**algorithm),
                      optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-6, weight_decay=0.0))

    class Steps(L.Callback):
        def __init__(self) -> None:
            self.ends, self.cpu, self.logs = [], [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.logs.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    steps_cb = Steps()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[steps_cb])
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    times = [b - a for a, b in zip([start] + steps_cb.ends, steps_cb.ends)]
    cpu_times = [b - a for a, b in zip([cpu] + steps_cb.cpu, steps_cb.cpu)]
    tokens = [log["rollout/response_len_mean"] * rollout_rows for log in steps_cb.logs]
    return {"step_s": times, "cpu_s": cpu_times, "tokens": tokens, "peak_rss_gb": peak_rss_gb(),
            "phases": [{p: log.get(f"perf/{p}_s", float("nan")) for p in PHASES} for log in steps_cb.logs],
            "reward": [log.get("train/reward/total", float("nan")) for log in steps_cb.logs],
            "logprob_gap": [log.get("rollout/logprob_gap", float("nan")) for log in steps_cb.logs]}


def run_trl(model_dir: str, dtype: str, steps: int, args: argparse.Namespace, options: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lmmr1.rewards import build_reward

    reward = build_reward("math")

    def math_reward(completions, answer, **kwargs) -> list[float]:  # noqa: ANN001, ANN003
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return list(reward(texts, [{"answer": a} for a in answer]).total)

    class Steps(TrainerCallback):
        def __init__(self) -> None:
            self.ends, self.cpu, self.logs = [], [], []

        def on_step_end(self, *a, **k) -> None:  # noqa: ANN002, ANN003
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_log(self, _args, state, control, logs=None, **k) -> None:  # noqa: ANN001, ANN003
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    data = Dataset.from_list([{"prompt": messages(q), "answer": a} for q, a in problems(args.prompts)])
    rollout_rows = args.prompts * args.samples
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=dtype == "bfloat16", max_steps=steps, learning_rate=1e-6,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=rollout_rows,
            gradient_accumulation_steps=1, num_generations=args.samples, max_completion_length=args.new_tokens,
            temperature=1.0, top_k=0, top_p=1.0, beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
            num_iterations=1, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
            seed=0, disable_tqdm=True, model_init_kwargs={"dtype": torch.float32}, **options)
        steps_cb = Steps()
        trainer = GRPOTrainer(model=model_dir, reward_funcs=[math_reward], args=config, train_dataset=data,
                              processing_class=AutoTokenizer.from_pretrained(model_dir, padding_side="left"),
                              callbacks=[steps_cb])
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
    reward.close()
    times = [b - a for a, b in zip([start] + steps_cb.ends, steps_cb.ends)]
    cpu_times = [b - a for a, b in zip([cpu] + steps_cb.cpu, steps_cb.cpu)]
    tokens = [log["completions/mean_length"] * rollout_rows for log in steps_cb.logs]
    return {"step_s": times, "cpu_s": cpu_times, "tokens": tokens, "peak_rss_gb": peak_rss_gb(),
            "reward": [log.get("reward", float("nan")) for log in steps_cb.logs]}


def child(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    side, precision = name.split("-")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    options = json.loads(args.lmmr1_options if side == "lmmr1" else args.trl_options)
    run = run_lmmr1 if side == "lmmr1" else run_trl
    return run(str(args.model_dir), dtype, args.steps, args, options)


def summary(result: dict) -> dict:
    """Median s/step and tokens/s over steps 2..N (all steps when there is only one)."""
    times, tokens = result["step_s"], result["tokens"]
    later = slice(1, None) if len(times) > 1 else slice(None)
    step_s = statistics.median(times[later])
    per_token = [t / max(n, 1) for t, n in zip(times[later], tokens[later])]
    out = {"step_s": step_s, "cpu_s": statistics.median(result["cpu_s"][later]),
           "tokens_per_s": 1 / statistics.median(per_token),
           "tokens_per_step": statistics.mean(tokens[later]), "peak_rss_gb": result["peak_rss_gb"]}
    if "phases" in result:
        out["phases"] = {p: statistics.median(ph[p] for ph in result["phases"][later]) for p in PHASES}
    return out


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=4, help="RL steps per configuration (median over steps 2..N)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the alternation this many times")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help=f"the Llama folder (default: $LMMR1_HOME/models/{LLAMA_NAME}, built if missing)")
    parser.add_argument("--lmmr1-options", default="{}", help='JSON: {"policy": {...}, "algorithm": {...}} overrides')
    parser.add_argument("--trl-options", default="{}", help="JSON: GRPOConfig overrides")
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_dir is None:
        from lmmr1.models.mini import default_mini_dir

        args.model_dir = default_mini_dir().parent / LLAMA_NAME
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if any(n.startswith("trl") for n in names):
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error('--configs: TRL is not installed; pip install -c constraints.txt -e ".[bench]"')
    llama_folder(args.model_dir)
    results: dict[str, list[dict]] = {n: [] for n in names}
    loads = [load()]
    for round_ in range(args.rounds):
        for name in names:
            began = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--model-dir", str(args.model_dir),
                                   *_forward(args)], capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            results[name].append(result)
            loads.append(load())
            s = summary(result)
            print(f"[round {round_ + 1}] {name}: {s['step_s']:.1f} s/step ({s['cpu_s']:.1f} CPU s), "
                  f"{s['tokens_per_s']:.1f} tok/s, "
                  f"peak RSS {s['peak_rss_gb']:.2f} GB ({time.perf_counter() - began:.0f} s, load {loads[-1]})",
                  flush=True)
    report(results, args, loads)


def _forward(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--prompts", str(args.prompts), "--samples", str(args.samples),
            "--new-tokens", str(args.new_tokens), "--lmmr1-options", args.lmmr1_options,
            "--trl-options", args.trl_options]


def report(results: dict[str, list[dict]], args: argparse.Namespace, loads: list[str]) -> None:
    merged = {}
    for name, runs in results.items():
        joined = {"step_s": [], "cpu_s": [], "tokens": [], "phases": []}
        for r in runs:  # steps 2..N of every round
            for key in ("step_s", "cpu_s", "tokens"):
                joined[key] += r[key][1:] if len(r[key]) > 1 else r[key]
            joined["phases"] += (r.get("phases") or [])[1:]
        s = summary({"step_s": [0.0] + joined["step_s"], "cpu_s": [0.0] + joined["cpu_s"],
                     "tokens": [1.0] + joined["tokens"],
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)})
        if joined["phases"]:
            s["phases"] = {p: statistics.median(ph[p] for ph in joined["phases"]) for p in PHASES}
        merged[name] = s
    print(f"\n{args.prompts} prompts x {args.samples} samples, <= {args.new_tokens} new tokens, KL 0.04 k3 in the "
          f"loss, {args.steps} steps x {args.rounds} round(s), torch threads {torch.get_num_threads()}; load average "
          f"(1/5/15 min) before/after each run: {' | '.join(loads)}")
    print(f"{'config':12s} {'s/step':>8s} {'cpu s/step':>10s} {'tok/step':>9s} {'tok/s':>7s} {'peak RSS':>9s}   "
          + " ".join(f"{p:>11s}" for p in PHASES))
    for name, s in merged.items():
        phases = " ".join(f"{s['phases'][p]:11.2f}" for p in PHASES) if "phases" in s else ""
        print(f"{name:12s} {s['step_s']:8.1f} {s['cpu_s']:10.1f} {s['tokens_per_step']:9.0f} {s['tokens_per_s']:7.1f} "
              f"{s['peak_rss_gb']:7.2f}GB   {phases}")
    trl = {n: s for n, s in merged.items() if n.startswith("trl")}
    ours = {n: s for n, s in merged.items() if n.startswith("lmmr1")}
    if trl and ours:
        best_trl = min(trl, key=lambda n: trl[n]["step_s"])
        best_ours = min(ours, key=lambda n: ours[n]["step_s"])
        t, o = trl[best_trl], ours[best_ours]
        print(f"\nfaster vs faster: {best_ours} / {best_trl}: {t['step_s'] / o['step_s']:.2f}x per step, "
              f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x per completion token, peak RSS "
              f"{o['peak_rss_gb'] / t['peak_rss_gb']:.2f}x")
        for precision in ("fp32", "bf16"):
            a, b = merged.get(f"trl-{precision}"), merged.get(f"lmmr1-{precision}")
            if a and b:
                print(f"{precision}: lmmr1 / TRL {a['step_s'] / b['step_s']:.2f}x per step, "
                      f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x per token, peak RSS "
                      f"{b['peak_rss_gb'] / a['peak_rss_gb']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "summary": merged, "load": loads}, indent=1))


if __name__ == "__main__":
    main()
