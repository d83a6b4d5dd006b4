"""Every shipped YAML parses through the real CLI (`--print_config`), and CLI overrides reach the module."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmmr1.cli import main
from lmmr1.models.tiny import build_tiny


def _printed_config(out: str) -> dict:
    """The YAML `--print_config` wrote, without log lines DeepSpeed prints on import ("[2026-...] [WARNING] ...")."""
    return yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("[")))


STUDY = Path(__file__).parents[1] / "configs" / "reproduce_mini"  # its stage files extend its common.yaml (tested
CONFIGS = sorted(str(p) for p in Path(__file__).parents[1].glob("configs/**/*.yaml")  # in test_reproduce_mini.py)
                 if p.parent != STUDY or p.name == "common.yaml")


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = _printed_config(capsys.readouterr().out)
    assert printed["model"]["init_args"]["policy"]["init_args"]["path"]
    assert "processor_path" not in printed["data"]  # linked from the policy path, so not a separate option


def test_command_line_overrides_the_yaml(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", "configs/demo/smoke.yaml", "--model.sampling.n", "3", "--model.algorithm.advantage", "rloo",
              "--print_config"])
    printed = _printed_config(capsys.readouterr().out)
    assert printed["model"]["init_args"]["sampling"]["n"] == 3
    assert printed["model"]["init_args"]["algorithm"]["advantage"] == "rloo"


def test_bad_option_value_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", "configs/demo/smoke.yaml", "--model.algorithm.advantage", "nope"])
    assert "advantage" in capsys.readouterr().err


def test_smoke_config_trains_through_the_cli(tmp_path, monkeypatch):
    """The README's first command, end to end: data generated on first use, policy path linked to the processor."""
    config = str(Path(__file__).parents[1] / "configs" / "demo" / "smoke.yaml")
    monkeypatch.chdir(tmp_path)
    build_tiny(tmp_path / "models" / "tiny-vl")
    main(["fit", "-c", config, "--trainer.max_steps", "2",
          "--trainer.callbacks+=lmmr1.callbacks.graceful_stop.GracefulStop"])
    assert (tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt").exists()
    metrics = (tmp_path / "runs" / "smoke" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/reward/total" in metrics and "val/arith/accuracy" in metrics
    assert (tmp_path / "data" / "smoke" / "image-arith" / "data.jsonl").exists()
    assert list((tmp_path / "runs" / "smoke" / "tb").rglob("events.out.tfevents.*"))
    assert main(["plot", "runs/smoke/csv"]) == 0
    plots = {p.name for p in (tmp_path / "runs" / "smoke" / "csv" / "version_0" / "plots").iterdir()}
    assert {"reward.png", "validation.png", "kl.png", "grad_norm.png", "response_length.png"} <= plots


@pytest.mark.parametrize("config", CONFIGS)
def test_config_writes_its_run_under_default_root_dir(config):
    """No logger `save_dir` or checkpoint `dirpath` of its own: the CLI fills them from `trainer.default_root_dir`, so
    `--trainer.default_root_dir DIR` moves the whole run (tests/test_first_run.py runs it)."""
    trainer = yaml.safe_load(Path(config).read_text()).get("trainer", {})
    loggers = trainer.get("logger") or []
    for component in (loggers if isinstance(loggers, list) else [loggers]) + (trainer.get("callbacks") or []):
        init_args = component.get("init_args") or {} if isinstance(component, dict) else {}
        assert "save_dir" not in init_args and "dirpath" not in init_args, (config, component)
