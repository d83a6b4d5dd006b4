"""The reproduce-mini study (lmmr1/study/): its arms run end to end on the tiny model, its held-out sets are disjoint
from its training sets, and its report is a fixed function of the collected metrics."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from lmmr1.cli import main
from lmmr1.data.synthetic import make, split_of
from lmmr1.study import report
from lmmr1.study.reproduce_mini import SETS, run_once, study

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "reproduce_mini"


def _specs(stage: str) -> list[dict]:
    return yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())["data"]["datasets"]


def _small_data(path: Path) -> Path:
    """The study's own data recipes (same kinds, difficulties, splits) with few rows, into fresh folders."""
    common = yaml.safe_load((CONFIGS / "common.yaml").read_text())["data"]

    def shrink(spec: dict, n: int) -> dict:
        return {**spec, "path": spec["path"].replace("data/", "small/", 1), "make": {**spec["make"], "n": n}}

    stage = {"data": {"val": [shrink(s, 4) for s in common["val"]], "val_batch_size": 4}}
    path.write_text(yaml.safe_dump(stage))
    for name in ("fre", "mgt"):
        (path.parent / f"{name}-small.yaml").write_text(yaml.safe_dump(
            {"data": {"datasets": [shrink(s, 8) for s in _specs(name)]}}))
    return path


def test_every_arm_runs_and_the_study_collects_its_numbers(tiny_vl_path, tmp_path, monkeypatch):
    """base, direct-MGT and FRE->MGT (FRE's final weights handed to its MGT run) take one step each on the tiny model
    through the real configs; the study's metrics hold every held-out accuracy and the training curves."""
    monkeypatch.chdir(tmp_path)
    small = _small_data(tmp_path / "small.yaml")
    commands = []

    def in_process(*args: str, log: Path) -> float:
        args = list(args)
        if args[0] == "fit":  # the stage's training data, shrunk: after its own -c, before the overrides
            stage = Path(args[4]).stem
            args[5:5] = ["-c", str(tmp_path / f"{stage}-small.yaml")]
        commands.append(args)
        start = time.monotonic()
        main([*args, "--model.sampling.n", "2", "--model.sampling.max_new_tokens", "6", "--data.batch_size", "2"])
        return time.monotonic() - start

    monkeypatch.setattr("lmmr1.study.reproduce_mini.CONFIGS", CONFIGS)
    metrics = study("test", tmp_path / "work", settings={"seeds": [3], "fre_steps": 1, "mgt_steps": 1},
                    model=tiny_vl_path, extra=["-c", str(small)], run=in_process)
    assert [c[0] for c in commands] == ["validate", "fit", "fit", "fit"]
    assert [Path(c[4]).stem for c in commands[1:]] == ["mgt", "fre", "mgt"]
    fre_mgt = commands[3]
    assert fre_mgt[fre_mgt.index("--model.policy.init_args.path") + 1] == str(
        tmp_path / "work" / "seed3" / "fre" / "hf" / "final")  # FRE's weights start FRE->MGT's multimodal run
    assert "--data.seed" in fre_mgt and fre_mgt[fre_mgt.index("--data.seed") + 1] == "3"
    assert set(metrics["base"]) == set(SETS)
    assert [(r["arm"], r["stage"], r["first_step"]) for r in metrics["runs"]] == [
        ("direct_mgt", "mgt", 0), ("fre_mgt", "fre", 0), ("fre_mgt", "mgt", 1)]
    for run in metrics["runs"]:
        assert set(run["eval"]) == set(SETS) and all(0.0 <= v <= 1.0 for v in run["eval"].values())
        assert [step for step, _ in run["curves"]["reward"]] == [1]  # one RL step, logged as step 1
    text = report.render(metrics)
    assert "| base (no RL) | start | 0 |" in text and "| FRE→MGT | end (+1 MM steps) | 2 |" in text


