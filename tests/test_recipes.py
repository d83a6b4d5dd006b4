"""The paper's six recipes (configs/lmm_r1/common.yaml + one file each): the settings they resolve to are the
reference scripts' (the table of issue 15, read back through `--print_config`), and each one really starts: built
with tiny-model and tiny-size overrides, it takes one RL step on CPU through `lmmr1 fit`."""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import pytest
import yaml

from lmmr1.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMON = str(ROOT / "configs/lmm_r1/common.yaml")

# recipe -> (starts from, advantage, actor lr, critic lr, kl coef, prompts per rollout, samples per optimizer step,
#            episodes, max new tokens, frozen prefixes, reward)
TABLE = {
    "fre_text": ("/models/Qwen2.5-VL-3B-Instruct", "reinforce_baseline", 4e-7, None, 1e-3, 256, 256, 2, 4096, None,
                 "lmm_r1_math"),
    "fre_multi": ("/models/Qwen2.5-VL-3B-Instruct", "reinforce_baseline", 1e-6, None, 1e-3, 256, 256, 2, 4096, None,
                  "lmm_r1_math"),
    "mgt_geo": ("runs/fre_text/hf/final", "gae", 1e-6, 9e-6, 1e-3, 256, 256, 2, 4096, None, "lmm_r1_math"),
    "mgt_percereason": ("runs/fre_text/hf/final", "reinforce_baseline", 4e-7, None, 1e-3, 256, 256, 2, 8192, None,
                        "lmm_r1_math"),
    "direct_rl_geo": ("/models/Qwen2.5-VL-3B-Instruct", "gae", 1e-6, 9e-6, 1e-3, 256, 256, 2, 4096, None,
                      "lmm_r1_math"),
    "mgt_sokoban": ("/models/Qwen2.5-VL-3B-Instruct", "gae", 1e-6, 5e-6, 0.0, 128, 128, 4, 8192, ["visual."],
                    "lmm_r1_sokoban"),
}


def _printed(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", COMMON, *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load("\n".join(line for line in capsys.readouterr().out.splitlines() if not line.startswith("[")))


@pytest.mark.parametrize("recipe", sorted(TABLE))
def test_recipe_resolves_to_the_reference_settings(recipe, capsys):
    start, advantage, lr, critic_lr, kl, prompts, per_step, episodes, max_new, freeze, reward = TABLE[recipe]
    config = _printed(capsys, "-c", str(ROOT / f"configs/lmm_r1/{recipe}.yaml"))
    model, data, trainer = config["model"]["init_args"], config["data"], config["trainer"]
    policy, algorithm = model["policy"]["init_args"], model["algorithm"]
    assert (policy["path"], policy["freeze"]) == (start, freeze)
    assert (algorithm["advantage"], model["optimizer"]["init_args"]["lr"]) == (advantage, lr)
    assert (model["critic"] or {}).get("init_args", {}).get("lr") == critic_lr
    assert algorithm["kl"]["coef"] == kl and (kl == 0 or algorithm["kl"]["estimator"] == "k1")
    assert algorithm["kl"]["placement"] == "reward"
    assert (model["sampling"]["n"], data["batch_size"], algorithm["train_batch_size"]) == (16, prompts, per_step)
    assert (data["episodes"], model["sampling"]["max_new_tokens"], model["reward"]) == (episodes, max_new, reward)
    # common to all
    assert (algorithm["loss"]["clip_low"], algorithm["loss"]["clip_high"], algorithm["value_clip"]) == (0.2, 0.2, 0.2)
    assert algorithm["grad_clip"]["mode"] == "fixed" and algorithm["grad_clip"]["max_norm"] == 1.0
    assert model["optimizer"]["init_args"]["betas"] == [0.9, 0.95] and model["optimizer"]["init_args"][
        "weight_decay"] == 0.0
    assert model["lr_scheduler"]["class_path"] == "lmmr1.modules.schedules.WarmupCosine"
    assert (model["lr_scheduler"]["init_args"]["warmup_ratio"], model["lr_scheduler"]["init_args"]["min_lr_ratio"]) \
        == (0.03, 0.1)
    assert (model["sampling"]["temperature"], model["sampling"]["top_p"], data["max_prompt_tokens"]) == (1.0, 1.0, 4096)
    assert (data["min_pixels"], data["max_pixels"], config["seed_everything"]) == (4 * 28 * 28, 16384 * 28 * 28, 42)
    deepspeed = trainer["strategy"]["init_args"]["config"]  # printed as the dict's repr (a str | path | dict option)
    deepspeed = ast.literal_eval(deepspeed) if isinstance(deepspeed, str) else deepspeed
    assert deepspeed["zero_optimization"]["stage"] == 3 and deepspeed["bf16"]["enabled"]
    assert trainer["precision"] == "bf16-true" and policy["gradient_checkpointing"]
    assert policy["attn_implementation"] == "flash_attention_2"
    engine = model["engine"]["init_args"]
    assert (engine["tensor_parallel_size"], engine["gpu_memory_utilization"], engine["enable_sleep_mode"]) == \
        (1, 0.5, True)
    export = next(c for c in trainer["callbacks"] if c["class_path"].endswith("HFCheckpoint"))
    assert export["init_args"]["every_n_steps"] == (5 if recipe == "mgt_sokoban" else 20)


@pytest.mark.parametrize("recipe", sorted(TABLE))
def test_recipe_takes_one_step_on_cpu(recipe, tiny_vl_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kind = "sokoban" if recipe == "mgt_sokoban" else "arith"
    main(["fit", "-c", COMMON, "-c", str(ROOT / f"configs/lmm_r1/{recipe}.yaml"),
          "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
          "--trainer.precision", "32-true", "--trainer.max_steps", "1",
          "--trainer.default_root_dir", "run",
          "--model.policy.init_args.path", str(tiny_vl_path), "--model.policy.init_args.dtype", "float32",
          "--model.policy.init_args.attn_implementation", "sdpa",
          "--model.engine", "lmmr1.rollout.hf.HFEngine",
          "--model.sampling.n", "2", "--model.sampling.max_new_tokens", "8",
          "--data.batch_size", "2", "--model.algorithm.train_batch_size", "2",
          "--model.algorithm.micro_batch_size", "2",
          "--data.datasets", f"[{{path: data/{kind}/data.jsonl, make: {{kind: {kind}, n: 8, seed: 0}}}}]"])
    with open(next(Path("run").glob("csv/version_*/metrics.csv"))) as f:
        steps = [row for row in csv.DictReader(f) if row.get("train/reward/total")]
    assert len(steps) == 1 and float(steps[0]["train/optimizer_steps"]) == 2  # 2 prompts x 2 samples, 2 per step
    assert (Path("run") / "hf" / "final" / "config.json").is_file()  # the export the next stage starts from
