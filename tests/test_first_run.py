"""A first run from a fresh clone, as a new user does it (README): the first command works as written, one option moves
the whole run, a config mistake is one readable line, and nothing warns about how the CLI was called."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmmr1.cli import main

REPO = Path(__file__).parents[1]
SMOKE = str(REPO / "configs" / "demo" / "smoke.yaml")
LMMR1 = str(Path(sys.executable).with_name("lmmr1"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`lmmr1 fit -c configs/demo/smoke.yaml` (one step, run moved to `elsewhere/`, plus HFCheckpoint) in an empty
    folder: no models/tiny-vl, no data, no runs/."""
    cwd = tmp_path_factory.mktemp("fresh_clone")
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # show every warning once, as a user's terminal does
    env.pop("LMMR1_TRACEBACK", None)
    proc = subprocess.run([LMMR1, "fit", "-c", SMOKE, "--trainer.max_steps", "1",
                           "--trainer.default_root_dir", "elsewhere/run",
                           "--trainer.callbacks+=lmmr1.callbacks.hf_checkpoint.HFCheckpoint"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_the_first_command_builds_the_missing_tiny_model_and_trains(first_run):
    cwd, proc = first_run
    assert (cwd / "models" / "tiny-vl" / "config.json").is_file()
    assert (cwd / "models" / "tiny-vl" / "preprocessor_config.json").is_file()  # the VL kind, as smoke.yaml asks
    assert "Building the missing model folder models/tiny-vl" in proc.stderr  # said, not silent
    assert not list((cwd / "models").glob(".*partial*"))  # built under a private name, renamed into place
    with open(cwd / "elsewhere" / "run" / "csv" / "version_0" / "metrics.csv") as f:
        assert [r for r in csv.DictReader(f) if r.get("train/reward/total")]  # it trained a step


def test_default_root_dir_moves_the_whole_run(first_run):
    cwd, _ = first_run
    root = cwd / "elsewhere" / "run"
    assert not (cwd / "runs").exists() and not (cwd / "lightning_logs").exists()
    assert (root / "checkpoints" / "last.ckpt").is_file()  # ModelCheckpoint
    assert (root / "csv" / "version_0" / "samples.jsonl").is_file()  # SampleTable (beside the CSV log)
    assert (root / "csv" / "version_0" / "config.yaml").is_file()
    assert list((root / "tb").rglob("events.out.tfevents.*"))  # TensorBoard
    assert (root / "hf" / "final" / "config.json").is_file()  # HFCheckpoint
    assert main(["plot", str(root)]) == 0
    assert (root / "csv" / "version_0" / "plots" / "reward.png").is_file()
    written = {p.relative_to(cwd).parts[0] for p in cwd.rglob("*") if p.is_file()}
    assert written == {"elsewhere", "models", "data"}


def test_no_warning_about_how_the_cli_was_called(first_run):
    _, proc = first_run
    assert "args parameter is intended to run from within Python" not in proc.stderr


def _error_of(capfd, argv: list[str]) -> list[str]:
    """stderr lines of a run that must stop with a config error (exit status 2)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    noise = ("Seed set", "INFO: Seed set", "Loading weights")  # log lines and progress bars before the error
    lines = [line for line in capfd.readouterr().err.splitlines() if line and not line.startswith(noise)]
    assert lines and len(lines) <= 3, "\n".join(lines)
    text = "\n".join(lines)
    assert "Traceback" not in text and "Namespace(" not in text and "usage:" not in text, text
    return lines


def test_a_missing_model_folder_without_a_recipe_says_how_to_get_one(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no_recipe.yaml").write_text("model:\n  policy:\n    init_args: {path: models/mine, make: null}\n")
    (line, *_) = _error_of(capfd, ["fit", "-c", SMOKE, "-c", "no_recipe.yaml"])
    assert "--model.policy.init_args.path: 'models/mine' is not a folder" in line
    assert "lmmr1 model tiny --out models/mine" in line and "make: {kind: tiny-vl}" in line
    assert not (tmp_path / "models").exists()  # nothing built without a recipe


@pytest.mark.parametrize(("override", "expected"), [
    (["--trainer.max_stepz", "3"], "--trainer.max_stepz: no such option; did you mean --trainer.max_steps?"),
    (["--model.sampling.nn", "4"], "--model.sampling: SamplingConfig has no option 'nn'; did you mean 'n'?"),
    (["--model.algorithm.advantage", "grpoo"], "--model.algorithm.advantage: 'grpoo' is not one of gae, reinforce_pp, "
                                               "reinforce_baseline, rloo, grpo, dr_grpo; did you mean 'grpo'?"),
    (["--model.algorithm.kl.coef", "abc"], "--model.algorithm.kl.coef: expected a number, got 'abc'"),
    (["--data.batch_size", "four"], "--data.batch_size: expected an integer, got 'four'"),
    (["--model.policy.init_args.make.kind", "huge"], "--model.policy.make.kind: 'huge' is not one of tiny, "
                                                     "tiny-vl, tiny-text, mini"),
])
def test_a_parse_mistake_is_one_line_naming_the_option_and_the_fix(override, expected, capfd):
    lines = _error_of(capfd, ["fit", "-c", SMOKE, *override])
    assert lines[0].startswith(f"lmmr1 fit: error: {expected}")


@pytest.mark.parametrize(("override", "expected"), [
    (["--model.policy.init_args.dtype", "float77"],
     "--model.policy.dtype: unknown 'float77'; choose from ['bfloat16', 'float16', 'float32']"),
    (["--model.reward", "mathh"], "--model: unknown reward 'mathh'; choose a built-in name"),
    (["--model.policy.init_args.make.kind", "tiny", "--model.policy.init_args.make.family", "gemma4"],
     "--model.policy.make.family: unknown family 'gemma4'; choose from ['gemma3', 'llava', "),
    (["--model.policy.init_args.make.kind", "tiny"], "--model.policy.make.family: kind tiny needs a family"),
    (["--model.policy.init_args.make.family", "gemma3"],  # the smoke config's kind: tiny-vl
     "--model.policy.make.family: only kind tiny takes a family, not kind tiny-vl"),
])
def test_a_component_rejecting_its_config_is_one_line_not_a_traceback(override, expected, tiny_vl_path, capfd):
    lines = _error_of(capfd, ["fit", "-c", SMOKE, "--model.policy.init_args.path", str(tiny_vl_path), *override])
    assert lines[0].startswith(f"lmmr1 fit: error: {expected}")


def test_the_full_traceback_on_request(tiny_vl_path, monkeypatch):
    monkeypatch.setenv("LMMR1_TRACEBACK", "1")
    with pytest.raises(ValueError, match="float77"):
        main(["fit", "-c", SMOKE, "--model.policy.init_args.path", str(tiny_vl_path),
              "--model.policy.init_args.dtype", "float77"])


def test_a_recipe_keeps_an_existing_model_and_never_builds_over_other_files(tmp_path, tiny_vl_path):
    from lmmr1.models.recipe import ModelRecipe

    before = (tiny_vl_path / "model.safetensors").stat().st_mtime_ns
    assert ModelRecipe(kind="tiny-vl").build_if_missing(tiny_vl_path) == tiny_vl_path
    assert (tiny_vl_path / "model.safetensors").stat().st_mtime_ns == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no model"):
        ModelRecipe(kind="tiny-text").build_if_missing(tmp_path / "notes")
    assert ModelRecipe(kind="tiny-text").build_if_missing(tmp_path / "text") == tmp_path / "text"
    assert not (tmp_path / "text" / "preprocessor_config.json").exists()  # the text-only kind


def test_the_tiny_recipe_builds_the_named_familys_model_on_first_use(tmp_path, monkeypatch):
    from transformers import AutoConfig

    from lmmr1.models.families import family_of

    monkeypatch.chdir(tmp_path)
    (tmp_path / "llava.yaml").write_text("model:\n  policy:\n    init_args:\n      path: models/tiny-llava\n"
                                         "      make: {kind: tiny, family: llava, seed: 0}\n")
    main(["fit", "-c", SMOKE, "-c", "llava.yaml", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--model.sampling.n", "2", "--model.sampling.max_new_tokens", "4", "--trainer.default_root_dir", "run"])
    assert family_of(AutoConfig.from_pretrained(tmp_path / "models" / "tiny-llava")).name == "llava"
    assert (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").is_file()  # and it trained a step


def test_the_mini_recipe_converts_only_when_the_folder_is_incomplete(tmp_path, monkeypatch):
    import lmmr1.models.mini as mini
    from lmmr1.models.recipe import ModelRecipe

    calls = []
    monkeypatch.setattr(mini, "prepare_mini", lambda out, seed: calls.append((out, seed)))
    monkeypatch.setattr(mini, "is_complete", lambda folder: folder == tmp_path / "done")
    ModelRecipe(kind="mini").build_if_missing(tmp_path / "done")
    ModelRecipe(kind="mini", seed=3).build_if_missing(tmp_path / "todo")
    assert calls == [(tmp_path / "todo", 3)]