def test_held_out_sets_are_disjoint_from_training(tmp_path):
    """Every held-out problem is in the `val` split and every training problem in `train` (one hash partition of
    the computations, shared by the text and the pictured kinds), so no held-out computation is trained on in any
    form; the pictured problems hold their first number only in the picture."""
    common = yaml.safe_load((CONFIGS / "common.yaml").read_text())["data"]
    keys, held_out_rows = {}, 0
    for role, specs in (("held_out", common["val"]), ("train", _specs("fre") + _specs("mgt"))):
        for j, spec in enumerate(specs):
            recipe = dict(spec["make"])
            n = recipe.pop("n") if role == "held_out" else (recipe.pop("n"), 60)[1]  # held-out sets at full size
            path = make(recipe.pop("kind"), n=n, out=tmp_path / role / str(j), **recipe)
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            keys.setdefault(role, set()).update(r["problem"] for r in rows)
            held_out_rows += len(rows) if role == "held_out" else 0
            assert all(split_of("arith", r["problem"]) == ("val" if role == "held_out" else "train") for r in rows)
            for row in rows:
                content = row["message"][-1]["content"]
                if isinstance(content, list):  # pictured: the picture of A, then a question with only the other number
                    assert [item["type"] for item in content] == ["image", "text"]
                    a, b = re.fullmatch(r"(\d+)\D(\d+)", row["expression"]).groups()
                    assert re.findall(r"\d+", content[-1]["text"]) == [b], (content[-1]["text"], a)
    assert held_out_rows == 400 and not keys["held_out"] & keys["train"]  # 200 text + 200 pictured problems


def _fixture() -> dict:
    """Two seeds; numbers chosen so every table cell is easy to check by hand."""
    def run(arm, stage, seed, first, text, mm_arith, mm_word):
        accuracy = 0.0 if arm == "direct_mgt" else 0.2 + 0.1 * seed  # six steps: five at `accuracy`, then +0.6
        return {"arm": arm, "stage": stage, "seed": seed, "first_step": first, "wall_s": 60.0,
                "eval": {"text": text, "mm_arith": mm_arith, "mm_word": mm_word},
                "curves": {"reward": [[1, 0.5], [2, 0.7]], "step_time": [[1, 10.0], [2, 12.0]],
                           "accuracy": [[k, accuracy + 0.6 * (k == 6)] for k in range(1, 7)],
                           "format": [[k, 0.5 + 0.5 * (k == 6)] for k in range(1, 7)]}}

    return {
        "variant": "full",
        "settings": {"seeds": [0, 1], "fre_steps": 2, "mgt_steps": 2,
                     "held_out": {n: {"kind": k, "n": 200, "difficulty": 2} for n, k in
                                  (("text", "arith"), ("mm_arith", "pictured-arith"), ("mm_word", "pictured-word"))},
                     "train": {"fre": [{"kind": "arith", "n": 2000, "difficulty": 2, "prob": 1.0}],
                               "mgt": [{"kind": "pictured-arith", "n": 2000, "difficulty": "1-2", "prob": 0.5}]},
                     "batch_size": 4, "sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 32},
                     "algorithm": {"loss": {"name": "ppo"}, "kl": {"coef": 0.0}}, "lr": 1e-5},
        "base": {"text": 0.30, "mm_arith": 0.20, "mm_word": 0.10},
        "runs": [run("direct_mgt", "mgt", 0, 0, 0.25, 0.40, 0.20), run("fre_mgt", "fre", 0, 0, 0.50, 0.30, 0.10),
                 run("fre_mgt", "mgt", 0, 2, 0.45, 0.50, 0.30),
                 run("direct_mgt", "mgt", 1, 0, 0.35, 0.40, 0.30), run("fre_mgt", "fre", 1, 0, 0.60, 0.30, 0.20),
                 run("fre_mgt", "mgt", 1, 2, 0.55, 0.60, 0.40)],
        "wall_s": {"study": 600.0, "alignment": 0.0, "base_eval": 30.0},
        "machine": {"cores": 2, "load_average": [2.0, 2.0, 2.0], "python": "3.11", "torch": "2.13.0"},
    }


