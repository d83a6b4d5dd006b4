"""Every shipped YAML parses through the real CLI (`--print_config`), and CLI overrides reach the module."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmmr1.cli import main

CONFIGS = sorted(str(p) for p in Path(__file__).parents[1].glob("configs/**/*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["policy"]["init_args"]["path"]
    # the link: prompts are processed with the policy's own tokenizer / image processor
    assert printed["data"]["processor_path"] == printed["model"]["policy"]["init_args"]["path"]


def test_command_line_overrides_the_yaml(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", "configs/demo/smoke.yaml", "--model.sampling.n", "3", "--model.algorithm.advantage", "rloo",
              "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["sampling"]["n"] == 3
    assert printed["model"]["algorithm"]["advantage"] == "rloo"


def test_bad_option_value_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", "configs/demo/smoke.yaml", "--model.algorithm.advantage", "nope"])
    assert "advantage" in capsys.readouterr().err