def test_report_table_is_a_function_of_the_metrics(tmp_path):
    metrics = _fixture()
    text = report.render(metrics)
    assert text == report.render(json.loads(json.dumps(metrics)))  # deterministic, from plain JSON
    for line in ["| base (no RL) | start | 0 | 30.0 | 20.0 | 10.0 |",
                 "| direct-MGT | end (2 MM steps) | 2 | 30.0 ± 7.1 | 40.0 ± 0.0 | 25.0 ± 7.1 |",
                 "| FRE→MGT | switch (2 text steps) | 2 | 55.0 ± 7.1 | 30.0 ± 0.0 | 15.0 ± 7.1 |",
                 "| FRE→MGT | end (+2 MM steps) | 4 | 50.0 ± 7.1 | 55.0 ± 7.1 | 35.0 ± 7.1 |",
                 "| direct-MGT | end (2 MM steps) | 1 | 35.0 | 40.0 | 30.0 |",
                 "| held-out text | +20.0, +20.0 | +20.0 | 0.0 | held |",
                 "| held-out MM arithmetic | +10.0, +20.0 | +15.0 | 5.0 | held |",
                 "| multimodal (mean of the MM sets) | +10.0, +15.0 | +12.5 | 2.5 | held |",
                 "**The claim held in miniature** as a comparison of FRE→MGT against direct-MGT (2 seeds; rule: a "
                 "difference counts when it is positive and above two standard errors).",
                 "Against the base model (15.0, mean of the MM sets): direct-MGT +17.5, FRE→MGT +30.0 points.",
                 # sampled training rewards (first 5 steps, last 5, all 6), FRE->MGT's the mean of seeds 0.2 and 0.3
                 "| direct-MGT | MGT | 0.0 | 12.0 | 10.0 | 50.0 | 60.0 |",
                 "| FRE→MGT | MGT | 25.0 | 37.0 | 35.0 | 50.0 | 60.0 |"]:
        assert line in text, line
    assert "**Caveat:**" not in text  # 10% > the 2% floor: no caveat
    assert "- Study: 10.0 min (base evaluation 0.5 min)" in text
    metrics["wall_s"] |= {"study": 6.0, "runs": 600.0}  # a rerun that reused every finished run
    assert "- Study: 10.0 min, the sum of the runs' own times (this invocation 0.1 min: it reused runs finished " \
        "earlier)" in report.render(metrics)
    metrics["run_commits"] = ["abc1234", "def5678"]
    assert "- Code: the runs ran at commit abc1234, def5678." in report.render(metrics)
    for r in metrics["runs"]:
        if r["arm"] == "direct_mgt":
            r["curves"]["accuracy"] = [[1, 0.0], [2, 0.0]]
    assert "**Caveat:** sampled training accuracy stayed below 2.0% in direct-MGT's MGT stage (0.0%)" in \
        report.render(metrics)
    metrics["runs"][2]["eval"]["mm_arith"] = 0.30  # seed 0's FRE->MGT falls below direct-MGT: the verdict follows
    assert "**The claim did not hold in miniature**" in report.render(metrics)
    written = report.write_report(_fixture(), tmp_path)
    assert [p.name for p in written] == ["report.md", "learning_curves.png", "final_accuracy.png"]
    assert all(p.stat().st_size > 0 for p in written) and "![learning_curves](learning_curves.png)" in \
        written[0].read_text()


@pytest.mark.parametrize("stage", ["fre", "mgt"])
def test_stage_files_change_only_the_training_data(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONFIGS / "common.yaml"), "-c", str(CONFIGS / f"{stage}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert [d["make"]["kind"] for d in printed["data"]["datasets"]] == [s["make"]["kind"] for s in _specs(stage)]
    assert set(yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())) == {"data"}
    assert set(yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())["data"]) == {"datasets"}


@pytest.mark.parametrize("variant", ["full", "quick"])
def test_study_settings_give_both_arms_the_same_multimodal_budget(variant):
    settings = yaml.safe_load((CONFIGS / "study.yaml").read_text())[variant]
    assert settings["fre_steps"] >= 1 and settings["mgt_steps"] >= 1
    assert len(settings["seeds"]) == (3 if variant == "full" else 1)


def test_an_interrupted_study_reuses_a_run_only_while_its_inputs_are_unchanged(tmp_path, monkeypatch):
    """A rerun skips a finished run with the same command; an edited config or retrained starting weights (the FRE
    stage's folder) rerun it, since done.json's command alone would not show either change."""
    monkeypatch.setattr("lmmr1.study.reproduce_mini.collect_run", lambda root, sets: {"eval": {}, "curves": {}})
    config, weights = tmp_path / "stage.yaml", tmp_path / "fre_final"
    config.write_text("data: {batch_size: 4}\n")
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"x" * 8)
    calls = []

    def fake(*args: str, log: Path) -> float:
        calls.append(args)
        return 1.0

    args = ["fit", "-c", str(config), "--model.policy.init_args.path", str(weights)]
    run_once("run", tmp_path / "work", args, run=fake)
    run_once("run", tmp_path / "work", args, run=fake)
    assert len(calls) == 1
    config.write_text("data: {batch_size: 8}\n")
    run_once("run", tmp_path / "work", args, run=fake)
    assert len(calls) == 2
    (weights / "model.safetensors").write_bytes(b"y" * 16)
    run_once("run", tmp_path / "work", args, run=fake)
    run_once("run", tmp_path / "work", args, run=fake)
    assert len(calls) == 3
